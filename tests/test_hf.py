"""GPT-2 interop: llmcore's GPT against Hugging Face's GPT2LMHeadModel (same logits,
both ways), and GPT-2's tokenizer files read by llmcore's BPE (against
transformers' GPT2Tokenizer). No download: every model and vocabulary is made here."""

import json
import random

import pytest
import torch

from llmcore.data import load_corpus
from llmcore.models import hf
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.tokenizer import BPETokenizer
from llmcore.tokenizer.gpt2 import (GPT2_PATTERN, byte_to_unicode, gpt2_tokenizer,
                                    load_gpt2_files)

transformers = pytest.importorskip("transformers")
pytest.importorskip("regex")  # GPT-2's pre-tokenizer has Unicode classes


def random_gpt2(seed=0, **kw):
    """A small GPT2LMHeadModel whose biases and LayerNorms are not their defaults."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**{
        "vocab_size": 97, "n_positions": 24, "n_embd": 48, "n_layer": 3, "n_head": 6,
        "bos_token_id": None, "eos_token_id": None, **kw})
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def logits_hf(model, idx):
    with torch.no_grad():
        return model(idx).logits


def logits_llmcore(model, idx):
    with torch.no_grad():
        return model.eval()(idx)[0]


IDX = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_from_hf_computes_the_same_logits(activation):
    ref = random_gpt2(activation_function=activation, layer_norm_epsilon=1e-3)
    mine = GPT.from_hf(ref)
    assert mine.config.activation == hf.ACTIVATIONS[activation]
    assert mine.config.norm_eps == 1e-3 and mine.config.n_head == 6
    torch.testing.assert_close(logits_llmcore(mine, IDX), logits_hf(ref, IDX),
                               atol=1e-4, rtol=0)
    # the KV-cache path reads the same weights
    caches = mine.new_kv_caches()
    with torch.no_grad():
        first = mine(IDX[:, :10], kv_caches=caches)[0]
        rest = mine(IDX[:, 10:], kv_caches=caches)[0]
    torch.testing.assert_close(torch.cat([first, rest], 1), logits_hf(ref, IDX),
                               atol=1e-4, rtol=0)


def test_round_trip_to_hf_and_back():
    ref = random_gpt2(seed=2)
    back = GPT.from_hf(ref).to_hf().eval()
    assert isinstance(back, transformers.GPT2LMHeadModel)
    torch.testing.assert_close(logits_hf(back, IDX), logits_hf(ref, IDX), atol=1e-4,
                               rtol=0)
    for name, t in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], t, atol=0, rtol=0)
    assert back.lm_head.weight is back.transformer.wte.weight  # still tied


def test_a_state_dict_with_or_without_its_config():
    ref = random_gpt2(seed=3)
    sd = ref.state_dict()
    with_config = GPT.from_hf(sd, ref.config)
    torch.testing.assert_close(logits_llmcore(with_config, IDX), logits_hf(ref, IDX),
                               atol=1e-4, rtol=0)
    # Without a config: GPT-2's heads of 64, its GELU and epsilon.
    ref = random_gpt2(seed=4, n_embd=128, n_head=2)
    bare = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items()
            if k != "lm_head.weight"}  # GPT2Model's names
    mine = GPT.from_hf(bare)
    assert (mine.config.n_head, mine.config.activation) == (2, "gelu_tanh")
    torch.testing.assert_close(logits_llmcore(mine, IDX), logits_hf(ref, IDX),
                               atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="multiple of GPT-2's head size 64"):
        GPT.from_hf(random_gpt2().state_dict())  # 48 wide: the heads are unknown


def test_an_llmcore_gpt_without_biases_exports_with_zero_biases():
    torch.manual_seed(0)
    mine = GPT(GPTConfig(97, 24, 2, 4, 32, activation="gelu_tanh"))  # bias=False
    theirs = mine.to_hf().eval()
    torch.testing.assert_close(logits_hf(theirs, IDX), logits_llmcore(mine, IDX),
                               atol=1e-4, rtol=0)
    assert not theirs.transformer.h[0].attn.c_attn.bias.any()


def test_what_llmcore_cannot_compute_is_refused():
    with pytest.raises(ValueError, match="n_inner=100"):
        GPT.from_hf(random_gpt2(n_inner=100))
    with pytest.raises(ValueError, match="activation_function='relu'"):
        GPT.from_hf(random_gpt2(activation_function="relu"))
    untied = random_gpt2(tie_word_embeddings=False)
    with torch.no_grad():
        untied.lm_head.weight.add_(1.0)
    with pytest.raises(ValueError, match="not tied"):
        GPT.from_hf(untied)
    with pytest.raises(ValueError, match="not a GPT-2 state dict"):
        GPT.from_hf({"weight": torch.zeros(2)})


def test_from_pretrained_offline_says_what_it_needs(monkeypatch, tmp_path):
    from huggingface_hub import constants
    # huggingface_hub reads its environment once, when imported (transformers was,
    # above): offline mode and an empty cache are set where it looks for them.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="needs a network connection"):
        GPT.from_pretrained("gpt2")
    with pytest.raises(RuntimeError, match="needs a network connection"):
        gpt2_tokenizer("gpt2")


# ------------------------------------------------------------ GPT-2's tokenizer files

def spell(data: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in data)


def write_files(folder, vocab: dict, merges: list[str]):
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                       encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def test_a_hand_made_vocabulary(tmp_path):
    # GPT-2's layout: the 256 bytes in its order (printable ones first), the merges,
    # then <|endoftext|>; " the" is spelled "Ġthe".
    table = byte_to_unicode()
    alphabet = sorted(table.values(), key=lambda c: (ord(c) >= 256, ord(c)))
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = ["Ġ t", "h e", "Ġt he", "c a", "ca t"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = load_gpt2_files(*write_files(tmp_path, vocab, merges))
    assert tok.vocab_size == 262 and tok.special_tokens == {"<|endoftext|>": 261}
    ids = tok.encode("the cat the<|endoftext|>")
    # "the" (no space) has "h e" but no "t he": t, he; " cat": Ġ, cat; " the": Ġthe
    assert ids == [vocab["t"], vocab["he"], vocab["Ġ"], vocab["cat"], vocab["Ġthe"],
                   261]
    assert tok.decode(ids) == "the cat the<|endoftext|>"
    assert vocab["t"] == ord("t") - ord("!")  # GPT-2's ids, not the byte values
    saved = tmp_path / "tok.json"
    tok.save(saved)
    assert BPETokenizer.load(saved).encode("the cat") == tok.encode("the cat")


def test_files_that_do_not_belong_together_are_refused(tmp_path):
    vocab = {c: i for i, c in enumerate(byte_to_unicode().values())}
    with pytest.raises(ValueError, match="no earlier line builds"):
        load_gpt2_files(*write_files(tmp_path, vocab, ["t he"]))
    with pytest.raises(ValueError, match="no id for 1 tokens"):
        load_gpt2_files(*write_files(tmp_path, vocab, ["h e"]))
    del vocab["a"]
    with pytest.raises(ValueError, match="no id for 1 tokens"):
        load_gpt2_files(*write_files(tmp_path, vocab, []))


def test_a_random_vocabulary_encodes_as_gpt2tokenizer_does(tmp_path):
    text = load_corpus("shakespeare")[:20_000]
    text += " x² ½ Ⅻ ٣ naïve café 🙂 don't we'll _a__b 123  \n\n\t x"
    learned = BPETokenizer.train(text, 420, pattern=GPT2_PATTERN)
    tokens = [spell(learned.token_bytes(i)) for i in range(learned.vocab_size)]
    tokens.append("<|endoftext|>")
    order = list(range(len(tokens)))
    random.Random(0).shuffle(order)  # ids in no particular order
    vocab = {t: order[i] for i, t in enumerate(tokens)}
    merges = [f"{spell(learned.vocab[a])} {spell(learned.vocab[b])}"
              for a, b in learned.merges]
    files = write_files(tmp_path, vocab, merges)
    mine = load_gpt2_files(*files)
    theirs = transformers.GPT2Tokenizer(*map(str, files))
    probes = [text[-4000:], "Hello world<|endoftext|>x² ½ Ⅻ don't  \n\n x",
              "   \t a\r\nb 3.14 e=mc²", "日本語のテキスト、句読点。"]
    for s in probes:
        ids = mine.encode(s)
        assert ids == theirs.encode(s)
        assert mine.decode(ids) == theirs.decode(ids) == s
