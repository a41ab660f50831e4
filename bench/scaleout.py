"""Scale-out throughput: MaRio training tokens/s and COLLATE candidate-generation tokens/s of short
runs under ``torchrun --nproc-per-node N``, read from the runs' metrics (``train_round`` and
``round`` records). Not a pytest-benchmark file: each figure is one whole run.

    python bench/scaleout.py --nproc 1 --device cuda --out OUT      # the GPU machine (nccl)
    python bench/scaleout.py --nproc 1 2 --device cpu --small       # CPU, gloo, 1 vs 2 processes

Prints a markdown table (and writes OUT/scaleout.md and OUT/scaleout.json when --out is given).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# a model big enough for the GPU to matter, small enough to train from scratch in a minute
GPU_MODEL = dict(vocab_size=8000, hidden_size=512, num_layers=8, num_heads=8)
CPU_MODEL = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4)


def _configs(device: str, small: bool):
    model = CPU_MODEL if small else GPU_MODEL
    mario = dict(device=device, n_train=512 if small else 4096, n_test=64, sft_epochs=1.0,
                 sft_batch_size=32, rounds=1, steps_per_round=20 if small else 100,
                 batch_size=32 if small else 128, max_new_tokens=40, eval_each_round=False,
                 **model)  # fmt: skip
    collate = dict(device=device, n_train=128 if small else 1024, n_dev=32, n_test=32,
                   sft_epochs=1.0, rounds=1, candidates_per_provider=4, providers=2,
                   max_new_tokens=40, eval_each_round=False, **model)  # fmt: skip
    if not small:
        mario["gen_batch_size"] = collate["gen_batch_size"] = 512
    return {"mario": mario, "collate": collate}


def _run(command: str, cfg: dict, nproc: int, workdir: Path, timeout: float) -> dict:
    run_dir = workdir / f"{command}-{nproc}"
    cfg_file = workdir / f"{command}.json"
    cfg_file.write_text(json.dumps(cfg))
    env = dict(os.environ, RATIONALE_TRAIN_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "rationale_train", command, "--config",
           str(cfg_file), "--run-dir", str(run_dir)]  # fmt: skip
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{command} with {nproc} processes failed:\n{p.stderr[-4000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    out = {"command": command, "nproc": nproc, "wall_s": round(wall, 1)}
    if command == "mario":
        r = [x for x in rows if x.get("phase") == "train_round"][-1]
        out.update(tokens=r["tokens"], seconds=r["seconds"], tokens_per_s=r["tokens_per_s"])
    else:
        r = [x for x in rows if x.get("phase") == "round"][-1]
        out.update(tokens=r["gen_tokens"], seconds=r["gen_seconds"],
                   tokens_per_s=r["gen_tokens_per_s"])  # fmt: skip
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, nargs="+", default=[1])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="the tiny CPU model and data")
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=float, default=280.0, help="seconds per run")
    args = ap.parse_args(argv)
    cfgs = _configs(args.device, args.small)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for command in ("mario", "collate"):
            for n in args.nproc:
                results.append(_run(command, cfgs[command], n, Path(tmp), args.timeout))
                print(json.dumps(results[-1]), flush=True)
    lines = ["| command | what | processes | tokens | seconds | tokens/s | run wall s |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        what = "training (target tokens)" if r["command"] == "mario" else "candidate generation"
        cells = [r["command"], what, r["nproc"], r["tokens"], f"{r['seconds']:.2f}",
                 f"{r['tokens_per_s']:.0f}", f"{r['wall_s']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "scaleout.md").write_text(table + "\n")
        (Path(args.out) / "scaleout.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
