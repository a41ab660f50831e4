"""Public rationale-loss ops: validation, backend dispatch, torch.library custom ops and autograd.

Design: the kernels compute, per token, the four terms (loss, nll, kl, entropy) and d loss_t / d z_t
in the same launch. Reductions then happen in plain torch on the [N] per-token losses.
- ``rationale_loss`` keeps d loss_t / d z_t (one [N, V] buffer, like autograd's saved softmax) and
  its backward scales each row by the incoming gradient, so every reduction works.
- ``fused_linear_rationale_loss`` computes logits chunk by chunk (chunk @ W^T via torch), the kernel
  turns each chunk into its gradient in place, and grad_hidden / grad_weight are accumulated right
  there: peak extra memory O(chunk * V). For reduction="none" the per-row scales are unknown at
  forward time, so the forward only computes terms and the backward recomputes the chunks.
Token weights, reference logits / hidden / log-probs never receive gradients.
"""

from __future__ import annotations

import math
from numbers import Number
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _native
from .._dispatch import resolve_backend
from ..reference import rationale_loss as ref_impl
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

_KL_MODES = {"none": 0, "full": 1, "k1": 2, "k3": 3}
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# validation


def _check_per_token(name: str, t: Optional[Tensor], lead_shape: torch.Size) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if t.shape != lead_shape:
        raise ValueError(
            f"{name} shape {tuple(t.shape)} must equal labels shape {tuple(lead_shape)}"
        )


def _kl_mode(
    kl, kl_vocab, V, ref_width, has_ref_logits, has_ref_logprobs, kl_coef
) -> Tuple[int, int]:
    """Checks the KL options; returns (kernel kl_mode, K)."""
    if kl not in ("full", "k1", "k3"):
        raise ValueError(f"kl must be 'full', 'k1' or 'k3', got {kl!r}")
    if kl == "full":
        if has_ref_logprobs:
            raise ValueError("ref_logprobs is for kl='k1'/'k3'; kl='full' takes reference logits")
        if kl_vocab is not None:
            if not isinstance(kl_vocab, int) or not 1 <= kl_vocab <= V:
                raise ValueError(f"kl_vocab must be an int in [1, {V}], got {kl_vocab!r}")
        if not has_ref_logits:
            if kl_coef != 0.0:
                raise ValueError("kl_coef > 0 with kl='full' needs reference logits (or hidden)")
            return 0, V
        K = V if kl_vocab is None else kl_vocab
        if kl_vocab is None and ref_width != V:
            raise ValueError(
                f"reference vocabulary {ref_width} != policy vocabulary {V}; pass kl_vocab to "
                "compare the first kl_vocab ids only"
            )
        if ref_width < K:
            raise ValueError(f"reference vocabulary {ref_width} is smaller than kl_vocab={K}")
        return 1, K
    if kl_vocab is not None:
        raise ValueError("kl_vocab only applies to kl='full'")
    if has_ref_logits:
        raise ValueError(f"kl={kl!r} takes ref_logprobs (per-token), not reference logits")
    if not has_ref_logprobs:
        if kl_coef != 0.0:
            raise ValueError(f"kl={kl!r} with kl_coef > 0 needs ref_logprobs")
        return 0, V
    return _KL_MODES[kl], V


def _check_common(kl_coef, entropy_coef, reduction, normalizer) -> None:
    for name, v in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef)):
        if not isinstance(v, Number) or not math.isfinite(float(v)):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError("normalizer replaces the valid-token count of reduction='mean'")
        if isinstance(normalizer, Number) and not float(normalizer) > 0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
        if isinstance(normalizer, Tensor) and normalizer.numel() != 1:
            raise ValueError("normalizer tensor must have exactly one element")


def _rows2d(t: Tensor, V: int) -> Tensor:
    """[..., V] -> [N, V] with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, V)
    return t2 if t2.stride(-1) == 1 or t2.shape[0] == 0 else t2.contiguous()


def _opt(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1).to(dtype).contiguous()


# --------------------------------------------------------------------------------------------
# backend launch of the row kernel (contract: csrc/rationale_loss.h)


def _launch_rows(
    backend: str,
    logits: Tensor,
    labels: Tensor,
    weights: Optional[Tensor],
    ref_logits: Optional[Tensor],
    ref_logprobs: Optional[Tensor],
    kl_mode: int,
    kl_vocab: int,
    kl_coef: float,
    entropy_coef: float,
    ignore_index: int,
    row_scale: Optional[Tensor],
    grad: Optional[Tensor],
) -> Tensor:
    """Runs the row kernel; writes grad (may be ``logits`` itself) and returns terms [N, 4]."""
    N, V = logits.shape
    if backend == "triton":
        from ..triton.rationale_loss import rationale_loss_rows

        return rationale_loss_rows(
            logits, labels, weights, ref_logits, ref_logprobs, kl_mode, kl_vocab,
            kl_coef, entropy_coef, ignore_index, row_scale, grad,
        )  # fmt: skip
    terms = torch.empty((N, 4), dtype=_acc_dtype(logits.dtype), device=logits.device)
    if N == 0:
        return terms

    def p(t: Optional[Tensor]) -> int:
        return 0 if t is None else t.data_ptr()

    args = (
        _DTYPE_CODES[logits.dtype], N, V, p(logits), logits.stride(0), p(labels), p(weights),
        p(ref_logits), 0 if ref_logits is None else ref_logits.stride(0), p(ref_logprobs),
        kl_mode, kl_vocab, float(kl_coef), float(entropy_coef), int(ignore_index),
        p(row_scale), p(grad), 0 if grad is None else grad.stride(0), p(terms),
    )  # fmt: skip
    C = _native.native()
    if backend == "cpu":
        C.rationale_loss_rows_cpu(*args, torch.get_num_threads())
    elif backend == "cuda":
        with torch.cuda.device(logits.device):
            C.rationale_loss_rows_cuda(*args, torch.cuda.current_stream().cuda_stream)
    else:
        raise AssertionError(backend)
    return terms


# --------------------------------------------------------------------------------------------
# custom op: rows of logits -> (terms, d loss_t / d z_t)


@torch.library.custom_op("rationale_kernels::rationale_loss_rows", mutates_args=())
def _rows_op(
    logits: Tensor,
    labels: Tensor,
    weights: Optional[Tensor],
    ref_logits: Optional[Tensor],
    ref_logprobs: Optional[Tensor],
    kl_mode: int,
    kl_vocab: int,
    kl_coef: float,
    entropy_coef: float,
    ignore_index: int,
    backend: str,
    compute_grad: bool,
) -> Tuple[Tensor, Tensor]:
    _check_label_range(labels, logits.shape[1], ignore_index)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else None
    terms = _launch_rows(
        backend, logits, labels, weights, ref_logits, ref_logprobs, kl_mode, kl_vocab,
        kl_coef, entropy_coef, ignore_index, None, grad,
    )  # fmt: skip
    return terms, (grad if grad is not None else logits.new_empty(0))


@_rows_op.register_fake
def _(logits, labels, weights, ref_logits, ref_logprobs, kl_mode, kl_vocab, kl_coef,
      entropy_coef, ignore_index, backend, compute_grad):  # fmt: skip
    terms = logits.new_empty((logits.shape[0], 4), dtype=_acc_dtype(logits.dtype))
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)
    return terms, grad


def _rows_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _rows_backward(ctx, g_terms, g_grad):
    (grad,) = ctx.saved_tensors
    if g_terms is None or grad.dim() != 2:  # dim 1 (empty): gradient was not computed
        return (None,) * 12
    # only column 0 (the loss) is differentiable through this op; stats are returned detached
    g = grad * g_terms[:, :1].to(grad.dtype)
    return (g,) + (None,) * 11


_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup)


# --------------------------------------------------------------------------------------------
# reductions and stats (shared by both public ops)


def _reduce(per_token: Tensor, valid: Tensor, reduction: str, normalizer) -> Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if normalizer is None:
        return total / valid.sum().clamp_min(1).to(total.dtype)  # all ignored -> 0, not NaN
    return total / normalizer


def _finish(terms, valid, lead, reduction, normalizer, return_stats):
    """Kernel terms [N, 4] -> the reduced loss (and stats), as both public ops return them."""
    per_token = terms[:, 0]
    if reduction == "none":
        per_token = per_token.reshape(lead)
    loss = _reduce(per_token, valid, reduction, normalizer)
    return (loss, _stats(terms, valid)) if return_stats else loss


def _stats(terms: Tensor, valid: Tensor) -> dict:
    """Detached means over valid tokens of nll, kl and entropy, plus the token count."""
    n = valid.sum()
    d = n.clamp_min(1).to(terms.dtype)
    t = terms.detach()
    return {
        "nll": t[:, 1].sum() / d,
        "kl": t[:, 2].sum() / d,
        "entropy": t[:, 3].sum() / d,
        "num_tokens": n,
    }


def _ref_stats(out: dict) -> dict:
    valid = out["valid"].reshape(-1)
    terms = torch.stack([out[k].reshape(-1) for k in ("loss", "nll", "kl", "entropy")], 1)
    return _stats(terms, valid)


# --------------------------------------------------------------------------------------------
# rationale_loss


def rationale_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    token_weights: Optional[Tensor] = None,
    ref_logits: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    kl_coef: float = 0.0,
    kl: str = "full",
    kl_vocab: Optional[int] = None,
    entropy_coef: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Union[None, float, Tensor] = None,
    return_stats: bool = False,
    backend: str = "auto",
):
    """MaRio/Quark per-token loss ``w_t * nll_t + kl_coef * kl_t - entropy_coef * H_t``.

    Args:
        logits: ``[..., V]`` policy logits (float32/bfloat16/float16/float64). Not shifted: label
            ``labels[...]`` is scored against ``logits[..., :]`` at the same position.
        labels: integer ``[...]``; ``ignore_index`` marks tokens that contribute nothing.
        token_weights: optional ``[...]`` per-token weights of the NLL term (no gradient).
        ref_logits: ``[..., V_ref]`` reference logits for ``kl="full"`` (no gradient). ``V_ref`` may
            differ from ``V`` when ``kl_vocab`` is given (e.g. policy vocab + control tokens).
        ref_logprobs: ``[...]`` reference log-probs of the labels for ``kl="k1"`` / ``"k3"``.
        kl_coef, entropy_coef: beta and alpha.
        kl: ``"full"`` (exact KL(p||q) over the vocabulary), ``"k1"`` (logp - ref_logp) or ``"k3"``
            (exp(rho) - 1 - rho with rho = ref_logp - logp).
        kl_vocab: with ``kl="full"``, both distributions are renormalised over ids ``< kl_vocab``
            for the KL term only (MaRio's ``[:, :32000]``).
        reduction: ``"mean"`` over valid tokens (0 when every token is ignored), ``"sum"``, or
            ``"none"`` (shaped like labels, 0 at ignored tokens).
        normalizer: with ``"mean"``, divide the sum by this (e.g. the global token count under
            gradient accumulation / data parallelism) instead of the local valid-token count.
        return_stats: also return a dict of detached means over valid tokens (nll, kl, entropy)
            and ``num_tokens``.
        backend: ``"auto" | "torch" | "cpu" | "triton" | "cuda"``.

    Non-finite logits: NaN or +inf in a valid token's logits make that token's loss (and so a mean
    or sum) NaN; -inf logits are probability 0 (a label at -inf gives an infinite loss).
    """
    _check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    _check_labels(labels, lead, V, ignore_index)
    _check_per_token("token_weights", token_weights, lead)
    _check_per_token("ref_logprobs", ref_logprobs, lead)
    if ref_logits is not None:
        _check_float("ref_logits", ref_logits)
        if ref_logits.shape[:-1] != lead:
            raise ValueError(
                f"ref_logits shape {tuple(ref_logits.shape)} does not match logits "
                f"{tuple(logits.shape)} in the leading dimensions"
            )
        if ref_logits.dtype != logits.dtype:
            raise TypeError(
                f"ref_logits dtype {ref_logits.dtype} != logits dtype {logits.dtype}; cast one"
            )
    _check_device(logits.device, labels=labels, token_weights=token_weights,
                  ref_logits=ref_logits, ref_logprobs=ref_logprobs)  # fmt: skip
    _check_common(kl_coef, entropy_coef, reduction, normalizer)
    ref_width = ref_logits.shape[-1] if ref_logits is not None else V
    kl_mode, K = _kl_mode(kl, kl_vocab, V, ref_width, ref_logits is not None,
                          ref_logprobs is not None, kl_coef)  # fmt: skip
    be = resolve_backend(backend, logits.device)

    if be == "torch":
        if not torch.compiler.is_compiling():
            _check_label_range(labels, V, ignore_index)
        out = ref_impl.rationale_loss_terms(
            logits, labels, token_weights=token_weights,
            ref_logits=ref_logits if kl_mode == 1 else None,
            ref_logprobs=ref_logprobs if kl_mode in (2, 3) else None,
            kl=kl, kl_vocab=kl_vocab, kl_coef=float(kl_coef), entropy_coef=float(entropy_coef),
            ignore_index=ignore_index,
        )  # fmt: skip
        loss = _reduce(out["loss"], out["valid"], reduction, normalizer)
        return (loss, _ref_stats(out)) if return_stats else loss

    acc = _acc_dtype(logits.dtype)
    z = _rows2d(logits, V)
    y = labels.reshape(-1).to(torch.int64).contiguous()
    r = _rows2d(ref_logits.detach(), ref_width) if kl_mode == 1 else None
    terms, _ = _rows_op(
        z, y, _opt(token_weights, acc), r, _opt(ref_logprobs, acc) if kl_mode in (2, 3) else None,
        kl_mode, K, float(kl_coef), float(entropy_coef), int(ignore_index), be,
        logits.requires_grad and torch.is_grad_enabled(),
    )  # fmt: skip
    return _finish(terms, y != ignore_index, lead, reduction, normalizer, return_stats)


# --------------------------------------------------------------------------------------------
# fused_linear_rationale_loss


def _fused_chunks(
    backend, hidden, weight, bias, labels, weights, ref_hidden, ref_weight, ref_bias, ref_logprobs,
    kl_mode, kl_vocab, kl_coef, entropy_coef, ignore_index, chunk_size, row_scale,
    need_gh, need_gw, need_gb,
):  # fmt: skip
    """Chunked forward: per chunk, logits = h @ W^T (+ b); the row kernel writes d loss / d logits
    into the same buffer (scaled by row_scale), then grad_hidden and grad_weight are accumulated."""
    N, H = hidden.shape
    dt = hidden.dtype
    acc = _acc_dtype(dt)
    terms = torch.empty((N, 4), dtype=acc, device=hidden.device)
    need_any = need_gh or need_gw or need_gb
    gh = torch.empty_like(hidden) if need_gh else hidden.new_empty(0)
    gw, gb = _linear_grad_buffers(weight, need_gw, need_gb)
    for i0 in range(0, N, chunk_size):
        i1 = min(N, i0 + chunk_size)
        h = hidden[i0:i1]
        logits = torch.nn.functional.linear(h, weight, bias)
        ref = None
        if kl_mode == 1:
            ref = torch.nn.functional.linear(ref_hidden[i0:i1], ref_weight, ref_bias)
        terms[i0:i1] = _launch_rows(
            backend, logits, labels[i0:i1], None if weights is None else weights[i0:i1], ref,
            None if ref_logprobs is None else ref_logprobs[i0:i1], kl_mode, kl_vocab,
            kl_coef, entropy_coef, ignore_index,
            None if row_scale is None else row_scale[i0:i1], logits if need_any else None,
        )  # fmt: skip
        del ref
        if need_gh:
            torch.mm(logits, weight, out=gh[i0:i1])
        _accumulate_linear_grads(logits, h, gw, gb)
    return (terms, gh) + _linear_grads_out(weight, gw, gb)


@torch.library.custom_op("rationale_kernels::fused_linear_rationale_loss", mutates_args=())
def _fused_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    weights: Optional[Tensor],
    ref_hidden: Optional[Tensor],
    ref_weight: Optional[Tensor],
    ref_bias: Optional[Tensor],
    ref_logprobs: Optional[Tensor],
    kl_mode: int,
    kl_vocab: int,
    kl_coef: float,
    entropy_coef: float,
    ignore_index: int,
    backend: str,
    chunk_size: int,
    need_gh: bool,
    need_gw: bool,
    need_gb: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(terms [N, 4], grad_hidden, grad_weight, grad_bias) with every row's gradient scale 1;
    grads not asked for are empty."""
    _check_label_range(labels, weight.shape[0], ignore_index)
    terms, gh, gw, gb = _fused_chunks(
        backend, hidden, weight, bias, labels, weights, ref_hidden, ref_weight, ref_bias,
        ref_logprobs, kl_mode, kl_vocab, kl_coef, entropy_coef, ignore_index, chunk_size, None,
        need_gh, need_gw, need_gb,
    )  # fmt: skip
    return terms, gh, gw, gb


@_fused_op.register_fake
def _(hidden, weight, bias, labels, weights, ref_hidden, ref_weight, ref_bias, ref_logprobs,
      kl_mode, kl_vocab, kl_coef, entropy_coef, ignore_index, backend, chunk_size,
      need_gh, need_gw, need_gb):  # fmt: skip
    terms = hidden.new_empty((hidden.shape[0], 4), dtype=_acc_dtype(hidden.dtype))
    return (terms,) + _fake_grads(hidden, weight, need_gh, need_gw, need_gb)


def _fused_setup(ctx, inputs, output):
    (hidden, weight, bias, labels, weights, ref_hidden, ref_weight, ref_bias, ref_logprobs,
     *rest) = inputs  # fmt: skip
    need_gh, need_gw, need_gb = rest[-3:]
    ctx.grads_in_forward = need_gh or need_gw or need_gb
    ctx.has_bias = bias is not None
    if ctx.grads_in_forward:
        ctx.save_for_backward(*output[1:])
    else:  # reduction="none": recompute in backward
        ctx.rest = rest
        ctx.save_for_backward(hidden, weight, bias, labels, weights, ref_hidden, ref_weight,
                              ref_bias, ref_logprobs)  # fmt: skip


def _fused_backward(ctx, g_terms, g_gh, g_gw, g_gb):
    none = (None,) * 19
    if g_terms is None:
        return none
    g = g_terms[:, 0]
    if ctx.grads_in_forward:
        # The public op only feeds this output to a sum or mean, so g is the same for every row:
        # grad_hidden rows scale exactly per row; grad_weight/bias scale by that common value.
        gh, gw, gb = ctx.saved_tensors
        c = g[:1].reshape(()) if g.numel() else g.new_zeros(())
        # a grad that was not asked for is empty with dim 1 (an empty batch's grad_hidden is [0, H])
        gh = gh * g[:, None].to(gh.dtype) if gh.dim() == 2 else None
        gw = gw * c.to(gw.dtype) if gw.dim() == 2 else None
        gb = gb * c.to(gb.dtype) if (ctx.has_bias and gb.numel()) else None
        return (gh, gw, gb) + none[3:]
    need = ctx.needs_input_grad
    gh, gw, gb = _fused_grad_op(
        *ctx.saved_tensors, *ctx.rest[:7], g.contiguous(), need[0], need[1],
        ctx.has_bias and need[2],
    )  # fmt: skip
    return (gh if need[0] else None, gw if need[1] else None,
            gb if (ctx.has_bias and need[2]) else None) + none[3:]  # fmt: skip


@torch.library.custom_op("rationale_kernels::fused_linear_rationale_loss_grad", mutates_args=())
def _fused_grad_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    weights: Optional[Tensor],
    ref_hidden: Optional[Tensor],
    ref_weight: Optional[Tensor],
    ref_bias: Optional[Tensor],
    ref_logprobs: Optional[Tensor],
    kl_mode: int,
    kl_vocab: int,
    kl_coef: float,
    entropy_coef: float,
    ignore_index: int,
    backend: str,
    chunk_size: int,
    row_scale: Tensor,
    need_gh: bool,
    need_gw: bool,
    need_gb: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of reduction="none": recompute the chunks with per-row gradient scales."""
    _, gh, gw, gb = _fused_chunks(
        backend, hidden, weight, bias, labels, weights, ref_hidden, ref_weight, ref_bias,
        ref_logprobs, kl_mode, kl_vocab, kl_coef, entropy_coef, ignore_index, chunk_size,
        row_scale.to(_acc_dtype(hidden.dtype)), need_gh, need_gw, need_gb,
    )  # fmt: skip
    return gh, gw, gb


@_fused_grad_op.register_fake
def _(hidden, weight, bias, labels, weights, ref_hidden, ref_weight, ref_bias, ref_logprobs,
      kl_mode, kl_vocab, kl_coef, entropy_coef, ignore_index, backend, chunk_size, row_scale,
      need_gh, need_gw, need_gb):  # fmt: skip
    return _fake_grads(hidden, weight, need_gh, need_gw, need_gb)


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


def fused_linear_rationale_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ref_hidden: Optional[Tensor] = None,
    ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
    token_weights: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    kl_coef: float = 0.0,
    kl: str = "full",
    kl_vocab: Optional[int] = None,
    entropy_coef: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Union[None, float, Tensor] = None,
    return_stats: bool = False,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
):
    """:func:`rationale_loss` of ``logits = hidden @ weight.T + bias`` without materialising them.

    ``hidden`` is ``[..., H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]``; for ``kl="full"`` the
    reference logits are ``ref_hidden @ ref_weight.T + ref_bias`` (``ref_weight`` may have more or
    fewer rows than ``weight`` when ``kl_vocab`` is given), computed chunk by chunk as well. Tokens
    are processed ``chunk_size`` rows at a time (default: about 64 MiB of logits on CPU, 1 GiB on
    GPU); peak extra memory is O(chunk_size * V) plus a float32 grad_weight accumulator. With
    reduction "mean"/"sum" the gradients are computed during the forward pass; with "none" the
    backward recomputes the chunks. ``backend="torch"`` is the eager reference (full logits).
    Other arguments as in :func:`rationale_loss`.
    """
    _check_linear("hidden", hidden, "weight", weight, "bias", bias)
    lead = hidden.shape[:-1]
    V = weight.shape[0]
    if V < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    _check_labels(labels, lead, V, ignore_index)
    _check_per_token("token_weights", token_weights, lead)
    _check_per_token("ref_logprobs", ref_logprobs, lead)
    has_ref = ref_hidden is not None or ref_weight is not None
    if has_ref:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("ref_hidden and ref_weight must be given together")
        _check_linear(
            "ref_hidden", ref_hidden, "ref_weight", ref_weight, "ref_bias", ref_bias, lead
        )
        if ref_hidden.dtype != hidden.dtype:
            raise TypeError(f"ref_hidden dtype {ref_hidden.dtype} != hidden dtype {hidden.dtype}")
    elif ref_bias is not None:
        raise ValueError("ref_bias given without ref_hidden/ref_weight")
    _check_device(hidden.device, labels=labels, token_weights=token_weights,
                  ref_hidden=ref_hidden, ref_logprobs=ref_logprobs)  # fmt: skip
    _check_common(kl_coef, entropy_coef, reduction, normalizer)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    ref_width = ref_weight.shape[0] if has_ref else V
    kl_mode, K = _kl_mode(kl, kl_vocab, V, ref_width, has_ref, ref_logprobs is not None, kl_coef)
    be = resolve_backend(backend, hidden.device)

    if be == "torch":
        if not torch.compiler.is_compiling():
            _check_label_range(labels, V, ignore_index)
        logits = torch.nn.functional.linear(hidden, weight, bias)
        ref_logits = None
        if kl_mode == 1:
            with torch.no_grad():
                ref_logits = torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias)
        return rationale_loss(
            logits, labels, token_weights=token_weights, ref_logits=ref_logits,
            ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl=kl, kl_vocab=kl_vocab,
            entropy_coef=entropy_coef, ignore_index=ignore_index, reduction=reduction,
            normalizer=normalizer, return_stats=return_stats, backend="torch",
        )  # fmt: skip

    acc = _acc_dtype(hidden.dtype)
    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H).contiguous()
    N = h2.shape[0]
    y = labels.reshape(-1).to(torch.int64).contiguous()
    rh = rw = rb = None
    if kl_mode == 1:
        rh = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1]).contiguous()
        rw = ref_weight.detach()
        rb = None if ref_bias is None else ref_bias.detach()
    elt = hidden.element_size()
    chunk = chunk_size or _default_chunk(N, V, elt, kl_mode == 1, hidden.device)
    grad_on = torch.is_grad_enabled()
    in_forward = reduction != "none"
    need = [
        in_forward and grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)
    ]
    terms, *_ = _fused_op(
        h2, weight, bias, y, _opt(token_weights, acc), rh, rw, rb,
        _opt(ref_logprobs, acc) if kl_mode in (2, 3) else None,
        kl_mode, K, float(kl_coef), float(entropy_coef), int(ignore_index), be, chunk, *need,
    )  # fmt: skip
    return _finish(terms, y != ignore_index, lead, reduction, normalizer, return_stats)
