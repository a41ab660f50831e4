"""Scale-out under torchrun on the CPU (gloo, 2 processes): a data-parallel step equals the
one-process step on the same global batch (DDP and FSDP2); tiny ``mario`` / ``collate`` runs write
one run folder; a 2-process checkpoint resumes in one process; a failing rank stops the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
WORKER = HERE / "_dist_worker.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", RATIONALE_TRAIN_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def torchrun(nproc, *args, timeout=600, check=True, cwd=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *map(str, args)]  # fmt: skip
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stdout[-4000:]}\n"
                             f"{p.stderr[-8000:]}")  # fmt: skip
    return p


def plain(*args, timeout=600):
    p = subprocess.run([sys.executable, *map(str, args)], env=_env(), capture_output=True,
                       text=True, timeout=timeout)  # fmt: skip
    if p.returncode != 0:
        raise AssertionError(f"failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
    return p


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process step of each kind, on the full global batch."""
    d = tmp_path_factory.mktemp("single")
    out = {}
    for kind in ("mario", "dpo"):
        plain(WORKER, kind, "ddp", d / f"{kind}.pt")
        out[kind] = torch.load(d / f"{kind}.pt")
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", ["mario", "dpo"])
def test_two_process_step_equals_one_process(kind, mode, one_process, tmp_path):
    torchrun(2, WORKER, kind, mode, tmp_path / "two.pt")
    got, want = torch.load(tmp_path / "two.pt"), one_process[kind]
    assert set(got["state"]) >= set(want["state"]) - {"lm_head.weight"}
    moved = 0
    for k, v in want["state"].items():
        if k not in got["state"]:
            continue
        torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        moved += 1
    assert moved >= 10
    for k, v in want["stats"].items():
        assert got["stats"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


MARIO = dict(
    n_train=24, n_test=6, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2,
    sft_epochs=2.0, sft_batch_size=8, rounds=2, steps_per_round=4, batch_size=8,
    max_new_tokens=24, eval_each_round=False, lr=3e-3, sft_lr=3e-3, threads=1,
)  # fmt: skip
COLLATE = dict(
    n_train=24, n_dev=6, n_test=6, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2,
    sft_epochs=2.0, sft_batch_size=8, rounds=1, dpo_batch_size=4, dpo_lr=5e-3,
    max_new_tokens=20, threads=1, eval_each_round=False,
)  # fmt: skip


def _config(path, values):
    import json

    path.write_text(json.dumps(values))
    return path


def _losses(run_dir, phase):
    from rationale_train import runs

    return {r["step"]: r["loss"] for r in runs.read_metrics(run_dir) if r.get("phase") == phase}


def _resume_one_and_two(command, one, two, phase, stop, *two_args):
    """Copy the stopped run ``one`` to ``two``, resume ``one`` in one process and ``two`` in 2
    (with ``two_args``) up to step ``stop``: the two runs' ``phase`` losses by step."""
    import shutil

    shutil.copytree(one, two)
    plain("-m", "rationale_train", command, "--run-dir", one, "--resume", "--stop-after-step", stop)
    torchrun(2, "-m", "rationale_train", command, "--run-dir", two, "--resume", *two_args,
             "--stop-after-step", stop)  # fmt: skip
    return _losses(one, phase), _losses(two, phase)


def _worker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dist_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fsdp_checkpoint_loads_in_one_process(tmp_path):
    """Two FSDP ranks write their shards of a checkpoint (torch.distributed.checkpoint, nothing
    gathered); a process without a process group loads it: the weights are the gathered ones bit
    for bit, the optimizer's settings are the saved ones, and each parameter's momentum buffer is
    its own first step, (before - after) / lr.
    A model of another shape is refused with a ValueError naming the tensor."""
    from rationale_train.checkpoint import latest_checkpoint, load_checkpoint

    torchrun(2, WORKER, "mario", "fsdp", tmp_path / "two.pt", tmp_path / "run")
    ck = latest_checkpoint(tmp_path / "run")
    assert (ck / "dcp").is_dir() and not (ck / "model.safetensors").exists()
    w = _worker()
    tok = w.train_tokenizer(w.TEXTS, vocab_size=300)
    before, model = w.tiny(0, tok), w.tiny(7, tok)
    opt = torch.optim.SGD(model.parameters(), lr=w.LR / 4, momentum=0.5)
    assert load_checkpoint(tmp_path / "run", model, opt)["step"] == 1
    assert opt.param_groups[0]["lr"] == w.LR and opt.param_groups[0]["momentum"] == 0.9
    after = model.state_dict()
    for k, v in torch.load(tmp_path / "two.pt")["state"].items():
        assert torch.equal(after[k], v), k
    old = dict(before.named_parameters())
    for n, p in model.named_parameters():
        buf = opt.state[p]["momentum_buffer"]
        assert torch.allclose(buf, (old[n] - p.detach()) / w.LR, rtol=1e-4, atol=1e-6), n
    other = w.tiny_llama(tok, hidden_size=48, num_layers=2, num_heads=4, seed=0)
    with pytest.raises(ValueError, match="does not fit this model.*embed_tokens"):
        load_checkpoint(tmp_path / "run", other)


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def mario_two(request, tmp_path_factory):
    """A tiny MaRio run under torchrun with 2 processes (DDP or FSDP2), started without
    --run-dir."""
    d = tmp_path_factory.mktemp("mario2")
    cfg = _config(d / "mario.json", {**MARIO, "parallel": request.param})
    p = torchrun(2, "-m", "rationale_train", "mario", "--config", cfg, cwd=d)
    return d, p


def test_mario_two_processes_one_run_folder(mario_two):
    import json

    from rationale_train import runs

    d, p = mario_two
    folders = list((d / "runs").iterdir())
    assert len(folders) == 1, folders  # rank 1 wrote nothing of its own
    run = folders[0]
    for name in ("config.json", "metrics.jsonl", "summary.md", "pool.jsonl", "result.json"):
        assert (run / name).is_file(), name
    rows = runs.read_metrics(run)
    assert [r["phase"] for r in rows].count("mario") == 2 * 4  # each step logged once
    assert [r["phase"] for r in rows].count("sft") == 6
    # the pool holds every question's samples (both ranks' shares), in question order
    rounds = [r for r in rows if r["phase"] == "round"]
    assert rounds[0]["silver"] == 24 and rounds[0]["sampled"] == 24
    pool = [r for r in (run / "pool.jsonl").read_text().splitlines() if r]
    assert len(pool) == rounds[-1]["pool_size"]
    assert p.stdout.count("SFT:") == 1  # rank 0 alone prints
    mode = json.loads((d / "mario.json").read_text())["parallel"]
    assert f"- processes: 2 ({mode})" in (run / "summary.md").read_text()


def test_two_process_checkpoint_resumes_in_one_process(mario_two, tmp_path):
    """Stop a 2-process run after step 2 (checkpoint) and resume a copy in 1 process and another
    in 2: the same losses at steps 3 and 4 (step 4 after an update with the restored optimizer
    state; FSDP: the shards, written by each rank, are resharded to one and to two processes). Two
    independent runs are no reference: the CPU BLAS is not bitwise run-to-run reproducible (in
    CI the first SFT loss of two identical runs differed in the 8th digit) and sampling can turn
    that into other samples."""
    import json

    from rationale_train.checkpoint import latest_checkpoint

    d, _ = mario_two
    cfg = _config(tmp_path / "mario.json", json.loads((d / "mario.json").read_text()))
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(2, "-m", "rationale_train", "mario", "--config", cfg, "--run-dir", one,
             "--stop-after-step", 2)  # fmt: skip
    assert sorted(_losses(one, "mario")) == [1, 2]
    # FSDP ranks wrote their shards (torch.distributed.checkpoint), DDP's rank 0 the full state
    ck = latest_checkpoint(one)
    fsdp = json.loads((d / "mario.json").read_text())["parallel"] == "fsdp"
    assert (ck / "dcp").is_dir() == fsdp and (ck / "model.safetensors").is_file() != fsdp
    # the silver part of the pool is the uninterrupted run's (rewards to rounding)
    first = next((d / "runs").iterdir())
    mine, ref = ([json.loads(x) for x in (r / "pool.jsonl").read_text().splitlines()]
                 for r in (one, first))  # fmt: skip
    silver = [(a, b) for a, b in zip(mine, ref) if a["source"] == "silver"]
    assert len(silver) == 24
    for a, b in silver:
        assert (a["example"], a["rationale"]) == (b["example"], b["rationale"])
        assert a["rewards"] == pytest.approx(b["rewards"], rel=1e-4, abs=1e-5)
    got, want = _resume_one_and_two("mario", one, two, "mario", 4)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-4), step


def test_one_process_checkpoint_resumes_under_fsdp(tmp_path):
    """The other direction and mode: a one-process checkpoint (safetensors keeps one name of the
    tied embedding / head pair, not necessarily the one FSDP's gather keeps) resumes in 2 FSDP
    processes with the loss of a one-process resume."""

    cfg = _config(tmp_path / "mario.json", MARIO)
    one, two = tmp_path / "one", tmp_path / "two"
    plain("-m", "rationale_train", "mario", "--config", cfg, "--run-dir", one,
          "--stop-after-step", 2)  # fmt: skip
    want, got = _resume_one_and_two("mario", one, two, "mario", 3, "--parallel", "fsdp")
    assert sorted(got) == sorted(want) == [1, 2, 3]
    assert got[3] == pytest.approx(want[3], rel=1e-4)


@pytest.fixture(scope="module")
def collate_two(tmp_path_factory):
    """A tiny COLLATE run under torchrun with 2 processes, started without --run-dir."""
    d = tmp_path_factory.mktemp("collate2")
    cfg = _config(d / "collate.json", COLLATE)
    torchrun(2, "-m", "rationale_train", "collate", "--config", cfg, cwd=d)
    return d


def test_collate_two_processes(collate_two):
    import json

    from rationale_train import runs

    folders = list((collate_two / "runs").iterdir())
    assert len(folders) == 1, folders
    run = folders[0]
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "done" and len(result["table"]) == 3
    cand = json.loads((run / "units" / "round0" / "candidates.json").read_text())
    assert len(cand["texts"]) == 24 * 2 * 4  # every question, both ranks' shares
    assert sorted(set(cand["group"])) == list(range(24))
    steps = [r["step"] for r in runs.read_metrics(run) if r.get("phase") == "dpo"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 3  # each logged once


def test_collate_two_process_checkpoint_resumes_in_one_process(tmp_path):
    """Stop a 2-process COLLATE run after DPO step 2, in the middle of the first unit, and resume
    a copy in 1 process and another in 2: the same losses at steps 3 and 4 (step 4 goes through
    the optimizer state restored at step 2; that a resume equals an uninterrupted run is
    test_collate's). (Two independent runs would
    not do as the reference: CPU BLAS rounding differs from run to run and sampling can turn it
    into other candidates. A unit's first step is no check either: policy = reference there, so
    every sigmoid-DPO loss is log 2.)"""
    import math

    from rationale_train import runs

    cfg = _config(tmp_path / "collate.json", {**COLLATE, "dpo_batch_size": 2})  # 6-step units
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(2, "-m", "rationale_train", "collate", "--config", cfg, "--run-dir", one,
             "--stop-after-step", 2)  # fmt: skip
    assert sorted(_losses(one, "dpo")) == [1, 2]
    got, want = _resume_one_and_two("collate", one, two, "dpo", 4)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    rows = {r["step"]: r for r in runs.read_metrics(one) if r.get("phase") == "dpo"}
    assert rows[4]["unit"] == rows[1]["unit"] and rows[4]["unit_step"] == 4  # one unit
    for step in (3, 4):
        assert abs(got[step] - math.log(2)) > 1e-3
        assert got[step] == pytest.approx(want[step], rel=1e-4), step


def test_failing_rank_stops_every_rank(tmp_path):
    """Rank 1 raises at train step 3: the launcher stops rank 0 (no hang), reports rank 1's
    error, and the latest checkpoint is a complete one."""
    import json
    import time

    from rationale_train.checkpoint import latest_checkpoint
    from safetensors import safe_open

    cfg = _config(tmp_path / "mario.json", {**MARIO, "rounds": 1, "save_every": 2})
    run = tmp_path / "run"
    t0 = time.time()
    p = torchrun(2, HERE / "_dist_fail.py", "mario", "--config", cfg, "--run-dir", run,
                 check=False)  # fmt: skip
    assert p.returncode != 0
    assert time.time() - t0 < 300
    assert "injected failure on rank 1" in p.stderr + p.stdout
    # the step fails inside SFT (6 steps, checkpoints every 2): step 2's is the latest
    ck = latest_checkpoint(run / "sft")
    assert ck is not None and ck.name == "step_00000002"
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["step"] == 2 and set(meta["files"]) <= {f.name for f in ck.iterdir()}
    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 5
    assert torch.load(ck / "optimizer.pt")["state"]
    assert not [f for f in (run / "sft" / "checkpoints").iterdir() if f.name.startswith(".tmp-")]


def test_parallel_without_process_group(tmp_path):
    """One process: Parallel is the plain model; load_state takes a safetensors state (tied
    aliases dropped) strictly and rejects one of another model."""
    from rationale_train import dist
    from rationale_train.models import tiny_llama, train_tokenizer
    from safetensors.torch import load_file, save_model

    tok = train_tokenizer(["one two three four five six"] * 8, vocab_size=280)
    a, b = (tiny_llama(tok, hidden_size=16, num_layers=1, num_heads=2, seed=s) for s in (0, 1))
    par = dist.Parallel(b, "fsdp")
    assert par.mode == "none" and par.gather_state() is None
    assert par(lambda m, x: m is b and x, 3) == 3
    save_model(a, str(tmp_path / "a.safetensors"))
    state = load_file(str(tmp_path / "a.safetensors"))
    assert len(state) < len(a.state_dict())  # the tied head was dropped
    par.load_state(state)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    with pytest.raises(RuntimeError, match="Missing key"):
        par.load_state({k: v for k, v in state.items() if "layers" not in k})
    assert dist.part(list(range(5))) == [0, 1, 2, 3, 4] and dist.shard(5, 1, 2) == range(2, 5)
