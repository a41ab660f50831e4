"""Test helpers shipped with the package (users test their own backends with them).

Tolerance idiom of DESIGN.md §3: err(kernel, ref64) <= 2 * err(torch at same dtype, ref64) + eps."""

import torch

EPS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float16: 2e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().double()
    ref = ref.detach().double()
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert not torch.isnan(x).any(), "NaN in output"
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_idiom(out, ref64, torch_out, dtype, what=""):
    e_out, e_torch = rel_err(out, ref64), rel_err(torch_out, ref64)
    bound = 2 * e_torch + EPS[dtype]
    assert e_out <= bound, f"{what}: err {e_out:.3e} > 2 * {e_torch:.3e} + {EPS[dtype]:.0e}"
