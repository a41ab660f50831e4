"""Validation and chunking helpers shared by the public ops (rationale_loss, sequence_logprobs,
preference_loss, sample)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def _check_device(device: torch.device, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the logits/hidden are on {device}")


def _check_label_range(labels: Tensor, V: int, ignore_index: int) -> None:
    """Host-side check (a device sync on GPU). It runs inside the custom ops' bodies, which stay
    eager under torch.compile, so the kernels never see an out-of-range label."""
    if labels.numel():
        bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
        if bool(bad.any()):
            value = int(labels[bad].flatten()[0])
            raise ValueError(
                f"label {value} is out of range for a vocabulary of {V} "
                f"(labels must be in [0, {V}) or equal ignore_index={ignore_index})"
            )


def _check_labels(labels: Tensor, lead_shape: torch.Size, V: int, ignore_index: int) -> None:
    if not isinstance(labels, Tensor) or labels.dtype not in (
        torch.int64,
        torch.int32,
        torch.int16,
        torch.uint8,
        torch.int8,
    ):
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', labels)}")
    if labels.shape != lead_shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the leading shape {tuple(lead_shape)}"
        )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Target bytes of one chunk of logits (+ reference logits). CPU: a few L3-sized tiles keep the
# matmuls efficient; GPU: large enough that the chunk matmuls stay near peak.
_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}


def _default_chunk(N: int, V: int, elt: int, has_ref: bool, device: torch.device) -> int:
    budget = _CHUNK_BYTES.get(device.type, 64 << 20)
    rows = max(1, budget // (V * elt * (2 if has_ref else 1)))
    if rows >= 8:
        rows -= rows % 8
    return max(1, min(N, rows))


def _fake_grads(hidden, weight, need_gh, need_gw, need_gb):
    """Shapes of (grad_hidden, grad_weight, grad_bias) for the fake (meta) implementations."""
    gh = hidden.new_empty(hidden.shape) if need_gh else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape) if need_gw else weight.new_empty(0)
    gb = weight.new_empty(weight.shape[0]) if need_gb else weight.new_empty(0)
    return gh, gw, gb


def _check_linear(name_h, h, name_w, w, name_b, b, lead=None):
    _check_float(name_h, h)
    _check_float(name_w, w)
    if h.dim() < 1 or w.dim() != 2:
        raise ValueError(f"{name_h} must be [..., H] and {name_w} [V, H]")
    if h.shape[-1] != w.shape[1]:
        raise ValueError(
            f"{name_h} hidden size {h.shape[-1]} != {name_w} input size {w.shape[1]} "
            f"({name_w} must be [V, H])"
        )
    if h.dtype != w.dtype:
        raise TypeError(f"{name_h} dtype {h.dtype} != {name_w} dtype {w.dtype}")
    if lead is not None and h.shape[:-1] != lead:
        raise ValueError(f"{name_h} leading shape {tuple(h.shape[:-1])} != {tuple(lead)}")
    if b is not None:
        _check_float(name_b, b)
        if b.shape != (w.shape[0],) or b.dtype != w.dtype:
            raise ValueError(f"{name_b} must be [{w.shape[0]}] of dtype {w.dtype}")
    if w.device != h.device:
        raise ValueError(f"{name_w} is on {w.device} but {name_h} is on {h.device}")


def _linear_grad_buffers(weight: Tensor, need_gw: bool, need_gb: bool):
    """Zeroed grad_weight / grad_bias accumulators (None when not needed). They sum over every
    chunk, so they are float32 for low-precision weights (float64 for float64)."""
    acc = _acc_dtype(weight.dtype)
    gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_gw else None
    gb = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_gb else None
    return gw, gb


def _accumulate_linear_grads(g_logits: Tensor, h: Tensor, gw, gb) -> None:
    """gw += g_logits^T h and gb += column sums of g_logits, for one chunk of rows."""
    if gw is not None:
        if gw.dtype == h.dtype:
            gw.addmm_(g_logits.t(), h)
        else:
            gw += torch.mm(g_logits.t(), h)
    if gb is not None:
        gb += g_logits.sum(0, dtype=gb.dtype)


def _linear_grads_out(weight: Tensor, gw, gb):
    """The accumulators cast back to the weight's dtype (empty tensors for grads not asked for,
    as the custom ops return them)."""
    gw = gw.to(weight.dtype) if gw is not None else weight.new_empty(0)
    gb = gb.to(weight.dtype) if gb is not None else weight.new_empty(0)
    return gw, gb
