"""COLLATE's scoring and DPO tuning: ours vs a TRL-style padded eager implementation and its
torch.compile.

    pytest bench/bench_preference.py --benchmark-only [--benchmark-json out.json]

Workload: C candidates of T tokens (the first T/4 are prompt, ignored), hidden size H, vocabulary V;
candidates come in groups (questions).
- score: length-normalised log-prob of every candidate, no gradient (COLLATE's scoring pass);
- dpo-best-vs-worst: sigmoid DPO forward + backward over one (best, worst) pair per group;
- dpo-all-pairs: the same over every strictly-ordered pair in a group (groups of 4 here, so the
  TRL-style baseline stays runnable: it recomputes a candidate once per pair it appears in).
Shapes: C=64, T=256, H=512, V=32000 fp32 on CPU; C=256, T=512, H=4096, V=128256 bf16 on GPU
(override with RK_BENCH_PREF="C,T,H,V").
TRL-style = TRL's concatenated forward: chosen and rejected stacked into one padded batch,
log_softmax over the vocabulary, gather, masked sum; processed in micro-batches of 8 pairs (16
sequences for scoring), with gradient accumulation, as a TRL user would run it.
extra_info: peak_extra_mb (peak memory of one call above its inputs); on GPU, tflops (the useful
matmul FLOPs: 2 N H V forward per scored token, 6 N H V forward + backward).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from _memory import peak_extra_bytes

import rationale_kernels as rk
from rationale_kernels import _native

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    C, T, H, V = 256, 512, 4096, 128256
    DTYPE = torch.bfloat16
else:
    C, T, H, V = 64, 256, 512, 32000
    DTYPE = torch.float32
if os.environ.get("RK_BENCH_PREF"):
    C, T, H, V = (int(x) for x in os.environ["RK_BENCH_PREF"].split(","))
GROUP = {"score": 8, "dpo-best-vs-worst": 8, "dpo-all-pairs": 4}
BETA = 0.1
PAIRS_PER_STEP = 8  # TRL-style micro-batch
SEQS_PER_STEP = 16


def make_inputs(workload, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(C, T, H, generator=g).to(DEVICE, DTYPE)
    w = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(DEVICE, DTYPE)
    y = torch.randint(0, V, (C, T), generator=g)
    y[:, : T // 4] = -100  # prompt
    y = y.to(DEVICE)
    ref_logps = (-torch.rand(C, generator=g) * 10 * T).to(DEVICE)
    scores = torch.randn(C, generator=g).to(DEVICE)  # distinct: every pair is ordered
    groups = torch.arange(C, device=DEVICE) // GROUP[workload]
    mode = "all_pairs" if workload == "dpo-all-pairs" else "best_vs_worst"
    pairs = rk.preference_pairs(scores, groups, mode=mode)
    return h.requires_grad_(), w.requires_grad_(), y, ref_logps, pairs


# --------------------------------------------------------------------------------------------
# TRL-style baseline


def _trl_logps(h, w, y, average):
    logits = F.linear(h, w).float()
    logp = logits.log_softmax(-1)
    mask = y != -100
    tok = logp.gather(2, y.clamp_min(0).unsqueeze(2)).squeeze(2) * mask
    s = tok.sum(-1)
    return s / mask.sum(-1).clamp_min(1) if average else s


def _trl_dpo_step(h, w, y, ref_logps, pairs, num_pairs):
    c, r = pairs[:, 0], pairs[:, 1]
    batch = torch.cat([c, r])
    logps = _trl_logps(h[batch], w, y[batch], False)
    pc, pr = logps.chunk(2)
    delta = (pc - ref_logps[c]) - (pr - ref_logps[r])
    return -F.logsigmoid(BETA * delta).sum() / num_pairs


_trl_logps_compiled = torch.compile(_trl_logps)
_trl_dpo_step_compiled = torch.compile(_trl_dpo_step)


def _trl_score(compiled):
    fn = _trl_logps_compiled if compiled else _trl_logps

    def run(h, w, y, ref_logps, pairs):
        with torch.no_grad():
            return torch.cat([fn(h[i : i + SEQS_PER_STEP], w, y[i : i + SEQS_PER_STEP], True)
                              for i in range(0, C, SEQS_PER_STEP)])  # fmt: skip

    return run


def _trl_dpo(compiled):
    fn = _trl_dpo_step_compiled if compiled else _trl_dpo_step

    def run(h, w, y, ref_logps, pairs):
        P = pairs.shape[0]
        for i in range(0, P, PAIRS_PER_STEP):
            fn(h, w, y, ref_logps, pairs[i : i + PAIRS_PER_STEP], P).backward()

    return run


# --------------------------------------------------------------------------------------------
# ours


def _ours_score(backend):
    def run(h, w, y, ref_logps, pairs):
        with torch.no_grad():
            return rk.fused_linear_sequence_logprobs(h, w, y, average=True, backend=backend)

    return run


def _ours_dpo(backend):
    def run(h, w, y, ref_logps, pairs):
        loss, _ = rk.fused_linear_dpo_loss(h, w, y, None, ref_logps, pairs, beta=BETA,
                                           backend=backend)  # fmt: skip
        loss.backward()

    return run


def _providers(workload):
    score = workload == "score"
    p = {
        "trl-eager": _trl_score(False) if score else _trl_dpo(False),
        "trl-compile": _trl_score(True) if score else _trl_dpo(True),
    }
    ours = _ours_score if score else _ours_dpo
    if DEVICE.type == "cpu" and _native.has_cpu():
        p["rk-cpu"] = ours("cpu")
    if DEVICE.type == "cuda":
        if _native.has_cuda():
            p["rk-cuda"] = ours("cuda")
        if _native.has_triton():
            p["rk-triton"] = ours("triton")
    return p


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _flops(workload, pairs):
    n_tok = C * T
    if workload == "score":
        return 2 * n_tok * H * V
    used = int(torch.unique(pairs).numel())
    return 6 * used * T * H * V  # each used candidate: forward + backward once


ROUNDS = {"cuda": 5, "cpu": 2}[DEVICE.type]
CASES = [(wl, p) for wl in GROUP for p in _providers(wl)]


@pytest.mark.parametrize("workload,provider", CASES, ids=[f"{w}-{p}" for w, p in CASES])
def test_preference(benchmark, workload, provider):
    benchmark.group = f"{workload} C={C} T={T} H={H} V={V}"
    inputs = make_inputs(workload)
    h, w = inputs[0], inputs[1]
    fn = _providers(workload)[provider]

    def step():
        h.grad = w.grad = None
        fn(*inputs)
        _sync()

    step()  # warm-up (compilation, allocator)
    peak = peak_extra_bytes(step, DEVICE)
    h.grad = w.grad = None
    benchmark.extra_info.update(
        C=C, T=T, H=H, V=V, pairs=int(inputs[4].shape[0]),
        dtype=str(DTYPE).replace("torch.", ""), device=_device_name(),
        peak_extra_mb=round(peak / 2**20, 1),
    )  # fmt: skip
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    if DEVICE.type == "cuda":
        flops = _flops(workload, inputs[4])
        benchmark.extra_info["tflops"] = round(flops / benchmark.stats.stats.median / 1e12, 1)


def _device_name():
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU x{torch.get_num_threads()}"
