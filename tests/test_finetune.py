"""Fine-tuning heads and LoRA: shapes, pooling, frozen parameters, merge equality."""

import pytest
import torch
from torch import nn

from llmcore.apps.finetune import (SequenceClassifier, classification_loss,
                                   freeze_backbone, hidden_states, pool, predict)
from llmcore.accounting import count_params
from llmcore.apps.lora import LoRALinear, apply_lora, merge_lora
from llmcore.models.bert import BERT, BertConfig
from llmcore.models.gpt import GPT, GPTConfig


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16))


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BERT(BertConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2,
                           n_embd=16))


def test_gpt_hidden_states_feed_its_lm_head():
    gpt = tiny_gpt()
    idx = torch.randint(20, (3, 9))
    h = hidden_states(gpt, idx)
    assert h.shape == (3, 9, 16)
    torch.testing.assert_close(gpt.lm_head(h), gpt(idx)[0])


def test_last_pooling_ignores_right_padding_of_a_causal_model():
    gpt = tiny_gpt()
    clf = SequenceClassifier(gpt, 16, 3, pooling="last")
    nn.init.normal_(clf.head.weight)
    short = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[3, 4, 5, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(clf(padded, mask)[0], clf(short)[0])


def test_cls_and_mean_pooling_with_an_encoder():
    bert = tiny_bert()
    idx = torch.randint(1, 20, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    h = hidden_states(bert, idx, mask)
    torch.testing.assert_close(pool(h, mask, "cls"), h[:, 0])
    mean = pool(h, mask, "mean")
    torch.testing.assert_close(mean[1], h[1, :4].mean(0))
    torch.testing.assert_close(mean[0], h[0].mean(0))
    with pytest.raises(ValueError, match="pooling"):
        pool(h, mask, "max")


def test_head_starts_uniform_and_loss_trains():
    clf = SequenceClassifier(tiny_gpt(), 16, 2)
    idx = torch.randint(20, (8, 6))
    labels = (idx[:, -1] > 9).long()  # learnable from the last token
    logits, loss = clf(idx, labels=labels)
    assert logits.shape == (8, 2) and torch.all(logits == 0)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    batch = {"input_ids": idx, "attention_mask": None, "label": labels}
    for _ in range(60):
        opt.zero_grad()
        classification_loss(clf, batch).backward()
        opt.step()
    preds, true = predict(clf, [batch])
    assert (preds == true).float().mean() == 1.0


def test_linear_probe_trains_only_the_head():
    clf = freeze_backbone(SequenceClassifier(tiny_gpt(), 16, 4))
    trainable, total = count_params(clf, trainable_only=True), count_params(clf)
    assert trainable == 16 * 4 + 4 and total > trainable
    before = {k: v.clone() for k, v in clf.backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in clf.parameters() if p.requires_grad], lr=0.1)
    idx = torch.randint(20, (4, 5))
    clf(idx, labels=torch.tensor([0, 1, 2, 3]))[1].backward()
    opt.step()
    for k, v in clf.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_lora_linear_starts_as_the_base_and_has_the_right_parameters():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    lora = LoRALinear(base, rank=3, alpha=6.0)
    x = torch.randn(5, 12)
    torch.testing.assert_close(lora(x), base(x))  # B = 0
    assert lora.scaling == 2.0 and torch.all(lora.lora_B == 0)
    assert lora.lora_A.shape == (3, 12) and lora.lora_B.shape == (7, 3)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert count_params(lora, trainable_only=True) == 3 * (12 + 7)
    assert count_params(lora) == 3 * 19 + 12 * 7 + 7


def test_lora_forward_equals_the_dense_update_in_float64():
    torch.manual_seed(1)
    base = nn.Linear(10, 6).double()
    lora = LoRALinear(base, rank=2, alpha=5.0).double()
    nn.init.normal_(lora.lora_B)
    x = torch.randn(3, 4, 10, dtype=torch.float64)
    w = base.weight + (5.0 / 2) * lora.lora_B @ lora.lora_A
    torch.testing.assert_close(lora(x), x @ w.T + base.bias)
    torch.testing.assert_close(lora.delta_weight(), w - base.weight)


def test_apply_lora_targets_freezes_and_merges_to_the_same_outputs():
    gpt = tiny_gpt()
    clf = SequenceClassifier(gpt, 16, 2)
    idx = torch.randint(20, (4, 10))
    ref = hidden_states(gpt, idx).clone()
    apply_lora(clf, rank=2, alpha=4, target_modules=["qkv_proj", "out_proj"],
               keep_trainable=["head"])
    wrapped = [n for n, m in clf.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 4 and all(n.endswith(("qkv_proj", "out_proj"))
                                     for n in wrapped)
    torch.testing.assert_close(hidden_states(gpt, idx), ref)  # B = 0: unchanged
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in wrapped for x in "AB"} | {
        "head.weight", "head.bias"}
    # rank 2: (16 + 3 * 16) for the fused q/k/v projection, (16 + 16) for out_proj
    assert count_params(clf, trainable_only=True) == (2 * 2 * (16 + 48 + 16 + 16)
                                                      + 16 * 2 + 2)
    # train a little so that B is not zero, then merge
    nn.init.normal_(clf.head.weight)
    opt = torch.optim.Adam([p for p in clf.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        clf(idx, labels=torch.tensor([0, 1, 0, 1]))[1].backward()
        opt.step()
    assert any(m.lora_B.abs().sum() > 0 for m in clf.modules()
               if isinstance(m, LoRALinear))
    before = clf(idx)[0]
    merge_lora(clf)
    assert not any(isinstance(m, LoRALinear) for m in clf.modules())
    assert type(clf.backbone.blocks[0].self_attn.qkv_proj) is nn.Linear
    torch.testing.assert_close(clf(idx)[0], before, atol=1e-5, rtol=1e-5)


def test_lora_with_a_filter_function_and_bad_input():
    gpt = tiny_gpt()
    apply_lora(gpt, 2, 2.0, lambda m, name: name.endswith("ffn.linear1"))
    assert sum(isinstance(m, LoRALinear) for m in gpt.modules()) == 2
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        apply_lora(tiny_gpt(), 2, 2.0, ["nonexistent"])
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(3, 3), rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_lora(tiny_gpt())


def test_lora_dropout_only_in_training():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(8, 8), rank=4, alpha=4.0, dropout=0.5)
    nn.init.normal_(lora.lora_B)
    x = torch.randn(2, 8)
    lora.eval()
    torch.testing.assert_close(lora(x), lora.merged()(x))
    lora.train()
    assert not torch.allclose(lora(x), lora.merged()(x))


def test_fixed_split_is_a_reproducible_partition():
    from llmcore.apps.finetune import fixed_split
    a = fixed_split(101, (0.8, 0.1, 0.1), seed=3)
    assert [len(p) for p in a] == [81, 10, 10]
    assert sorted(sum(a, [])) == list(range(101))
    assert a == fixed_split(101, (0.8, 0.1, 0.1), seed=3)
    assert a != fixed_split(101, (0.8, 0.1, 0.1), seed=4)
    with pytest.raises(ValueError, match="fractions"):
        fixed_split(10, (0.5, 0.6))


def test_text_classification_data_splits_and_batches():
    from llmcore.apps.finetune import text_classification_data
    texts = [f"sentence number {i} is {'good' if i % 2 else 'bad'}" for i in range(40)]
    labels = [i % 2 for i in range(40)]
    data = text_classification_data(texts, labels, vocab_size=300, max_len=8)
    assert [len(data.examples[k]) for k in ("train", "val", "test")] == [32, 4, 4]
    cls = data.tokenizer.special_tokens["<|cls|>"]
    for ex in data.examples["val"]:
        assert ex["input_ids"][-1] == cls and len(ex["input_ids"]) <= 8
    batch = data.batch_fn("train", 5)(0, torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape[0] == 5 and batch["label"].shape == (5,)
    assert sum(len(b["label"]) for b in data.batches("test", 3)) == 4
    stream = data.lm_tokens("train")
    cls = data.tokenizer.special_tokens["<|cls|>"]
    assert (stream == cls).sum() == 32 and stream[-1] == cls
