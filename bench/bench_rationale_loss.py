"""Forward + backward of the fused-linear rationale loss (MaRio's setting: NLL + beta KL to a frozen
reference over the original vocabulary - alpha entropy), ours per backend vs the eager reference
(logits materialised) and its torch.compile; peers (cut-cross-entropy, Liger) on the NLL-only loss.

    pytest bench/bench_rationale_loss.py --benchmark-only [--benchmark-json out.json]
Shape: N=2048, H=512, V=32000 fp32 on CPU; N=8192, H=4096, V=128256 bf16 on GPU
(override with RK_BENCH_SHAPE="N,H,V" and RK_BENCH_DTYPE=float32|bfloat16).
extra_info: peak_extra_mb (peak memory of one call above its inputs) and, on GPU, tflops.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from _memory import peak_extra_bytes

import rationale_kernels as rk
from rationale_kernels import _native
from rationale_kernels.reference import rationale_loss as ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    N, H, V = 8192, 4096, 128256
    DTYPE = torch.bfloat16
else:
    N, H, V = 2048, 512, 32000
    DTYPE = torch.float32
if os.environ.get("RK_BENCH_SHAPE"):
    N, H, V = (int(x) for x in os.environ["RK_BENCH_SHAPE"].split(","))
if os.environ.get("RK_BENCH_DTYPE"):
    DTYPE = getattr(torch, os.environ["RK_BENCH_DTYPE"])
KV = V - 256  # MaRio: KL over the original vocabulary, control tokens excluded


def make_inputs(seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(DEVICE, DTYPE)
    w = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(DEVICE, DTYPE)
    rh = (h.float() + 0.1 * torch.randn(N, H, generator=g).to(DEVICE)).to(DTYPE)
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    y[::17] = -100
    tw = torch.rand(N, generator=g).to(DEVICE)
    return h.requires_grad_(), w.requires_grad_(), rh, w.detach().clone(), y, tw


def mario_loss(fn, with_kl=True):
    def run(h, w, rh, rw, y, tw):
        kw = dict(token_weights=tw, entropy_coef=0.01)
        if with_kl:
            kw.update(ref_hidden=rh, ref_weight=rw, kl_coef=0.1, kl_vocab=KV)
        return fn(h, w, y, **kw)

    return run


def _ours(backend):
    def fn(h, w, y, **kw):
        return rk.fused_linear_rationale_loss(h, w, y, backend=backend, **kw)

    return fn


def _providers():
    p = {"torch-eager": ref.fused_linear_rationale_loss}
    p["torch-compile"] = torch.compile(ref.fused_linear_rationale_loss)
    if DEVICE.type == "cpu" and _native.has_cpu():
        p["rk-cpu"] = _ours("cpu")
    if DEVICE.type == "cuda":
        if _native.has_cuda():
            p["rk-cuda"] = _ours("cuda")
        if _native.has_triton():
            p["rk-triton"] = _ours("triton")
    return p


PROVIDERS = _providers()


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _bench(benchmark, loss_fn, rounds):
    inputs = make_inputs()
    h, w = inputs[0], inputs[1]

    def step():
        h.grad = w.grad = None
        loss_fn(*inputs).backward()
        _sync()

    step()  # warm-up (compilation, allocator)
    peak = peak_extra_bytes(step, DEVICE)
    h.grad = w.grad = None
    benchmark.extra_info.update(
        N=N, H=H, V=V, dtype=str(DTYPE).replace("torch.", ""), device=_device_name(),
        peak_extra_mb=round(peak / 2**20, 1),
    )  # fmt: skip
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    if DEVICE.type == "cuda":
        # policy: fwd + 2 bwd matmuls; reference: one fwd matmul
        flops = 2 * N * H * V * 3 + 2 * N * H * V
        benchmark.extra_info["tflops"] = round(flops / benchmark.stats.stats.median / 1e12, 1)


def _device_name():
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU x{torch.get_num_threads()}"


ROUNDS = 10 if DEVICE.type == "cuda" else 3


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_mario_loss(benchmark, provider):
    benchmark.group = f"fused-linear rationale loss (NLL+KL+entropy) N={N} H={H} V={V}"
    _bench(benchmark, mario_loss(PROVIDERS[provider]), ROUNDS)


def _peers():
    p = dict(PROVIDERS)
    try:
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if DEVICE.type == "cuda" else "torch_compile"

        def cce(h, w, y, token_weights=None, **kw):
            return linear_cross_entropy(h, w, y, impl=impl, reduction="mean")

        p["cut-cross-entropy"] = cce
    except ImportError:
        pass
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(h, w, y, token_weights=None, **kw):
            return liger_fused_linear_cross_entropy(h, w, y)

        if DEVICE.type == "cuda":
            p["liger"] = liger
    except ImportError:
        pass
    return p


@pytest.mark.parametrize("provider", list(_peers()))
def test_nll_only(benchmark, provider):
    """Plain token-mean NLL (what the peers compute). Token weights are ignored by the peers, so
    ours run unweighted here too."""
    benchmark.group = f"fused-linear NLL only N={N} H={H} V={V}"
    fn = _peers()[provider]

    def run(h, w, rh, rw, y, tw):
        return fn(h, w, y)

    _bench(benchmark, run, ROUNDS)
