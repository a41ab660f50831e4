"""Public sequence log-prob ops: validation, backend dispatch, torch.library custom ops, autograd.

Design: the row kernels (contract: csrc/sequence_logprobs.h) read each row of logits once and write
two floats per token, the label log-prob and the row's logsumexp; nothing of size V is stored. The
per-sequence sums are a plain torch segmented reduction over those [N] values. The backward of a
token log-prob is ``g * (onehot - softmax)``; with the saved logsumexp it is one elementwise pass
that writes grad-logits directly (softmax is never stored).
- ``sequence_logprobs`` takes logits (padded ``[B, T, V]`` or packed ``[N, V]`` + ``cu_seqlens``).
  Strided views such as ``logits[:, :-1]`` go to the kernels without a copy.
- ``fused_linear_sequence_logprobs`` takes hidden states and the LM-head weight: logits are built
  chunk by chunk (torch matmuls) in the forward and rebuilt in the backward, where each chunk is
  turned into its gradient in place; only rows with a nonzero incoming gradient are recomputed (a
  DPO batch's unpaired candidates cost nothing in the backward). Peak extra memory O(chunk x V).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _native
from .._dispatch import resolve_backend
from ..reference import sequence_logprobs as ref_impl
from ._common import (
    _DTYPE_CODES,
    _acc_dtype,
    _accumulate_linear_grads,
    _check_device,
    _check_float,
    _check_label_range,
    _check_labels,
    _check_linear,
    _default_chunk,
    _fake_grads,
    _linear_grad_buffers,
    _linear_grads_out,
)

# --------------------------------------------------------------------------------------------
# validation


def _check_cu_seqlens(cu_seqlens: Tensor, N: int, device: torch.device) -> int:
    """Checks ``cu_seqlens`` ([S + 1], int32/int64, 0 = cu[0] <= ... <= cu[S] = N); returns S."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"cu_seqlens must be an int32 or int64 tensor, got {getattr(cu_seqlens, 'dtype', None)}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [S + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}")
    if not torch.compiler.is_compiling():
        c = cu_seqlens.detach().to("cpu", torch.int64)
        if int(c[0]) != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {int(c[0])}")
        if int(c[-1]) != N:
            raise ValueError(f"cu_seqlens must end at the number of tokens N={N}, got {int(c[-1])}")
        if c.numel() > 1 and bool((c[1:] < c[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing (sequence lengths >= 0)")
    return cu_seqlens.numel() - 1


def _check_layout(what: str, x: Tensor, labels: Tensor, cu_seqlens: Optional[Tensor]) -> None:
    """Padded: x is [B, T, last], labels [B, T]; packed: x is [N, last], labels [N] + cu_seqlens."""
    if cu_seqlens is None:
        if x.dim() != 3:
            raise ValueError(
                f"{what} must be padded [B, T, {'V' if what == 'logits' else 'H'}] (or packed "
                f"2-D with cu_seqlens), got shape {tuple(x.shape)}"
            )
    elif x.dim() != 2:
        raise ValueError(
            f"with cu_seqlens, {what} must be packed [N, {'V' if what == 'logits' else 'H'}], "
            f"got shape {tuple(x.shape)}"
        )


# --------------------------------------------------------------------------------------------
# backend launch of the row kernels (contract: csrc/sequence_logprobs.h)


def _launch_fwd(backend: str, logits: Tensor, labels: Tensor, ignore_index: int):
    """logits [B, T, V] (unit column stride), labels int64 [B, T] -> (logp, lse), both [B, T]."""
    B, T, V = logits.shape
    if backend == "triton":
        from ..triton.sequence_logprobs import token_logprobs_fwd

        return token_logprobs_fwd(logits, labels, ignore_index)
    acc = _acc_dtype(logits.dtype)
    logp = torch.empty((B, T), dtype=acc, device=logits.device)
    lse = torch.empty((B, T), dtype=acc, device=logits.device)
    if B * T == 0:
        return logp, lse
    args = (_DTYPE_CODES[logits.dtype], B, T, V, logits.data_ptr(), logits.stride(0),
            logits.stride(1), labels.data_ptr(), int(ignore_index), logp.data_ptr(),
            lse.data_ptr())  # fmt: skip
    C = _native.native()
    if backend == "cpu":
        C.token_logprobs_fwd_cpu(*args, torch.get_num_threads())
    elif backend == "cuda":
        with torch.cuda.device(logits.device):
            C.token_logprobs_fwd_cuda(*args, torch.cuda.current_stream().cuda_stream)
    else:
        raise AssertionError(backend)
    return logp, lse


def _launch_bwd(backend, logits, labels, lse, w, ignore_index, grad) -> None:
    """grad [B * T, V] (unit column stride; may be ``logits`` itself when that is a contiguous
    [1, N, V]) <- w * (onehot - softmax) row by row."""
    B, T, V = logits.shape
    if B * T == 0:
        return
    if backend == "triton":
        from ..triton.sequence_logprobs import token_logprobs_bwd

        token_logprobs_bwd(logits, labels, lse, w, ignore_index, grad)
        return
    args = (_DTYPE_CODES[logits.dtype], B, T, V, logits.data_ptr(), logits.stride(0),
            logits.stride(1), labels.data_ptr(), int(ignore_index), lse.data_ptr(),
            w.data_ptr(), grad.data_ptr(), grad.stride(0))  # fmt: skip
    C = _native.native()
    if backend == "cpu":
        C.token_logprobs_bwd_cpu(*args, torch.get_num_threads())
    elif backend == "cuda":
        with torch.cuda.device(logits.device):
            C.token_logprobs_bwd_cuda(*args, torch.cuda.current_stream().cuda_stream)
    else:
        raise AssertionError(backend)


def _rows3d(logits: Tensor) -> Tensor:
    """[B, T, V] with unit column stride (a view when possible; batch/time strides are free)."""
    return logits if logits.stride(-1) == 1 or logits.numel() == 0 else logits.contiguous()


# --------------------------------------------------------------------------------------------
# custom ops: logits -> (token log-probs, logsumexp), and its backward


@torch.library.custom_op("rationale_kernels::token_logprobs", mutates_args=())
def _token_op(
    logits: Tensor, labels: Tensor, ignore_index: int, backend: str
) -> Tuple[Tensor, Tensor]:
    _check_label_range(labels, logits.shape[-1], ignore_index)
    return _launch_fwd(backend, logits, labels, ignore_index)


@_token_op.register_fake
def _(logits, labels, ignore_index, backend):
    acc = _acc_dtype(logits.dtype)
    return logits.new_empty(labels.shape, dtype=acc), logits.new_empty(labels.shape, dtype=acc)


def _token_setup(ctx, inputs, output):
    logits, labels, ignore_index, backend = inputs
    ctx.ignore_index, ctx.backend = ignore_index, backend
    ctx.save_for_backward(logits, labels, output[1])


def _token_backward(ctx, g_logp, g_lse):
    if g_logp is None:
        return None, None, None, None
    logits, labels, lse = ctx.saved_tensors
    w = g_logp.to(lse.dtype).contiguous()
    grad = _token_grad_op(logits, labels, lse, w, ctx.ignore_index, ctx.backend)
    return grad, None, None, None


@torch.library.custom_op("rationale_kernels::token_logprobs_backward", mutates_args=())
def _token_grad_op(
    logits: Tensor, labels: Tensor, lse: Tensor, w: Tensor, ignore_index: int, backend: str
) -> Tensor:
    B, T, V = logits.shape
    grad = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    _launch_bwd(backend, logits, labels, lse, w, ignore_index, grad.view(B * T, V))
    return grad


@_token_grad_op.register_fake
def _(logits, labels, lse, w, ignore_index, backend):
    return logits.new_empty(logits.shape)


_token_op.register_autograd(_token_backward, setup_context=_token_setup)


# --------------------------------------------------------------------------------------------
# sequence_logprobs


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    cu_seqlens: Optional[Tensor] = None,
    ignore_index: int = -100,
    average: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Per-sequence sum (or mean) of label log-probs, ``sum_t log softmax(logits_t)[labels_t]``.

    Args:
        logits: padded ``[B, T, V]``, or packed ``[N, V]`` together with ``cu_seqlens``
            (float32/bfloat16/float16/float64). Not shifted: ``labels[..., t]`` is scored against
            ``logits[..., t, :]``; pass ``logits[:, :-1]`` and ``labels[:, 1:]`` for next-token
            scoring (the strided view is read in place, without a copy).
        labels: integer ``[B, T]`` (padded) or ``[N]`` (packed); ``ignore_index`` marks tokens
            that contribute nothing (prompt, padding).
        cu_seqlens: packed layout only: int32/int64 ``[S + 1]`` boundaries, ``0 = cu[0] <= ... <=
            cu[S] = N``; sequence s is tokens ``cu[s]:cu[s+1]`` (empty sequences allowed).
        average: divide each sequence's sum by its number of valid tokens.
        backend: ``"auto" | "torch" | "cpu" | "triton" | "cuda"``.

    Returns:
        ``[B]`` or ``[S]`` in float32 (float64 for float64 logits), differentiable w.r.t. logits.
        A sequence with no valid token has log-prob 0 for ``average`` False and True alike (never
        NaN). NaN or +inf logits in a valid token make its sequence NaN; -inf logits have
        probability 0 (a label at -inf gives -inf).
    """
    _check_float("logits", logits)
    _check_layout("logits", logits, labels, cu_seqlens)
    V = logits.shape[-1]
    if V < 1:
        raise ValueError("logits must have a vocabulary dimension V >= 1")
    _check_labels(labels, logits.shape[:-1], V, ignore_index)
    _check_device(logits.device, labels=labels)
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, logits.shape[0], logits.device)
    be = resolve_backend(backend, logits.device)
    if be == "torch":
        if not torch.compiler.is_compiling():
            _check_label_range(labels, V, ignore_index)
        return ref_impl.sequence_logprobs(
            logits, labels, cu_seqlens=cu_seqlens, ignore_index=ignore_index, average=average
        )
    z = _rows3d(logits if cu_seqlens is None else logits.unsqueeze(0))
    y = labels.reshape(z.shape[:2]).to(torch.int64).contiguous()
    logp, _ = _token_op(z, y, int(ignore_index), be)
    return ref_impl.segment_sums(
        logp.reshape(labels.shape), labels != ignore_index, cu_seqlens, average
    )


# --------------------------------------------------------------------------------------------
# fused_linear_sequence_logprobs


def _fused_fwd_chunks(backend, hidden, weight, bias, labels, ignore_index, chunk_size):
    N = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    logp = torch.empty(N, dtype=acc, device=hidden.device)
    lse = torch.empty(N, dtype=acc, device=hidden.device)
    for i0 in range(0, N, chunk_size):
        i1 = min(N, i0 + chunk_size)
        z = torch.nn.functional.linear(hidden[i0:i1], weight, bias)
        lp, ls = _launch_fwd(backend, z.unsqueeze(0), labels[i0:i1].view(1, -1), ignore_index)
        logp[i0:i1] = lp.view(-1)
        lse[i0:i1] = ls.view(-1)
    return logp, lse


def _fused_bwd_chunks(backend, hidden, weight, bias, labels, lse, w, ignore_index, chunk_size,
                      need_gh, need_gw, need_gb):  # fmt: skip
    """Recomputes the logits of the rows that receive a gradient, turns each chunk into
    w * (onehot - softmax) in place and accumulates grad_hidden / grad_weight / grad_bias."""
    N, H = hidden.shape
    dt = hidden.dtype
    active = (w != 0) & (labels != ignore_index)
    rows = None if bool(active.all()) else active.nonzero().squeeze(1)
    if rows is not None:  # only these rows have a nonzero gradient
        hidden, labels, lse, w = hidden[rows], labels[rows], lse[rows], w[rows]
    n = hidden.shape[0]
    gh = torch.empty((n, H), dtype=dt, device=hidden.device) if need_gh else None
    gw, gb = _linear_grad_buffers(weight, need_gw, need_gb)
    for i0 in range(0, n, chunk_size):
        i1 = min(n, i0 + chunk_size)
        h = hidden[i0:i1]
        z = torch.nn.functional.linear(h, weight, bias)
        _launch_bwd(backend, z.unsqueeze(0), labels[i0:i1].view(1, -1), lse[i0:i1], w[i0:i1],
                    ignore_index, z)  # fmt: skip
        if need_gh:
            torch.mm(z, weight, out=gh[i0:i1])
        _accumulate_linear_grads(z, h, gw, gb)
    if not need_gh:
        gh = hidden.new_empty(0)
    elif rows is not None:
        gh = torch.zeros((N, H), dtype=dt, device=hidden.device).index_copy_(0, rows, gh)
    return (gh,) + _linear_grads_out(weight, gw, gb)


@torch.library.custom_op("rationale_kernels::fused_linear_token_logprobs", mutates_args=())
def _fused_token_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    ignore_index: int,
    backend: str,
    chunk_size: int,
) -> Tuple[Tensor, Tensor]:
    _check_label_range(labels, weight.shape[0], ignore_index)
    return _fused_fwd_chunks(backend, hidden, weight, bias, labels, ignore_index, chunk_size)


@_fused_token_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, backend, chunk_size):
    acc = _acc_dtype(hidden.dtype)
    return hidden.new_empty(labels.shape, dtype=acc), hidden.new_empty(labels.shape, dtype=acc)


def _fused_setup(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, backend, chunk_size = inputs
    ctx.rest = (ignore_index, backend, chunk_size)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])


def _fused_backward(ctx, g_logp, g_lse):
    none = (None,) * 7
    if g_logp is None:
        return none
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_gb = ctx.has_bias and need[2]
    gh, gw, gb = _fused_token_grad_op(
        hidden, weight, bias, labels, lse, g_logp.to(lse.dtype).contiguous(), *ctx.rest,
        need[0], need[1], need_gb,
    )  # fmt: skip
    return (gh if need[0] else None, gw if need[1] else None, gb if need_gb else None) + none[3:]


@torch.library.custom_op("rationale_kernels::fused_linear_token_logprobs_backward", mutates_args=())
def _fused_token_grad_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    lse: Tensor,
    w: Tensor,
    ignore_index: int,
    backend: str,
    chunk_size: int,
    need_gh: bool,
    need_gw: bool,
    need_gb: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    return _fused_bwd_chunks(backend, hidden, weight, bias, labels, lse, w, ignore_index,
                             chunk_size, need_gh, need_gw, need_gb)  # fmt: skip


@_fused_token_grad_op.register_fake
def _(hidden, weight, bias, labels, lse, w, ignore_index, backend, chunk_size,
      need_gh, need_gw, need_gb):  # fmt: skip
    return _fake_grads(hidden, weight, need_gh, need_gw, need_gb)


_fused_token_op.register_autograd(_fused_backward, setup_context=_fused_setup)


def fused_linear_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    ignore_index: int = -100,
    average: bool = False,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`sequence_logprobs` of ``logits = hidden @ weight.T (+ bias)`` without materialising
    the logits: they are computed ``chunk_size`` rows at a time, in the forward and again in the
    backward. Differentiable w.r.t. hidden, weight and bias.

    Args:
        hidden: padded ``[B, T, H]`` or packed ``[N, H]`` (with ``cu_seqlens``) final hidden states,
            already aligned with ``labels`` (position t's hidden state scores ``labels[..., t]``).
        weight: LM head ``[V, H]`` (same dtype as hidden); bias: optional ``[V]``.
        labels, cu_seqlens, ignore_index, average, backend: as in :func:`sequence_logprobs`.
        chunk_size: rows per chunk; default keeps one chunk of logits near 64 MiB on CPU and
            1 GiB on GPU.
    """
    _check_linear("hidden", hidden, "weight", weight, "bias", bias)
    _check_layout("hidden", hidden, labels, cu_seqlens)
    V = weight.shape[0]
    if V < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    _check_labels(labels, hidden.shape[:-1], V, ignore_index)
    _check_device(hidden.device, labels=labels)
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    be = resolve_backend(backend, hidden.device)
    if be == "torch":
        if not torch.compiler.is_compiling():
            _check_label_range(labels, V, ignore_index)
        logits = torch.nn.functional.linear(hidden, weight, bias)
        return ref_impl.sequence_logprobs(
            logits, labels, cu_seqlens=cu_seqlens, ignore_index=ignore_index, average=average
        )
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    N = h.shape[0]
    y = labels.reshape(-1).to(torch.int64).contiguous()
    if chunk_size is None:
        chunk_size = _default_chunk(N, V, hidden.element_size(), False, hidden.device)
    logp, _ = _fused_token_op(h, weight, bias, y, int(ignore_index), be, chunk_size)
    return ref_impl.segment_sums(
        logp.reshape(labels.shape), labels != ignore_index, cu_seqlens, average
    )
