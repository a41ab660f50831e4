"""COLLATE loop: pair construction and the no-rationale filter, answer-likelihood scoring, the DPO
step (our fused kernel), distinct providers after stage 1 (full copies and LoRA adapters), a micro
end-to-end run, exact resume and the CLI."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from rationale_train import collate, runs
from rationale_train.cli import build_parser, main
from safetensors.torch import load_file

import rationale_kernels as rk

MICRO = dict(
    n_train=24, n_dev=6, n_test=6, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2,
    sft_epochs=2.0, sft_batch_size=8, rounds=2, dpo_batch_size=4, dpo_lr=5e-3,
    max_new_tokens=20, threads=1, lora_r=4,
)  # fmt: skip
HAS_PEFT = importlib.util.find_spec("peft") is not None


def micro(**kw):
    return collate.CollateConfig(**{**MICRO, **kw})


def losses(run_dir, phase):
    return [r["loss"] for r in runs.read_metrics(run_dir) if r.get("phase") == phase]


@pytest.fixture(autouse=True)
def _no_progress():
    runs.set_progress_enabled(False)
    yield
    runs.set_progress_enabled(None)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    runs.set_progress_enabled(False)
    run_dir = tmp_path_factory.mktemp("collate") / "run"
    result = collate.run_collate(micro(), run_dir)
    return run_dir, result


# ------------------------------------------------------------------------------- pairs


def test_pairs_best_vs_worst_and_filter():
    # q0: 3 candidates, best 2 (-0.5), worst 1 (-3); q1: ties only -> no pair;
    # q2: best -1.0 does not beat its no-rationale score -0.9 -> dropped; q3: a single candidate
    scores = torch.tensor([-1.0, -3.0, -0.5, -2.0, -2.0, -1.0, -4.0, -0.1])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    baseline = torch.tensor([-1.5, -5.0, -0.9, -5.0])
    all_pairs, kept = collate.build_pairs(scores, groups, baseline)
    assert all_pairs.tolist() == [[2, 1], [5, 6]]
    assert kept.tolist() == [[2, 1]]
    _, unfiltered = collate.build_pairs(scores, groups, None)
    assert unfiltered.tolist() == [[2, 1], [5, 6]]
    # equal to the baseline is not above it
    _, kept = collate.build_pairs(scores, groups, torch.tensor([-0.5, 0.0, -2.0, 0.0]))
    assert kept.tolist() == [[5, 6]]
    # no pairs at all
    p, k = collate.build_pairs(torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.0]))
    assert p.shape == (0, 2) and k.shape == (0, 2)


def test_format_prompt_modes():
    q = "Tom has 3 pens. (A) 1 (B) 2"
    assert collate.format_prompt("answer", q) == q + " Answer:"
    assert collate.format_prompt("rationale", q) == q + " Rationale:"
    assert collate.format_prompt("rationale_answer", q, " 3 - 1 = 2. ") == (
        q + " Rationale: 3 - 1 = 2. Answer:"
    )
    with pytest.raises(ValueError):
        collate.format_prompt("nope", q)


# ------------------------------------------------------------------------------- scoring


def _tiny():
    from pathlib import Path

    path = Path(__file__).with_name("_tiny_lm.py")
    spec = importlib.util.spec_from_file_location("_tiny_lm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.tiny_llama(vocab_size=40, hidden=32, layers=1, heads=4, seed=3)


def test_answer_logprobs_equal_direct_log_softmax():
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    rows = []
    for n_p, n_c in [(5, 2), (9, 4), (3, 1), (7, 3)]:
        p = torch.randint(4, 40, (n_p,), generator=g).tolist()
        c = torch.randint(4, 40, (n_c,), generator=g).tolist()
        rows.append((p, c))
    for average in (True, False):
        got = collate.answer_logprobs(model, rows, pad_id=0, batch_size=3, average=average)
        for i, (p, c) in enumerate(rows):
            with torch.no_grad():
                logits = model(torch.tensor([p + c])).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            tok = torch.tensor([lp[len(p) - 1 + t, c[t]] for t in range(len(c))])
            want = tok.mean() if average else tok.sum()
            assert got[i].item() == pytest.approx(want.item(), abs=1e-4)


@pytest.mark.parametrize("pairs", [[[0, 1], [2, 3]], [[0, 3], [2, 1]], [[3, 0], [1, 2]]])
def test_dpo_step_uses_fused_kernel_and_matches_reference(monkeypatch, pairs):
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    rows = [(torch.randint(4, 40, (4,), generator=g).tolist(),
             torch.randint(4, 40, (n,), generator=g).tolist()) for n in (3, 5, 2, 4)]  # fmt: skip
    pairs = torch.tensor(pairs)
    ref = torch.tensor([-9.0, -14.0, -6.0, -11.0])

    # reference loss and gradient from full logits
    ids, mask, labels = collate._pad_rows(rows, 0, "cpu")
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    logps = rk.sequence_logprobs(logits[:, :-1], labels[:, 1:], backend="torch")
    want, _ = rk.preference_loss(logps, ref, pairs, beta=0.1)
    want.backward()
    want_grad = model.model.layers[0].mlp.up_proj.weight.grad.clone()

    calls = []
    real = rk.fused_linear_dpo_loss

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(rk, "fused_linear_dpo_loss", spy)
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    st = collate.dpo_step(model, opt, rows, ref, pairs, pad_id=0, beta=0.1)
    assert len(calls) == 1 and calls[0]["beta"] == 0.1
    assert st["loss"] == pytest.approx(want.item(), rel=1e-5)
    got_grad = model.model.layers[0].mlp.up_proj.weight.grad
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_dpo_step_nll_coef_adds_chosen_token_mean_nll():
    model = _tiny()
    g = torch.Generator().manual_seed(2)
    rows = [(torch.randint(4, 40, (4,), generator=g).tolist(),
             torch.randint(4, 40, (n,), generator=g).tolist()) for n in (3, 5, 2, 4)]  # fmt: skip
    pairs = torch.tensor([[0, 3], [2, 1]])  # interleaved components
    ref = torch.tensor([-9.0, -14.0, -6.0, -11.0])
    ids, mask, labels = collate._pad_rows(rows, 0, "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    logps = rk.sequence_logprobs(logits[:, :-1], labels[:, 1:], backend="torch")
    dpo, _ = rk.preference_loss(logps, ref, pairs, beta=0.1)
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    y = labels[:, 1:]
    tok = [lp[i, t, y[i, t]] for i in (0, 2) for t in range(y.shape[1]) if y[i, t] != -100]
    nll = -torch.stack(tok).mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    st = collate.dpo_step(model, opt, rows, ref, pairs, pad_id=0, beta=0.1, nll_coef=0.5)
    assert st["nll"] == pytest.approx(nll.item(), rel=1e-4)
    assert st["loss"] == pytest.approx((dpo + 0.5 * nll).item(), rel=1e-4)
    assert "nll" not in collate.dpo_step(model, opt, rows, ref, pairs, pad_id=0, beta=0.1)


def test_training_calls_fused_dpo(monkeypatch, tmp_path):
    calls = []
    real = rk.fused_linear_dpo_loss

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(rk, "fused_linear_dpo_loss", spy)
    cfg = micro(n_train=12, rounds=1, sft_epochs=1.0)
    collate.run_collate(cfg, tmp_path / "run")
    n_dpo = sum(1 for r in runs.read_metrics(tmp_path / "run") if r.get("phase") == "dpo")
    assert n_dpo > 0 and len(calls) == n_dpo


# ------------------------------------------------------------------------------- runs


def test_run_folder_and_summary(full_run):
    run_dir, result = full_run
    assert result["status"] == "done"
    for name in ("config.json", "metrics.jsonl", "summary.md", "result.json", "eval.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "sft_model" / "config.json").is_file()
    for unit in ("stage1_p0", "stage1_p1", "round0_p0", "round0_p1", "round1_p0", "round1_p1"):
        assert (run_dir / "units" / unit / "done.json").is_file(), unit
        assert (run_dir / "units" / unit / "provider.safetensors").is_file(), unit
    summary = (run_dir / "summary.md").read_text()
    for text in ("SFT: I->A (no rationale)", "SFT: [I;R]->A, M_sft rationales", "COLLATE:",
                 "kept_fraction", "gap"):  # fmt: skip
        assert text in summary, text
    labels = [r["model"] for r in result["table"]]
    assert len(labels) == 3 and labels[2].startswith("COLLATE")
    for row in result["table"]:
        assert 0.0 <= row["accuracy"] <= 1.0
    rows = runs.read_metrics(run_dir)
    rounds = [r for r in rows if r["phase"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert r["candidates"] == 2 * micro().candidates_per_provider * r["questions"]
        assert 0.0 <= r["kept_fraction"] <= 1.0
        assert r["kept"] <= r["pairs"] <= r["questions"]
    stage1 = [r for r in rows if r["phase"] == "stage1"]
    assert sum(r["questions"] for r in stage1) == 24  # disjoint parts cover the rationale data
    sel = result["providers"]
    assert sum(p["selected"] for p in sel) == 1
    best = max(sel, key=lambda p: p["dev_answer_logprob"])
    assert best["selected"]


def test_round_pairs_follow_scores(full_run):
    run_dir, _ = full_run
    cand = json.loads((run_dir / "units" / "round0" / "candidates.json").read_text())
    scores = torch.tensor(cand["scores"])
    groups = torch.tensor(cand["group"])
    noR = torch.tensor(cand["no_rationale"])
    all_pairs, kept = collate.build_pairs(scores, groups, noR)
    assert all_pairs.tolist() == cand["pairs"] and kept.tolist() == cand["kept"]
    for c, r in cand["kept"]:
        assert cand["group"][c] == cand["group"][r]
        assert cand["scores"][c] > cand["scores"][r]
        assert cand["scores"][c] > cand["no_rationale"][cand["group"][c]]
    # the stored scores are the gold answer's likelihood under M_sft in [I;R]->A mode
    from rationale_train.models import load_model

    sft, tok = load_model(run_dir / "sft_model")
    T = collate._Tok(tok)
    train = collate.load_split(micro(), "train")
    j = 0
    e = train[cand["questions"][cand["group"][j]]]
    rows = collate._score_rows(T, [e], [cand["texts"][j]])
    assert collate.answer_logprobs(sft, rows, pad_id=T.pad)[0].item() == pytest.approx(
        cand["scores"][j], abs=1e-5
    )


def _provider_candidates(model, T, train):
    exs = train[:12]
    texts = collate._generate_rationales(model, T, exs, 2, temperature=1.0, top_p=1.0, seed=7,
                                         cfg=micro())  # fmt: skip
    rows = [(T.prompt(collate.format_prompt("rationale", e.question)), T.target("3 + 4 = 7."))
            for e in exs]  # fmt: skip
    return texts, collate.sequence_logps(model, rows, pad_id=T.pad)


def test_providers_differ_after_stage1(full_run):
    from rationale_train.models import load_model

    run_dir, _ = full_run
    w0 = load_file(str(run_dir / "units" / "stage1_p0" / "provider.safetensors"))
    w1 = load_file(str(run_dir / "units" / "stage1_p1" / "provider.safetensors"))
    assert w0.keys() == w1.keys()
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    sft, tok = load_model(run_dir / "sft_model")
    T = collate._Tok(tok)
    train = collate.load_split(micro(), "train")
    p = collate.Providers(sft, 2, "full")
    p.load(0, run_dir / "units" / "stage1_p0" / "provider.safetensors")
    p.load(1, run_dir / "units" / "stage1_p1" / "provider.safetensors")
    t0, l0 = _provider_candidates(p.model(0), T, train)
    t1, l1 = _provider_candidates(p.model(1), T, train)
    assert t0 != t1  # same prompts, same sampling seed: different candidates
    assert not torch.allclose(l0, l1)


@pytest.mark.skipif(not HAS_PEFT, reason="needs peft")
def test_lora_providers(tmp_path):
    cfg = micro(provider_mode="lora", rounds=1)
    result = collate.run_collate(cfg, tmp_path / "run")
    assert result["status"] == "done"
    a0 = load_file(str(tmp_path / "run" / "units" / "stage1_p0" / "provider.safetensors"))
    a1 = load_file(str(tmp_path / "run" / "units" / "stage1_p1" / "provider.safetensors"))
    assert a0 and all("lora_" in k for k in a0)  # adapters only, not the base
    assert any(not torch.equal(a0[k], a1[k]) for k in a0)
    assert any(bool(v.abs().sum() > 0) for k, v in a0.items() if "lora_B" in k)  # trained
    from rationale_train.models import load_model

    sft, tok = load_model(tmp_path / "run" / "sft_model")
    T = collate._Tok(tok)
    p = collate.Providers(sft, 2, "lora", lora_r=4, lora_targets=cfg.lora_targets)
    p.load(0, tmp_path / "run" / "units" / "stage1_p0" / "provider.safetensors")
    p.load(1, tmp_path / "run" / "units" / "stage1_p1" / "provider.safetensors")
    train = collate.load_split(cfg, "train")
    t0, l0 = _provider_candidates(p.model(0), T, train)
    t1, l1 = _provider_candidates(p.model(1), T, train)
    assert t0 != t1 and not torch.allclose(l0, l1)
    with p.base() as base:  # adapters disabled: M_sft itself
        _, lb = _provider_candidates(base, T, train)
    _, ls = _provider_candidates(sft, T, train)
    torch.testing.assert_close(lb, ls, rtol=1e-5, atol=1e-4)


def test_resume_gives_identical_losses(full_run, tmp_path):
    run_dir, result = full_run
    want_sft, want_dpo = losses(run_dir, "sft"), losses(run_dir, "dpo")
    n_stage1 = sum(1 for r in runs.read_metrics(run_dir) if r.get("phase") == "dpo"
                   and r["unit"].startswith("stage1"))  # fmt: skip
    other = tmp_path / "run"
    # stop inside SFT, then inside a stage-2 unit (after stage 1), then run to the end
    r1 = collate.run_collate(micro(), other, stop_after_sft_step=3)
    assert r1["status"] == "stopped"
    r2 = collate.run_collate(micro(), other, resume=True, stop_after_step=n_stage1 + 2)
    assert r2["status"] == "stopped"
    assert any((other / "units").glob("round0_p*/checkpoints/latest"))
    r3 = collate.run_collate(micro(), other, resume=True)
    assert r3["status"] == "done"
    assert losses(other, "sft") == want_sft
    assert losses(other, "dpo") == want_dpo
    assert [r["model"] for r in r3["table"]] == [r["model"] for r in result["table"]]
    assert [r["accuracy"] for r in r3["table"]] == [r["accuracy"] for r in result["table"]]
    phases = [r["phase"] for r in runs.read_metrics(other)]
    assert phases.count("round") == 2 and phases.count("stage1") == 2
    assert phases.count("start") == 1 and phases.count("done") == 1


def test_cli(tmp_path):
    parser = build_parser("collate")
    args = parser.parse_args(["collate", "--providers", "3", "--rounds", "1", "--provider-mode",
                              "lora", "--run-dir", str(tmp_path / "x")])  # fmt: skip
    cfg = collate.config_from_args(args)
    assert cfg.providers == 3 and cfg.rounds == 1 and cfg.provider_mode == "lora"
    assert cfg.beta == 0.1 and cfg.candidates_per_provider == 4
    flags = []
    for k, v in {**MICRO, "n_train": 12, "rounds": 1, "sft_epochs": 1.0}.items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    result = main(["collate", "--no-progress", "--run-dir", str(tmp_path / "cli"), *flags])
    assert result["status"] == "done"
    assert (tmp_path / "cli" / "summary.md").is_file()
    with pytest.raises(ValueError):
        collate.CollateConfig(providers=0)
