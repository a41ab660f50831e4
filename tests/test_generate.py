"""generate_candidates on a tiny random Llama with a character-level tokenizer (built locally)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rationale_train.generate import Candidates, _cache_repeat, _cache_select, generate_candidates

_spec = importlib.util.spec_from_file_location("_tiny_lm", Path(__file__).with_name("_tiny_lm.py"))
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

PROMPTS = ["hello", "a much longer prompt, with words", "x", "what is 2+3? "]
EOS = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: thread synchronisation is all that 2 threads add, and on a busy
    machine it made single calls 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny.tiny_llama(vocab_size=len(tok))


def greedy(model, tok, prompts=PROMPTS, **kw):
    kw.setdefault("max_new_tokens", 16)
    return generate_candidates(model, tok, prompts, 1, temperature=0.0, **kw)


def hf_greedy(model, tok, prompts, max_new_tokens, eos_token_id):
    enc = tok(prompts, return_tensors="pt", padding=True)  # left padding
    assert tok.padding_side == "left"
    with torch.no_grad():
        out = model.generate(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False,
            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    rows = []
    for r in out[:, enc["input_ids"].shape[1] :].tolist():
        if eos_token_id in r:
            r = r[: r.index(eos_token_id) + 1]
        rows.append(r)
    return rows


def test_greedy_matches_hf_generate(model, tok):
    n = 20
    # an EOS the greedy path reaches in some rows but not all: the rows stop there, like HF's
    plain = greedy(model, tok, max_new_tokens=n, ignore_eos=True)
    eos = plain.tokens(1)[6]
    for eos_id in (EOS, eos):
        ours = greedy(model, tok, max_new_tokens=n, eos_token_id=eos_id)
        ref = hf_greedy(model, tok, PROMPTS, n, eos_id)
        for r in range(len(PROMPTS)):
            assert ours.tokens(r) == ref[r], (eos_id, r)
            stopped = len(ref[r]) < n or ref[r][-1] == eos_id
            assert ours.finish_reason[r] == ("eos" if stopped else "length")
    assert ours.finish_reason[1] == "eos" and ours.lengths[1] <= 7


@pytest.mark.parametrize("arch", ["gpt2", "bloom", "gemma2"])
def test_greedy_matches_hf_other_architectures(tok, arch):
    """Absolute learned positions (position ids matter under left padding), ALiBi models whose
    forward takes no position ids, sliding-window layers with prompts longer than the window."""
    m = tiny.tiny_other(arch, len(tok))
    prompts = PROMPTS + ["abcdefghijklmnopqrst"]
    with torch.no_grad():
        cache = m(input_ids=torch.tensor([[1, 4, 5]]), use_cache=True).past_key_values
    if getattr(cache, "max_cache_len", None) is not None:  # old transformers' Gemma-2
        with pytest.raises(NotImplementedError, match="growing cache"):
            greedy(m, tok, prompts=prompts, max_new_tokens=14)
        return
    ours = greedy(m, tok, prompts=prompts, max_new_tokens=14, eos_token_id=EOS)
    ref = hf_greedy(m, tok, prompts, 14, EOS)
    assert [ours.tokens(r) for r in range(len(prompts))] == ref


def test_result_layout(model, tok):
    c = generate_candidates(model, tok, PROMPTS, 3, 8, seed=1, ignore_eos=True)
    assert isinstance(c, Candidates) and len(c) == 12 and c.num_prompts == 4
    assert c.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert c.token_ids.shape == (12, 8) and c.token_ids.dtype == torch.int64
    assert c.logprobs.shape == (12, 8) and c.logprobs.dtype == torch.float32
    assert c.lengths.tolist() == [8] * 12 and c.finish_reason == ["length"] * 12
    assert not c.finished.any()
    assert c.texts == tok.batch_decode(c.token_ids.tolist(), skip_special_tokens=True)
    assert [len(g) for g in c.texts_by_prompt()] == [3, 3, 3, 3]
    torch.testing.assert_close(c.sequence_logprobs(), c.logprobs.sum(-1))
    # usable in autograd afterwards (not inference-mode tensors)
    assert not any(t.is_inference() for t in (c.token_ids, c.lengths, c.logprobs, c.prompt_index))
    w = torch.zeros(len(tok), requires_grad=True)
    (w[c.token_ids] * c.logprobs).sum().backward()


def test_prefill_once(model, tok):
    """Each prompt is prefilled once (not once per candidate); then one token per row per step."""
    calls = []

    def hook(mod, args, kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))

    h = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        N, n = 5, 6
        generate_candidates(model, tok, PROMPTS, N, n, seed=0, ignore_eos=True)
    finally:
        h.remove()
    T = max(len(x) for x in tok(PROMPTS)["input_ids"])
    assert calls[0] == (len(PROMPTS), T)
    assert calls[1:] == [(len(PROMPTS) * N, 1)] * (n - 1)
    assert sum(a * b for a, b in calls) == len(PROMPTS) * T + len(PROMPTS) * N * (n - 1)


def test_eos_stops_row(model, tok):
    plain = greedy(model, tok, ignore_eos=True)
    # a token that row 0 emits first at step k >= 2
    row = plain.tokens(0)
    k = next(i for i in range(2, len(row)) if row[i] not in row[:i])
    eos = row[k]
    c = greedy(model, tok, eos_token_id=[eos, 60000])  # a list; an id that never occurs
    assert c.tokens(0) == row[: k + 1] and c.finish_reason[0] == "eos"
    assert c.lengths[0] == k + 1
    assert (c.token_ids[0, k + 1 :] == tok.pad_token_id).all()
    assert (c.logprobs[0, k + 1 :] == 0).all()
    assert c.texts[0] == tok.decode(row[:k])  # the EOS is not in the text
    for r in range(1, len(PROMPTS)):  # the other rows stop at their own first `eos`, or never
        full = plain.tokens(r)
        expect = full[: full.index(eos) + 1] if eos in full else full
        assert c.tokens(r) == expect


def test_default_eos_from_generation_config(model, tok):
    plain = greedy(model, tok, ignore_eos=True)
    eos = plain.tokens(2)[3]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [eos]
    try:
        c = greedy(model, tok)
    finally:
        model.generation_config.eos_token_id = old
    assert c.finish_reason[2] == "eos" and c.tokens(2)[-1] == eos


def test_stop_strings(model, tok):
    plain = greedy(model, tok, max_new_tokens=24, ignore_eos=True)
    text = plain.texts[1]
    # a 2-character stop string first occurring at position p >= 3 of row 1's text
    p = next(i for i in range(3, len(text) - 2) if text.find(text[i : i + 2]) == i)
    stop = text[p : p + 2]
    c = greedy(model, tok, max_new_tokens=24, ignore_eos=True, stop_strings=["@@@", stop])
    assert c.finish_reason[1] == "stop"
    assert c.texts[1] == text[:p]
    assert c.tokens(1) == plain.tokens(1)[: p + 2]  # one token per character
    c2 = greedy(
        model, tok, max_new_tokens=24, ignore_eos=True, stop_strings=stop,
        include_stop_str_in_output=True,
    )  # fmt: skip
    assert c2.texts[1] == text[: p + 2]
    for r in range(len(PROMPTS)):
        t = plain.texts[r]
        if stop in t:
            assert c.texts[r] == t[: t.index(stop)] and c.finish_reason[r] == "stop"
        else:
            assert c.texts[r] == t and c.finish_reason[r] == "length"


def test_padding_alone_vs_batched(model, tok):
    alone = greedy(model, tok, prompts=["hello"])
    batched = greedy(model, tok, prompts=[PROMPTS[1], "hello", "y" * 40])
    assert alone.tokens(0) == batched.tokens(1)
    # chunked, length-sorted processing gives the same results in the prompts' order
    full = greedy(model, tok, ignore_eos=True)
    chunked = greedy(model, tok, ignore_eos=True, batch_size=1)
    assert torch.equal(full.token_ids, chunked.token_ids)
    two = greedy(model, tok, ignore_eos=True, batch_size=3)
    assert torch.equal(full.token_ids, two.token_ids)


def _teacher_forced_logprobs(model, tok, prompt, ids, temperature=1.0):
    p = tok(prompt)["input_ids"]
    x = torch.tensor([p + ids])
    with torch.no_grad():
        logits = model(x).logits[0, len(p) - 1 : -1].double()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forcing(model, tok, temperature):
    N = 3
    c = generate_candidates(
        model, tok, PROMPTS, N, 12, temperature=temperature, seed=3, eos_token_id=[5, 6, 7]
    )
    assert set(c.finish_reason) >= {"eos"}  # some rows stop early (exercises compaction too)
    for r in range(len(c)):
        ids = c.tokens(r)
        ref = _teacher_forced_logprobs(model, tok, PROMPTS[r // N], ids, temperature)
        torch.testing.assert_close(c.logprobs[r, : len(ids)].double(), ref, atol=2e-4, rtol=1e-4)


def test_compaction_does_not_change_greedy(model, tok):
    kw = dict(max_new_tokens=16, eos_token_id=[5, 6, 7, 8, 9])
    a = generate_candidates(model, tok, PROMPTS, 2, temperature=0.0, compact_fraction=0.0, **kw)
    b = generate_candidates(model, tok, PROMPTS, 2, temperature=0.0, compact_fraction=1.0, **kw)
    assert len(set(a.lengths.tolist())) > 1
    assert torch.equal(a.token_ids, b.token_ids) and a.finish_reason == b.finish_reason
    torch.testing.assert_close(a.logprobs, b.logprobs)


def test_seed_reproduces(model, tok):
    kw = dict(temperature=1.0, top_k=20, top_p=0.9, ignore_eos=True)
    a = generate_candidates(model, tok, PROMPTS, 4, 10, seed=7, **kw)
    b = generate_candidates(model, tok, PROMPTS, 4, 10, seed=7, **kw)
    c = generate_candidates(model, tok, PROMPTS, 4, 10, seed=8, **kw)
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.token_ids, c.token_ids)
    nolp = generate_candidates(model, tok, PROMPTS, 4, 10, seed=7, return_logprobs=False, **kw)
    assert nolp.logprobs is None and torch.equal(nolp.token_ids, a.token_ids)
    with pytest.raises(ValueError, match="return_logprobs"):
        nolp.sequence_logprobs()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    d = generate_candidates(model, tok, PROMPTS, 4, 10, generator=g1, **kw)
    e = generate_candidates(model, tok, PROMPTS, 4, 10, generator=g2, **kw)
    assert torch.equal(d.token_ids, e.token_ids)
    # candidates of one prompt differ from each other
    assert len({tuple(d.tokens(r)) for r in range(4)}) > 1


def test_filters_respected(model, tok):
    """top_k=1 is greedy; per-prompt parameters apply to their own prompt's rows."""
    g = greedy(model, tok, ignore_eos=True)
    k1 = generate_candidates(model, tok, PROMPTS, 2, 16, top_k=1, seed=0, ignore_eos=True)
    assert torch.equal(k1.token_ids[::2], g.token_ids)
    assert torch.equal(k1.token_ids[1::2], g.token_ids)
    m1 = generate_candidates(model, tok, PROMPTS, 2, 16, min_p=1.0, seed=0, ignore_eos=True)
    assert torch.equal(m1.token_ids[::2], g.token_ids)
    tp = generate_candidates(model, tok, PROMPTS, 2, 16, top_p=1e-6, seed=0, ignore_eos=True)
    assert torch.equal(tp.token_ids[1::2], g.token_ids)
    temps = torch.tensor([0.0, 1.0, 0.0, 1.0])
    c = generate_candidates(model, tok, PROMPTS, 2, 16, temperature=temps, seed=0, ignore_eos=True)
    for p in (0, 2):
        assert c.tokens(2 * p) == g.tokens(p) and c.tokens(2 * p + 1) == g.tokens(p)
    assert torch.equal(c.logprobs[0], torch.zeros(16))  # greedy: a point mass


def test_token_id_prompts_and_no_pad_token(model, tok):
    ids = tok(PROMPTS)["input_ids"]
    a = greedy(model, tok, ignore_eos=True)
    b = greedy(model, tok, prompts=ids, ignore_eos=True)
    assert torch.equal(a.token_ids, b.token_ids)
    nopad = tiny.tiny_tokenizer()
    nopad.pad_token = None
    assert nopad.pad_token_id is None
    c = greedy(model, nopad, ignore_eos=True)
    assert torch.equal(a.token_ids, c.token_ids) and c.pad_token_id == nopad.eos_token_id


def test_zero_new_tokens_and_modes(model, tok):
    model.train()
    try:
        c = generate_candidates(model, tok, PROMPTS, 2, 0)
        assert model.training  # restored
        assert c.token_ids.shape == (8, 0) and c.texts == [""] * 8
        assert c.finish_reason == ["length"] * 8
        d = generate_candidates(model, tok, PROMPTS, 1, 4, temperature=0.0, ignore_eos=True)
        assert model.training
    finally:
        model.eval()
    assert torch.equal(d.token_ids, greedy(model, tok, max_new_tokens=4, ignore_eos=True).token_ids)


def test_backends_agree_greedy(model, tok):
    a = greedy(model, tok, backend="torch", ignore_eos=True)
    b = greedy(model, tok, backend="auto", ignore_eos=True)
    assert torch.equal(a.token_ids, b.token_ids)


def test_legacy_tuple_cache_helpers():
    k = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    cache = ((k, k + 1), (k + 2, k + 3))
    rep = _cache_repeat(cache, 3)
    assert rep[1][0].shape == (6, 3, 4, 5)
    assert torch.equal(rep[0][1][4], (k + 1)[1])
    sel = _cache_select(rep, torch.tensor([0, 5]))
    assert torch.equal(sel[1][1][1], (k + 3)[1])
    with pytest.raises(TypeError, match="batch_repeat_interleave"):
        _cache_repeat(object(), 2)

    class OldCache:  # a Cache of old transformers: legacy conversion only
        def __init__(self, legacy):
            self.legacy = legacy

        def to_legacy_cache(self):
            return self.legacy

        @classmethod
        def from_legacy_cache(cls, legacy):
            return cls(legacy)

    old = _cache_select(_cache_repeat(OldCache(cache), 3), torch.tensor([0, 5]))
    assert isinstance(old, OldCache) and torch.equal(old.legacy[1][1][1], (k + 3)[1])


def test_bad_inputs(model, tok):
    with pytest.raises(ValueError, match="prompts is empty"):
        generate_candidates(model, tok, [], 2, 4)
    with pytest.raises(TypeError, match="list of strings"):
        generate_candidates(model, tok, "hello", 2, 4)
    with pytest.raises(ValueError, match="num_candidates"):
        generate_candidates(model, tok, PROMPTS, 0, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_candidates(model, tok, PROMPTS, 2, -1)
    with pytest.raises(ValueError, match="batch_size"):
        generate_candidates(model, tok, PROMPTS, 2, 4, batch_size=0)
    with pytest.raises(ValueError, match="seed or generator"):
        generate_candidates(model, tok, PROMPTS, 2, 4, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="top_p"):
        generate_candidates(model, tok, PROMPTS, 2, 4, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate_candidates(model, tok, PROMPTS, 2, 4, temperature=-1.0)
    with pytest.raises(ValueError, match="one value per prompt"):
        generate_candidates(model, tok, PROMPTS, 2, 4, temperature=torch.ones(3))
    with pytest.raises(ValueError, match="stop_strings"):
        generate_candidates(model, tok, PROMPTS, 2, 4, stop_strings=[""])
    with pytest.raises(TypeError, match="mixed"):
        generate_candidates(model, tok, ["ab", [1, 4]], 2, 4)
    with pytest.raises(ValueError, match="empty after tokenisation"):
        generate_candidates(model, tok, ["ab", ""], 2, 4, add_special_tokens=False)
    with pytest.raises(ValueError, match="encoder-decoder"):
        generate_candidates(_EncoderDecoder(), tok, PROMPTS, 2, 4)
    with pytest.raises(TypeError, match="not a causal LM"):
        generate_candidates(model.model, tok, PROMPTS, 2, 4)  # the base model: no logits
    with pytest.raises(TypeError, match="callable"):
        generate_candidates(None, tok, PROMPTS, 2, 4)


class _EncoderDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(is_encoder_decoder=True)
