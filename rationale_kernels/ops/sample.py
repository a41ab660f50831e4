"""Public sampling op ``rk.sample``: validation, seeds, backend dispatch.

Semantics (DESIGN.md §2(3), reference/sample.py): temperature -> top-k -> top-p -> min-p ->
renormalise -> draw, exact with respect to that filtered distribution, ties kept together.

Design decisions:
- Not differentiable (integer outputs). It is still a ``torch.library.custom_op``
  (``rationale_kernels::sample``) with a fake impl, so a ``torch.compile``-d decode step traces
  through it instead of graph-breaking on the native call; the data-dependent checks (NaN logits,
  per-row parameter ranges) run inside the op body, which stays eager.
- Randomness is counter-based (native backends): draw ``d`` of row ``r`` uses
  Philox4x32-10 with key = seed (64 bit) and counter = (d, r, 0, 0), i.e. Triton's
  ``tl.randint(seed, (r << 32) | d)``; its first word ``x`` gives ``u = (x >> 8) * 2**-24``.
  Results therefore do not depend on the launch shape or thread count, and the cpu, cuda and
  triton backends draw the same uniforms (their samples agree up to float rounding of the CDF).
  The torch backend draws with ``torch.multinomial`` from a ``torch.Generator`` seeded with seed.
- ``seed=None`` draws a 63-bit seed from ``generator`` (or torch's default generator), so
  ``torch.manual_seed`` makes results reproducible; ``seed`` and ``generator`` are exclusive.
- Bad logits (a NaN or +inf, or a row that is entirely -inf) are detected by the kernels
  themselves (the row's ids come back negative) and turned into a ValueError here: no extra pass
  over the logits.
"""

from __future__ import annotations

import math
from numbers import Integral, Number
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _native
from .._dispatch import resolve_backend
from ..reference import sample as ref_impl
from ._common import _DTYPE_CODES

_BAD_NONFINITE = -1  # a row holding NaN or +inf
_BAD_ALL_NEG_INF = -2  # a row whose logits are all -inf

Param = Union[float, int, Tensor]


# --------------------------------------------------------------------------------------------
# validation


def _check_scalar(name: str, x, lo: float, hi: float, lo_open: bool, integer: bool) -> None:
    if integer:
        if isinstance(x, bool) or not isinstance(x, Integral):
            raise TypeError(f"{name} must be an int or an integer tensor of shape [B], got {x!r}")
    elif isinstance(x, bool) or not isinstance(x, Number):
        raise TypeError(f"{name} must be a number or a float tensor of shape [B], got {x!r}")
    v = float(x)
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name} must be in {rng}, got {x!r}")


def _check_param_tensor(name: str, t: Tensor, B: int, device: torch.device, integer: bool) -> None:
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} tensor must have an integer dtype, got {t.dtype}")
    if not integer and not t.is_floating_point():
        raise TypeError(f"{name} tensor must have a floating-point dtype, got {t.dtype}")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{name} tensor must have shape [B] = [{B}], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}")


# (name, lo, hi, lo_open, integer)
_RANGES = {
    "temperature": (0.0, math.inf, False, False),
    "top_k": (0.0, math.inf, False, True),
    "top_p": (0.0, 1.0, True, False),
    "min_p": (0.0, 1.0, False, False),
}


def _bad_param_rows(temperature, top_k, top_p, min_p) -> Optional[str]:
    """Range check of the per-row parameter tensors (one host sync for all of them)."""
    checks = []
    if temperature is not None:
        checks.append(("temperature", ~(torch.isfinite(temperature) & (temperature >= 0))))
    if top_k is not None:
        checks.append(("top_k", top_k < 0))
    if top_p is not None:
        checks.append(("top_p", ~((top_p > 0) & (top_p <= 1))))
    if min_p is not None:
        checks.append(("min_p", ~((min_p >= 0) & (min_p <= 1))))
    if not checks:
        return None
    flags = torch.stack([c.any() for _, c in checks]).tolist()
    for (name, bad), flag in zip(checks, flags):
        if flag:
            row = int(bad.nonzero()[0, 0])
            lo, hi, lo_open, _ = _RANGES[name]
            rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
            return f"{name}[{row}] must be in {rng}"
    return None


def _raise_bad_rows(ids: Tensor) -> None:
    if ids.numel() == 0:
        return
    first = ids[:, 0]
    if bool((first < 0).any()):
        row = int((first < 0).nonzero()[0, 0])
        if int(first[row]) == _BAD_NONFINITE:
            raise ValueError(f"logits row {row} contains NaN or +inf")
        raise ValueError(f"logits row {row} is entirely -inf: nothing to sample")


def _check_logits_torch(logits: Tensor) -> None:
    if logits.numel() == 0:
        return
    bad = torch.isnan(logits) | (logits == math.inf)
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"logits row {row} contains NaN or +inf")
    dead = (logits == -math.inf).all(dim=1)
    if bool(dead.any()):
        row = int(dead.nonzero()[0, 0])
        raise ValueError(f"logits row {row} is entirely -inf: nothing to sample")


# --------------------------------------------------------------------------------------------
# backends


def _launch(
    backend: str,
    logits: Tensor,
    temperature: Optional[Tensor],
    temperature_s: float,
    top_k: Optional[Tensor],
    top_k_s: int,
    top_p: Optional[Tensor],
    top_p_s: float,
    min_p: Optional[Tensor],
    min_p_s: float,
    num_samples: int,
    seed: int,
) -> Tuple[Tensor, Tensor]:
    B, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if backend == "torch":
        _check_logits_torch(logits)
        g = torch.Generator(device=logits.device)
        g.manual_seed(seed)
        ids, lp = ref_impl.sample(
            logits,
            temperature if temperature is not None else temperature_s,
            top_k if top_k is not None else top_k_s,
            top_p if top_p is not None else top_p_s,
            min_p if min_p is not None else min_p_s,
            num_samples=num_samples,
            generator=g,
            return_logprobs=True,
        )
        return ids, lp.to(acc)
    if backend == "triton":
        from ..triton.sample import sample_rows

        ids, lp = sample_rows(
            logits, temperature, temperature_s, top_k, top_k_s, top_p, top_p_s,
            min_p, min_p_s, num_samples, seed,
        )  # fmt: skip
        _raise_bad_rows(ids)
        return ids, lp
    ids = torch.empty((B, num_samples), dtype=torch.int64, device=logits.device)
    lp = torch.empty((B, num_samples), dtype=acc, device=logits.device)
    if B == 0:
        return ids, lp
    # the param arrays: double on CPU, float on CUDA (csrc/sample.h)
    pdt = torch.float64 if backend == "cpu" else torch.float32
    t_arr, tp_arr, mp_arr = (
        None if x is None else x.to(pdt).contiguous() for x in (temperature, top_p, min_p)
    )
    k_arr = None if top_k is None else top_k.to(torch.int64).contiguous()

    def p(t: Optional[Tensor]) -> int:
        return 0 if t is None else t.data_ptr()

    args = (
        _DTYPE_CODES[logits.dtype], B, V, p(logits), logits.stride(0),
        p(t_arr), float(temperature_s), p(k_arr), int(top_k_s), p(tp_arr), float(top_p_s),
        p(mp_arr), float(min_p_s), num_samples, seed, p(ids), p(lp),
    )  # fmt: skip
    C = _native.native()
    if backend == "cpu":
        C.sample_rows_cpu(*args, torch.get_num_threads())
    elif backend == "cuda":
        with torch.cuda.device(logits.device):
            C.sample_rows_cuda(*args, torch.cuda.current_stream().cuda_stream)
    else:
        raise AssertionError(backend)
    _raise_bad_rows(ids)
    return ids, lp


@torch.library.custom_op("rationale_kernels::sample", mutates_args=())
def _sample_op(
    logits: Tensor,
    temperature: Optional[Tensor],
    temperature_s: float,
    top_k: Optional[Tensor],
    top_k_s: int,
    top_p: Optional[Tensor],
    top_p_s: float,
    min_p: Optional[Tensor],
    min_p_s: float,
    num_samples: int,
    seed: int,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    msg = _bad_param_rows(temperature, top_k, top_p, min_p)
    if msg is not None:
        raise ValueError(msg)
    return _launch(
        backend, logits, temperature, temperature_s, top_k, top_k_s, top_p, top_p_s,
        min_p, min_p_s, num_samples, seed,
    )  # fmt: skip


@_sample_op.register_fake
def _(logits, temperature, temperature_s, top_k, top_k_s, top_p, top_p_s, min_p, min_p_s,
      num_samples, seed, backend):  # fmt: skip
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    B = logits.shape[0]
    return (
        logits.new_empty((B, num_samples), dtype=torch.int64),
        logits.new_empty((B, num_samples), dtype=acc),
    )


# --------------------------------------------------------------------------------------------
# public op


def _split_param(name: str, x: Param, B: int, device: torch.device, default):
    """Scalar -> (None, scalar); tensor [B] -> (tensor, default); 0-d tensor -> scalar."""
    lo, hi, lo_open, integer = _RANGES[name]
    if isinstance(x, Tensor):
        if x.dim() == 0:
            x = int(x) if integer and not x.is_floating_point() else x.item()
        else:
            _check_param_tensor(name, x, B, device, integer)
            return x, default
    _check_scalar(name, x, lo, hi, lo_open, integer)
    return None, (int(x) if integer else float(x))


def sample(
    logits: Tensor,
    *,
    temperature: Param = 1.0,
    top_k: Param = 0,
    top_p: Param = 1.0,
    min_p: Param = 0.0,
    num_samples: int = 1,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    return_logprobs: bool = False,
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Draws ``num_samples`` token ids per row from the temperature / top-k / top-p / min-p
    filtered distribution of ``logits`` ``[B, V]``.

    Each parameter is a Python scalar or a per-row tensor of shape ``[B]`` on the logits' device:
    ``temperature >= 0`` (0 = greedy: the lowest id among the maxima), ``top_k >= 0`` (0 = off;
    keeps every token at least as likely as the k-th), ``0 < top_p <= 1`` (1 = off; keeps x iff
    the mass strictly more likely than x, after top-k, is < top_p), ``0 <= min_p <= 1`` (keeps
    tokens with probability >= min_p * the largest). Returns int64 ids ``[B, num_samples]``
    (independent draws with replacement), and with ``return_logprobs=True`` also their
    log-probabilities under the filtered distribution (float32; float64 for float64 logits).

    ``seed`` (an int in [0, 2**63)) or ``generator`` fixes the draws; with neither, a seed is
    drawn from torch's default generator. NaN / +inf logits, or a row that is entirely -inf, raise
    a ValueError.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [B, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in _DTYPE_CODES:
        raise TypeError(f"logits must be float32, float64, bfloat16 or float16, got {logits.dtype}")
    B, V = logits.shape
    if V == 0:
        raise ValueError("logits must have a non-empty vocabulary (V >= 1)")
    if isinstance(num_samples, bool) or not isinstance(num_samples, Integral) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    dev = logits.device
    t, t_s = _split_param("temperature", temperature, B, dev, 1.0)
    k, k_s = _split_param("top_k", top_k, B, dev, 0)
    tp, tp_s = _split_param("top_p", top_p, B, dev, 1.0)
    mp, mp_s = _split_param("min_p", min_p, B, dev, 0.0)
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        seed = int(seed)
    else:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        gdev = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=gdev).item())
    be = resolve_backend(backend, dev)
    if be in ("cpu", "cuda") and not hasattr(_native.native(), f"sample_rows_{be}"):
        # a native build that predates the sampler
        if backend != "auto":
            raise RuntimeError(f"rationale_kernels._C was built without sample_rows_{be}; rebuild")
        be = "torch"
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    ids, lp = _sample_op(logits, t, t_s, k, k_s, tp, tp_s, mp, mp_s, int(num_samples), seed, be)
    return (ids, lp) if return_logprobs else ids
