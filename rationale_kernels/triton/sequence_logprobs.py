"""Triton token log-prob row kernels behind rk.sequence_logprobs.

Same contract as csrc/sequence_logprobs.h (strided [B, T, V] rows, NaN / -inf behaviour, in-place
backward): one program per row, the vocabulary streamed in BLOCK_V chunks.

  forward:  online max m and s = sum e^{z-m} over the row; lse = m + log s and
            logp = (z_y - m) - log s (centred like log_softmax: no rounding against a large lse).
  backward: one pass, grad_j = w ([j == y] - e^{z_j - lse}) with lse from the forward; every chunk
            is loaded before it is stored, so grad may be the logits' own memory.

-inf logits are probability 0 (guarded with tl.where so that no -inf - -inf appears); NaN / +inf
logits reach exp() and turn the row's s, hence logp and lse, into NaN.
"""

import torch
import triton
import triton.language as tl

from ._common import ACC, acc_dtype, device_ctx, rn_bf16, round_bf16, row_block_config


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    stride_b,
    stride_t,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    T,
    V,
    ignore_index,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: offsets can exceed 2^31
    b = row // T
    z_row = logits_ptr + b * stride_b + (row - b * T) * stride_t
    y = tl.load(labels_ptr + row)
    NEG_INF: tl.constexpr = float("-inf")
    zero = tl.full([], 0.0, ACC)
    if y == ignore_index:
        tl.store(logp_ptr + row, zero)
        tl.store(lse_ptr + row, zero)
    else:
        cols0 = tl.arange(0, BLOCK_V)
        m = tl.full([], NEG_INF, ACC)
        s = zero
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            z = tl.load(z_row + cols, mask=cols < V, other=NEG_INF).to(ACC)
            m_new = tl.maximum(m, tl.max(z, 0))
            live = z != NEG_INF
            e = tl.where(live, tl.exp(tl.where(live, z - m_new, 0.0)), 0.0)  # NaN / +inf survive
            # rescale the old sum to the new max; an empty old state (m = -inf) contributes nothing
            f = tl.where(m == NEG_INF, 0.0, tl.exp(m - m_new))
            s = f * s + tl.sum(e, 0)
            m = m_new
        log_s = tl.log(s)
        zy = tl.load(z_row + y).to(ACC)
        tl.store(logp_ptr + row, (zy - m) - log_s)
        tl.store(lse_ptr + row, m + log_s)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,
    stride_b,
    stride_t,
    labels_ptr,
    lse_ptr,
    w_ptr,
    grad_ptr,
    grad_ld,
    T,
    V,
    ignore_index,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    RN_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    z_row = logits_ptr + b * stride_b + (row - b * T) * stride_t
    g_row = grad_ptr + row * grad_ld
    y = tl.load(labels_ptr + row)
    w = tl.load(w_ptr + row).to(ACC)
    cols0 = tl.arange(0, BLOCK_V)
    if (y == ignore_index) | (w == 0.0):  # zeros, even for non-finite logits
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            tl.store(
                g_row + cols, tl.zeros([BLOCK_V], ACC).to(grad_ptr.dtype.element_ty), mask=cols < V
            )
    else:
        lse = tl.load(lse_ptr + row).to(ACC)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            valid = cols < V
            z = tl.load(z_row + cols, mask=valid, other=float("-inf")).to(ACC)
            p = tl.exp(z - lse)  # z = -inf gives 0; NaN lse (non-finite row) gives NaN
            g = w * (tl.where(cols == y, 1.0, 0.0) - p)
            if RN_BF16:
                g = round_bf16(g)
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=valid)


def token_logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """(logp, lse), both [B, T] in the accumulation type (float32; float64 for float64 logits).

    logits: [B, T, V] with unit stride on V (any B / T strides; any V stride when V == 1);
    labels: int64 [B, T] contiguous.
    Ignored rows (label == ignore_index) get logp = lse = 0."""
    acc = acc_dtype(logits.dtype, "token_logprobs")
    B, T, V = logits.shape
    logp = torch.empty((B, T), dtype=acc, device=logits.device)
    lse = torch.empty((B, T), dtype=acc, device=logits.device)
    if B * T == 0:
        return logp, lse
    assert (logits.stride(2) == 1 or V == 1) and labels.is_contiguous() and labels.shape == (B, T)
    block, num_warps = row_block_config(V, logits.dtype)
    with device_ctx(logits):
        _token_logprobs_fwd_kernel[(B * T,)](
            logits,
            logits.stride(0),
            logits.stride(1),
            labels,
            logp,
            lse,
            T,
            V,
            int(ignore_index),
            ACC=ACC[logits.dtype],
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return logp, lse


def token_logprobs_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    w: torch.Tensor,
    ignore_index: int,
    grad: torch.Tensor,
) -> torch.Tensor:
    """Writes grad[r, j] = w[r] ([j == y_r] - exp(z_rj - lse[r])) (0 for ignored rows and w == 0)
    into grad, a [B * T, V] tensor of logits' dtype with unit column stride; row r = b * T + t.
    lse, w: [B, T] (or [B * T]) contiguous, accumulation type. grad may be the memory of a
    contiguous logits (in-place). Returns grad."""
    acc = acc_dtype(logits.dtype, "token_logprobs")
    B, T, V = logits.shape
    if B * T == 0:
        return grad
    assert (logits.stride(2) == 1 or V == 1) and labels.is_contiguous() and labels.numel() == B * T
    assert grad.dim() == 2 and grad.shape == (B * T, V) and grad.dtype == logits.dtype
    assert grad.stride(1) == 1 or V <= 1
    assert lse.dtype == acc and w.dtype == acc and lse.is_contiguous() and w.is_contiguous()
    block, num_warps = row_block_config(V, logits.dtype)
    with device_ctx(logits):
        _token_logprobs_bwd_kernel[(B * T,)](
            logits,
            logits.stride(0),
            logits.stride(1),
            labels,
            lse,
            w,
            grad,
            grad.stride(0),
            T,
            V,
            int(ignore_index),
            ACC=ACC[logits.dtype],
            BLOCK_V=block,
            RN_BF16=rn_bf16(logits),
            num_warps=num_warps,
        )
    return grad
