"""BERT (MLM) and ELECTRA (replaced-token detection): shapes, bidirectionality,
padding, shared weights, the ELECTRA loss, and short training runs."""

import math

import pytest
import torch

from llmcore.data.mlm import mask_tokens
from llmcore.models.bert import BERT, BertConfig
from book.workers.electra import Electra, ElectraConfig, electra_loss
from llmcore.train import TrainConfig, train

V, MASK = 21, 20  # ids 0..19 are text, 20 is [MASK]
BERT_CFG = BertConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32)
ELECTRA_CFG = ElectraConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2,
                            n_embd=32, gen_n_layer=1, gen_n_head=2, gen_n_embd=16)


def masked_batch(step, generator):
    # Each sequence repeats one id: any unmasked neighbour tells the masked token.
    x = torch.randint(20, (8, 1), generator=generator).expand(8, 16)
    return mask_tokens(x, MASK, V, generator=generator)


def test_config_validation():
    with pytest.raises(ValueError):
        BertConfig(V, 16, 2, 3, 32)
    with pytest.raises(ValueError):
        ElectraConfig(V, 16, 2, 2, 32, gen_n_embd=15, gen_n_head=2)


def test_bert_shapes_loss_and_tying():
    torch.manual_seed(0)
    m = BERT(BERT_CFG)
    inputs, labels = masked_batch(0, torch.Generator().manual_seed(0))
    logits, loss = m(inputs, labels)
    assert logits.shape == (8, 16, V)
    assert abs(loss.item() - math.log(V)) < 0.3
    assert m.mlm_head.embedding.weight is m.embeddings.tok_emb.weight
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_bert_is_bidirectional():
    torch.manual_seed(0)
    m = BERT(BERT_CFG)
    h = {}

    def keep(module, args, out):
        out.retain_grad()
        h["x"] = out

    m.embeddings.tok_emb.register_forward_hook(keep)
    logits, _ = m(torch.randint(20, (1, 10)))
    logits[0, 4].sum().backward()
    assert (h["x"].grad[0].abs().sum(-1) > 0).all()  # position 4 sees all 10


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    m = BERT(BERT_CFG).eval()
    x = torch.randint(20, (1, 6))
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.arange(10)[None] < 6
    torch.testing.assert_close(m.hidden(padded, mask)[:, :6], m.hidden(x),
                               atol=1e-5, rtol=1e-5)


def test_electra_loss_and_no_gradient_through_sampling():
    torch.manual_seed(0)
    m = Electra(ELECTRA_CFG)
    inputs, labels = masked_batch(0, torch.Generator().manual_seed(0))
    out = m(inputs, labels, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.loss, out.mlm_loss + 50.0 * out.rtd_loss)
    assert out.disc_logits.shape == (8, 16) and out.gen_logits.shape == (8, 16, V)
    masked = labels != -100
    assert (out.disc_labels[~masked] == 0).all()  # untouched positions are original
    replaced = out.disc_inputs != torch.where(masked, labels, inputs)
    assert torch.equal(out.disc_labels.bool(), replaced)
    # Generator and discriminator share one embedding table.
    assert m.gen_head.embedding.weight is m.embeddings.tok_emb.weight
    out.rtd_loss.backward()  # the detection loss must not reach the generator
    assert all(p.grad is None for p in m.generator.parameters())
    assert m.discriminator.blocks[0].ffn.linear1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["bert", "electra"])
def test_trains(kind):
    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=80, lr=1e-2, warmup_steps=5, progress=False)
    if kind == "bert":
        h = train(BERT(BERT_CFG), masked_batch, cfg)
    else:
        h = train(Electra(ELECTRA_CFG), masked_batch, cfg, loss_fn=electra_loss)
    assert sum(h.loss[-5:]) / 5 < 0.7 * sum(h.loss[:5]) / 5
