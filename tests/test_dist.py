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


def torchrun(nproc, *args, timeout=600, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *map(str, args)]  # fmt: skip
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
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
