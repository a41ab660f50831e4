"""rk.sample (temperature + top-k + top-p, one draw per row) per backend vs torch sort-based
sampling: "torch-eager" is the usual HF-style implementation (topk mask, one sort, softmax,
cumsum mask, multinomial), "torch-compile" its torch.compile, "torch-reference" the (slower, tie-
exact) oracle of rationale_kernels/reference/sample.py; on GPU also FlashInfer's
top_k_top_p_sampling_from_logits when installed.

    pytest bench/bench_sampling.py --benchmark-only [--benchmark-json out.json]
Shape: B=256, V=32000 fp32 on CPU; B=1024, V=128256 fp32 on GPU (override with
RK_BENCH_SAMPLE_SHAPE="B,V"). Parameters: temperature 0.8, top_k 50, top_p 0.9 ("topk_topp")
and top_p 0.9 alone ("topp").
"""

from __future__ import annotations

import os

import pytest
import torch

import rationale_kernels as rk
from rationale_kernels import _native
from rationale_kernels.reference import sample as ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, V = (1024, 128256) if DEVICE.type == "cuda" else (256, 32000)
if os.environ.get("RK_BENCH_SAMPLE_SHAPE"):
    B, V = (int(x) for x in os.environ["RK_BENCH_SAMPLE_SHAPE"].split(","))
TEMPERATURE = 0.8
SETTINGS = {"topk_topp": (50, 0.9), "topp": (0, 0.9)}


def torch_sort_sample(logits, temperature, top_k, top_p):
    """HF-style sort-based top-k / top-p sampling (the common baseline)."""
    z = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    sz, idx = torch.sort(z, dim=-1, descending=True)
    p = sz.softmax(-1)
    remove = (p.cumsum(-1) - p) >= top_p  # mass strictly before the token reaches top_p
    sz = sz.masked_fill(remove, float("-inf"))
    pos = torch.multinomial(sz.softmax(-1), 1)
    return idx.gather(-1, pos)


def _providers():
    p = {
        "torch-eager": torch_sort_sample,
        "torch-compile": torch.compile(torch_sort_sample),
        "torch-reference": lambda z, t, k, pp: ref.sample(z, t, k, pp),
    }
    backends = ["cpu"] if DEVICE.type == "cpu" else ["cuda", "triton"]
    for be in backends:
        ok = {"cpu": _native.has_cpu(), "cuda": _native.has_cuda(), "triton": _native.has_triton()}
        if ok[be]:
            p[f"rk-{be}"] = lambda z, t, k, pp, be=be: rk.sample(
                z, temperature=t, top_k=k, top_p=pp, seed=0, backend=be
            )
    if DEVICE.type == "cuda":
        try:
            from flashinfer.sampling import top_k_top_p_sampling_from_logits

            def flashinfer(z, t, k, pp):
                return top_k_top_p_sampling_from_logits(
                    z / t, k if k > 0 else z.shape[-1], pp, filter_apply_order="top_k_first"
                )

            p["flashinfer"] = flashinfer
        except ImportError:
            pass
    return p


PROVIDERS = _providers()
ROUNDS = 20 if DEVICE.type == "cuda" else 5


def _device_name():
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU x{torch.get_num_threads()}"


def _run(benchmark, provider, setting):
    top_k, top_p = SETTINGS[setting]
    benchmark.group = f"sampling {setting} (T={TEMPERATURE}, k={top_k}, p={top_p}) B={B} V={V}"
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, V, generator=g) * 3).to(DEVICE)
    fn = PROVIDERS[provider]

    def step():
        out = fn(logits, TEMPERATURE, top_k, top_p)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    step()  # warm-up (compilation, JIT)
    benchmark.extra_info.update(B=B, V=V, dtype="float32", device=_device_name())
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if DEVICE.type == "cuda":
        gbps = B * V * 4 / benchmark.stats.stats.median / 1e9
        benchmark.extra_info["logits_read_gbps"] = round(gbps, 1)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_topk_topp(benchmark, provider):
    _run(benchmark, provider, "topk_topp")


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_topp(benchmark, provider):
    _run(benchmark, provider, "topp")
