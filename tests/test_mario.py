"""MaRio loop: a micro end-to-end run (seconds), the pool, control codes in the training inputs,
the fused loss, loss decrease, exact resume, the run folder, eval and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rationale_train import mario, runs
from rationale_train.cli import build_parser, main
from rationale_train.quantize import control_token

import rationale_kernels as rk

MICRO = dict(
    n_train=24, n_test=6, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2,
    sft_epochs=2.0, sft_batch_size=8, rounds=2, steps_per_round=4, batch_size=8,
    max_new_tokens=24, eval_each_round=False, lr=3e-3, sft_lr=3e-3, threads=1,
)  # fmt: skip


def micro(**kw):
    return mario.MarioConfig(**{**MICRO, **kw})


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
    run_dir = tmp_path_factory.mktemp("mario") / "run"
    result = mario.run_mario(micro(), run_dir)
    return run_dir, result


def test_run_folder(full_run):
    run_dir, result = full_run
    assert result["status"] == "done"
    for name in ("config.json", "metrics.jsonl", "summary.md", "pool.jsonl", "result.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "sft_model" / "config.json").is_file()
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert {"model.safetensors", "optimizer.pt", "rng.pt", "meta.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["k"] == 5 and cfg["rewards"] == micro().rewards
    summary = (run_dir / "summary.md").read_text()
    assert "| SFT (reference, no codes)" in summary and "| MaRio (best codes)" in summary
    for name in ["accuracy", *micro().rewards]:
        assert name in summary
    rows = runs.read_metrics(run_dir)
    phases = [r["phase"] for r in rows]
    assert phases.count("sft") == math.ceil(2.0 * 24 / 8)
    assert phases.count("mario") == 2 * 4
    assert phases.count("round") == 2
    assert {"sft", "mario"} <= {r.get("model") for r in rows if r["phase"] == "eval"}
    for key in ("accuracy", *micro().rewards):
        assert key in result["sft"] and key in result["mario"]


def test_pool_grows_and_only_keeps_answers(full_run):
    run_dir, _ = full_run
    pool = mario.Pool.load(run_dir / "pool.jsonl")
    rounds = [r for r in runs.read_metrics(run_dir) if r["phase"] == "round"]
    assert rounds[0]["silver"] == 24  # round 0 adds every silver rationale
    size = 0
    for r in rounds:
        assert r["pool_size"] == size + r["kept"] + r["silver"]
        size = r["pool_size"]
    assert len(pool) == size
    for rec in pool.records:
        assert rec["answer"] is not None
        assert set(rec["rewards"]) == set(micro().rewards)


def test_sampling_filters_marker_and_codes_in_inputs(tmp_path, monkeypatch):
    """Patched sampler: half of the samples lack the answer marker and must not enter the pool;
    every policy input carries one control token per reward (matching the re-quantised pool), the
    reference input none; training goes through rk.fused_linear_rationale_loss."""
    from rationale_train import evaluate as ev

    calls = {"gen": [], "loss": 0, "steps": []}

    def fake_generate(model, tok, examples, code_ids=(), *, num_samples=1, **kw):
        if kw.get("temperature", 0.0) != 0.0:  # sampling (evaluation decodes greedily)
            calls["gen"].append(list(code_ids))
        return [[f" {ex.rationale} So the answer is (A).", "no marker here"] for ex in examples]

    real_loss = rk.fused_linear_rationale_loss

    def spy_loss(*args, **kw):
        calls["loss"] += 1
        calls["kl"] = (kw.get("kl_coef"), kw.get("kl_vocab"), kw.get("ref_hidden") is not None)
        return real_loss(*args, **kw)

    real_step = mario.train_step

    def spy_step(policy, opt, rows, **kw):
        if kw.get("ref_rows") is not None:  # MaRio steps (SFT steps have no reference)
            calls["steps"].append((rows, kw.get("ref_rows"), kw.get("pad_id")))
        return real_step(policy, opt, rows, **kw)

    def no_ce(*a, **k):
        raise AssertionError("training must not use a plain cross-entropy")

    monkeypatch.setattr(ev, "generate_targets", fake_generate)
    monkeypatch.setattr(rk, "fused_linear_rationale_loss", spy_loss)
    monkeypatch.setattr(mario, "train_step", spy_step)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", no_ce)
    cfg = micro(samples_per_question=2, rounds=2, steps_per_round=3, sft_epochs=1.0)
    run_dir = tmp_path / "run"
    res = mario.run_mario(cfg, run_dir)
    assert res["status"] == "done"

    pool = mario.Pool.load(run_dir / "pool.jsonl")
    n = cfg.n_train
    assert len(pool) == n + n + n  # silver + one kept sample per question per round
    assert all(r["answer"] == "(A)" for r in pool.records if r["source"] == "sample")
    rounds = [r for r in runs.read_metrics(run_dir) if r["phase"] == "round"]
    assert [(r["sampled"], r["kept"]) for r in rounds] == [(2 * n, n), (2 * n, n)]

    # round 0 samples from the reference without codes, round 1 with the best code
    _, tok, _ = mario.load_policy(run_dir, cfg)
    best = mario.best_code_ids(tok, cfg.rewards, cfg.k)
    assert calls["gen"][0] == [] and calls["gen"][1] == best

    ctrl_ids = {int(tok.convert_tokens_to_ids(t)) for t in mario._control_tokens(cfg)}
    assert min(ctrl_ids) == calls["kl"][1]  # KL over the original vocabulary only
    assert calls["kl"][0] == cfg.beta and calls["kl"][2]
    assert calls["loss"] >= len(calls["steps"]) == 2 * 3
    # codes of the last round's steps = the re-quantised pool's bins
    bins = pool.quantize(cfg.rewards, cfg.k, cfg.ties)
    codes_seen = set()
    for rows, ref_rows, _ in calls["steps"][3:]:
        for (p, t), (q, t2) in zip(rows, ref_rows):
            assert t == t2
            assert p[0] == tok.bos_token_id and q[0] == tok.bos_token_id
            code = p[1 : 1 + len(cfg.rewards)]
            assert all(c in ctrl_ids for c in code)
            assert p[1 + len(cfg.rewards) :] == q[1:]  # reference: same question, no codes
            assert not ctrl_ids & set(q)
            codes_seen.add(tuple(code))
    valid = {
        tuple(int(tok.convert_tokens_to_ids(control_token(nm, bins[nm][i]))) for nm in cfg.rewards)
        for i in range(len(pool))
    }
    assert codes_seen and codes_seen <= valid


def test_loss_decreases(tmp_path):
    cfg = micro(rounds=1, steps_per_round=16, sft_epochs=1.0, lr=5e-3, beta=0.05)
    mario.run_mario(cfg, tmp_path / "run")
    sft = losses(tmp_path / "run", "sft")
    mar = losses(tmp_path / "run", "mario")
    assert sft[-1] < sft[0]
    assert sum(mar[-4:]) / 4 < sum(mar[:4]) / 4


def test_resume_reproduces_losses(full_run, tmp_path):
    ref_dir, _ = full_run
    run_dir = tmp_path / "run"
    r1 = mario.run_mario(micro(), run_dir, stop_after_sft_step=3)  # stopped inside SFT
    assert r1["status"] == "stopped"
    assert len(losses(run_dir, "sft")) == 3
    r2 = mario.run_mario(micro(), run_dir, resume=True, stop_after_step=6)  # inside round 1
    assert r2["status"] == "stopped"
    assert len(losses(run_dir, "mario")) == 6
    # a crash after the checkpoint: records and pool rows past it must be dropped on resume
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"phase": "mario", "step": 99, "loss": 123.0}) + "\n")
    r3 = mario.run_mario(micro(), run_dir, resume=True)
    assert r3["status"] == "done"
    assert losses(run_dir, "sft") == losses(ref_dir, "sft")
    assert losses(run_dir, "mario") == losses(ref_dir, "mario")
    assert len(mario.Pool.load(run_dir / "pool.jsonl")) == len(
        mario.Pool.load(ref_dir / "pool.jsonl")
    )


def test_additive_variant_introduces_codes(tmp_path, monkeypatch):
    cfg = micro(variant="additive", additive_every=2, rounds=1, steps_per_round=6,
                sft_epochs=1.0,
                rewards=["plausibility", "diversity", "consistency", "correctness"])  # fmt: skip
    assert [len(mario._active_rewards(cfg, s)) for s in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]
    seen = []
    real_step = mario.train_step

    def spy_step(policy, opt, rows, **kw):
        if kw.get("ref_rows") is not None:
            seen.append(len(rows[0][0]) - len(kw["ref_rows"][0][0]))
        return real_step(policy, opt, rows, **kw)

    monkeypatch.setattr(mario, "train_step", spy_step)
    mario.run_mario(cfg, tmp_path / "run")
    assert seen == [1, 1, 2, 2, 3, 3]
    rows = [r for r in runs.read_metrics(tmp_path / "run") if r["phase"] == "mario"]
    assert [r["active"] for r in rows] == seen


def test_eval_command_on_checkpoint(full_run, tmp_path):
    run_dir, _ = full_run
    out = tmp_path / "eval.json"
    res = main(["eval", "--run-dir", str(run_dir), "--limit", "3", "--output", str(out),
                "--no-progress"])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["sft"]["metrics"]["n"] == 3 and data["mario"]["metrics"]["n"] == 3
    assert "step_" in data["mario"]["checkpoint"]
    assert "accuracy" in res["table"]
    # the MaRio row equals the run's own final evaluation on those examples
    preds = json.loads((run_dir / "result.json").read_text())
    assert set(preds["mario"]) >= {"accuracy", "plausibility"}


def test_cli_parsing_and_config_override(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('k = 3\nbeta = 0.2\nrewards = ["plausibility", "correctness"]\n'
                    '[mario]\nk = 4\nbeta = 0.3\nvariant = "additive"\n')  # fmt: skip
    parser = build_parser("mario")
    args = parser.parse_args(["mario", "--config", str(toml), "--beta", "0.5", "--rounds", "2",
                              "--no-eval-each-round", "--threads", "none"])  # fmt: skip
    args.config_values = runs.read_config_file(args.config, section="mario")
    args.resume = False
    cfg = mario.config_from_args(args)
    assert (cfg.k, cfg.beta, cfg.variant, cfg.rounds) == (4, 0.5, "additive", 2)
    assert cfg.eval_each_round is False and cfg.threads is None
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"rewards": "correctness,plausibility", "top-p": 0.9}))
    args = parser.parse_args(["mario", "--rewards", "diversity", "correctness"])
    args.config_values = runs.read_config_file(js)
    args.resume = False
    cfg = mario.config_from_args(args)
    assert cfg.rewards == ["diversity", "correctness"] and cfg.top_p == 0.9
    args = parser.parse_args(["mario"])
    args.config_values, args.resume = None, False
    assert mario.config_from_args(args) == mario.MarioConfig()
    with pytest.raises(ValueError):
        runs.build_config(mario.MarioConfig, file_values={"no_such_option": 1})
    with pytest.raises(ValueError):
        mario.MarioConfig(rewards=["nope"])
    with pytest.raises(SystemExit):
        parser.parse_args(["mario", "--variant", "other"])


def test_missing_command_module_message(monkeypatch):
    from rationale_train import cli

    monkeypatch.setitem(cli.COMMANDS, "collate", cli._Command("rationale_train._no_such_module"))
    with pytest.raises(SystemExit, match="not implemented"):
        main(["collate"])


def test_cli_sft_and_mario_commands(tmp_path):
    flags = ["--n-train", "16", "--n-test", "4", "--vocab-size", "300", "--hidden-size", "32",
             "--num-layers", "1", "--num-heads", "2", "--sft-epochs", "1", "--sft-batch-size", "8",
             "--max-new-tokens", "16", "--no-progress"]  # fmt: skip
    res = main(["sft", "--run-dir", str(tmp_path / "sft"), *flags])
    assert res["status"] == "done" and res["mario"] is None and "accuracy" in res["sft"]
    assert not (tmp_path / "sft" / "checkpoints").exists()
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"rounds": 1, "steps_per_round": 2, "batch_size": 4}))
    res = main(["mario", "--run-dir", str(tmp_path / "m"), "--config", str(cfg), *flags])
    assert res["status"] == "done" and res["steps"] == 2
    assert json.loads((tmp_path / "m" / "config.json").read_text())["batch_size"] == 4
    with pytest.raises(FileExistsError):
        main(["mario", "--run-dir", str(tmp_path / "m"), *flags])


def test_pool_quantize_ties():
    recs = [{"rewards": {"plausibility": v, "correctness": c}}
            for v, c in [(1.0, 1.0), (1.0, 0.0), (1.0, 1.0), (0.5, 1.0), (0.0, 0.0)]]  # fmt: skip
    pool = mario.Pool(recs)
    pool_bins = pool.quantize(["plausibility", "correctness"], 5)
    assert pool_bins["plausibility"] == [0, 1, 2, 3, 4]  # Quark: ties split by pool order
    assert pool_bins["correctness"] == [0, 1, 0, 0, 1]
    best = pool.quantize(["plausibility", "correctness"], 5, ties="best")
    assert best["plausibility"] == [0, 0, 0, 3, 4]
