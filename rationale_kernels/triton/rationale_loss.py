"""Triton implementation of the rationale-loss row kernel.

Same contract as csrc/rationale_loss.h (math, in-place grad, NaN / -inf behaviour): one program per
row, two streaming passes over the vocabulary in BLOCK_V chunks.

  pass 1: online softmax statistics, kept per segment A = [0, K) and B = [K, V) so the FULL-KL
          restricted softmax over the first K ids comes out of the same sweep:
            m = running max, s = sum e^{z-m}, t = sum e^{z-m} (z-m),
            u = sum_A e^{z-mA} (z-r),  mr / sr = max / sum e^{r-mr} of the reference logits on A.
  pass 2: (grad only) p = e^{z-lse}, p~ = e^{z-lse_K} and the closed-form gradient of the header.

-inf logits are probability 0: every "e * (z - m)" product is guarded with tl.where so that no
0 * inf appears, while NaN / +inf logits still reach exp() and turn the row's terms into NaN.
"""

import torch
import triton
import triton.language as tl

from ._common import ACC, acc_dtype, device_ctx, rn_bf16, round_bf16, row_block_config

KL_NONE, KL_FULL, KL_K1, KL_K3 = 0, 1, 2, 3


@triton.jit
def _block_stats(z, m_old, s_old, t_old):
    """Merge one block (masked lanes = -inf) into the running (m, s, t); also return the lane
    weights e = e^{z-m} and the rescale factor f of the old state, for the u sum."""
    m = tl.maximum(m_old, tl.max(z, 0))
    live = z != float("-inf")
    dz = tl.where(live, z - m, 0.0)  # m may be -inf when the whole block is -inf
    e = tl.where(live, tl.exp(dz), 0.0)  # NaN / +inf survive (NaN != -inf)
    # Rescale the old state to the new max; an empty old state (m_old = -inf) contributes nothing.
    empty = m_old == float("-inf")
    f = tl.where(empty, 0.0, tl.exp(m_old - m))
    dm = tl.where(empty, 0.0, m_old - m)
    s = f * s_old + tl.sum(e, 0)
    t = f * (t_old + s_old * dm) + tl.sum(e * dz, 0)
    return m, s, t, e, f


@triton.jit
def _seg_plogp(m, s, t, M, logS):
    # sum_{v in seg} p_v (z_v - lse), lse = M + logS, p = softmax over the whole row (0 if empty).
    empty = m == float("-inf")
    d = tl.where(empty, 0.0, (m - M) - logS)  # m - lse without rounding against a large lse
    return tl.where(empty, 0.0, tl.exp(d) * (t + s * d))


@triton.jit
def _rationale_loss_kernel(
    logits_ptr,
    logits_ld,
    labels_ptr,
    weights_ptr,
    ref_ptr,
    ref_ld,
    ref_lp_ptr,
    scale_ptr,
    grad_ptr,
    grad_ld,
    terms_ptr,
    V,
    K,
    kl_hi,
    kl_lo,
    ent_hi,
    ent_lo,
    ignore_index,
    KL_MODE: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    RN_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * ld can exceed 2^31
    cols0 = tl.arange(0, BLOCK_V)
    z_row = logits_ptr + row * logits_ld
    r_row = ref_ptr + row * ref_ld
    g_row = grad_ptr + row * grad_ld
    y = tl.load(labels_ptr + row)
    NEG_INF: tl.constexpr = float("-inf")
    zero = tl.full([], 0.0, ACC)
    # float arguments arrive as fp32: hi + lo restores the coefficients to ~2^-48 for fp64
    kl_coef = (zero + kl_hi) + kl_lo
    entropy_coef = (zero + ent_hi) + ent_lo

    if y == ignore_index:
        tl.store(terms_ptr + row * 4 + tl.arange(0, 4), tl.zeros([4], ACC))
        if HAS_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                tl.store(
                    g_row + cols,
                    tl.zeros([BLOCK_V], ACC).to(grad_ptr.dtype.element_ty),
                    mask=cols < V,
                )
    else:
        # ---- pass 1: segment statistics (segment B is empty unless FULL) ----
        mA = tl.full([], NEG_INF, ACC)
        sA = zero
        tA = zero
        uA = zero
        mB = tl.full([], NEG_INF, ACC)
        sB = zero
        tB = zero
        mr = tl.full([], NEG_INF, ACC)
        sr = zero
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            z = tl.load(z_row + cols, mask=cols < V, other=NEG_INF).to(ACC)
            if KL_MODE == 1:
                inA = cols < K
                zA = tl.where(inA, z, NEG_INF)
                mA, sA, tA, eA, fA = _block_stats(zA, mA, sA, tA)
                mB, sB, tB, _eB, _fB = _block_stats(tl.where(inA, NEG_INF, z), mB, sB, tB)
                r = tl.load(r_row + cols, mask=inA, other=NEG_INF).to(ACC)
                # u is centred at mA like s: rescale with the same factor; z = -inf lanes add 0.
                uA = fA * uA + tl.sum(tl.where(zA != NEG_INF, eA * (zA - r), 0.0), 0)
                mr, sr, _tr, _er, _fr = _block_stats(r, mr, sr, zero)
            else:
                mA, sA, tA, _eA, _fA = _block_stats(z, mA, sA, tA)

        # lse = M + logS with M = max(mA, mB). Like log_softmax, nll and H use M and logS apart so
        # that a small nll does not cancel against a large lse.
        if KL_MODE == 1:
            M = tl.maximum(mA, mB)
            M0 = tl.where(M == NEG_INF, 0.0, M)  # all -inf row: no -inf - -inf
            logS = tl.log(sA * tl.exp(mA - M0) + sB * tl.exp(mB - M0))
            ent = -(_seg_plogp(mA, sA, tA, M, logS) + _seg_plogp(mB, sB, tB, M, logS))
        else:
            M = mA
            logS = tl.log(sA)
            ent = -_seg_plogp(mA, sA, tA, M, logS)
        nll = (M - tl.load(z_row + y).to(ACC)) + logS
        w = tl.full([], 1.0, ACC)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + row).to(ACC)
        kl = zero
        wp = w  # w' = w - kl_coef * c (c = dKL/dnll)
        D = zero  # E_p~[z - r] (FULL)
        if KL_MODE == 1:
            D = uA / sA
            # kl = D - lse_K + lse_rK, with the maxima taken apart so that large logits do not round
            kl = D - (mA - mr) - (tl.log(sA) - tl.log(sr))
        if KL_MODE == 2:
            kl = -nll - tl.load(ref_lp_ptr + row).to(ACC)
            wp = w - kl_coef
        if KL_MODE == 3:
            # exp(rho) - 1 - rho cancels for the small rho of training: one scalar in fp64 is free.
            rho = tl.load(ref_lp_ptr + row).to(tl.float64) + nll.to(tl.float64)
            er = tl.exp(rho)
            kl = (er - 1.0 - rho).to(ACC)
            wp = w - kl_coef * (1.0 - er).to(ACC)
        loss = w * nll + kl_coef * kl - entropy_coef * ent

        t4 = tl.arange(0, 4)
        vals = tl.where(t4 == 0, loss, tl.where(t4 == 1, nll, tl.where(t4 == 2, kl, ent)))
        tl.store(terms_ptr + row * 4 + t4, vals)

        # ---- pass 2: gradient (each element is loaded before it is stored: grad may be logits) --
        if HAS_GRAD:
            scale = tl.full([], 1.0, ACC)
            if HAS_SCALE:
                scale = tl.load(scale_ptr + row).to(ACC)
            log_sA = tl.log(sA)
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                valid = cols < V
                z = tl.load(z_row + cols, mask=valid, other=NEG_INF).to(ACC)
                # log p and log p~ centred like log_softmax (no rounding against a large lse);
                # z - E_p z = log p + H.
                logp = (z - M) - logS
                p = tl.exp(logp)
                # p == 0 (z = -inf) contributes exactly 0; a NaN p is kept so NaN rows stay NaN.
                g = tl.where(p == 0.0, 0.0, p * (wp + entropy_coef * (logp + ent)))
                if KL_MODE == 1:
                    inK = cols < K
                    r = tl.load(r_row + cols, mask=inK, other=0.0).to(ACC)
                    pk = tl.exp((z - mA) - log_sA)  # p~ = p * Z / Z_K
                    g += tl.where(inK & (pk != 0.0), kl_coef * pk * (z - r - D), 0.0)
                g -= tl.where(cols == y, wp, 0.0)
                g = scale * g
                if RN_BF16:
                    g = round_bf16(g)
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=valid)


def _launch_config(V: int, dtype: torch.dtype, full: bool):
    # ~16 fp32 lanes per thread per block vector (8 for FULL, which keeps ~2x more live vectors;
    # halved again for fp64): no register spills on sm_90 (ptxas, triton 3.9: <= 88 regs
    # fp32/bf16/fp16, <= 106 fp64).
    return row_block_config(V, dtype, lanes=8 if full else 16)


def _split(x: float):
    # x = hi + lo with both fp32-representable (Triton passes Python floats as fp32)
    hi = float(torch.tensor(float(x), dtype=torch.float32))
    return hi, float(torch.tensor(float(x) - hi, dtype=torch.float32))


def rationale_loss_rows(
    logits,
    labels,
    weights,
    ref_logits,
    ref_logprobs,
    kl_mode: int,
    kl_vocab: int,
    kl_coef: float,
    entropy_coef: float,
    ignore_index: int,
    row_scale,
    grad,
) -> torch.Tensor:
    """Per-row (loss, nll, kl, entropy) terms, [N, 4] in the accumulation type (float32; float64
    for float64 logits). Writes row_scale * dloss/dlogits into grad when given (may be logits)."""
    acc_torch = acc_dtype(logits.dtype, "rationale_loss_rows")
    N, V = logits.shape
    terms = torch.empty((N, 4), dtype=acc_torch, device=logits.device)
    if N == 0:
        return terms
    assert logits.stride(1) == 1 and labels.is_contiguous()
    full = kl_mode == KL_FULL
    K = int(kl_vocab) if full else V
    if full:
        assert ref_logits is not None and ref_logits.stride(1) == 1 and 1 <= K <= V
    if kl_mode in (KL_K1, KL_K3):
        assert ref_logprobs is not None
    if grad is not None:
        assert grad.shape == logits.shape and grad.stride(1) == 1 and grad.dtype == logits.dtype

    block, num_warps = _launch_config(V, logits.dtype, full)
    dummy = terms  # any valid pointer for arguments that compile away
    with device_ctx(logits):
        _rationale_loss_kernel[(N,)](
            logits,
            logits.stride(0),
            labels,
            weights if weights is not None else dummy,
            ref_logits if full else logits,
            ref_logits.stride(0) if full else 0,
            ref_logprobs if ref_logprobs is not None else dummy,
            row_scale if row_scale is not None else dummy,
            grad if grad is not None else logits,
            grad.stride(0) if grad is not None else 0,
            terms,
            V,
            K,
            *_split(kl_coef),
            *_split(entropy_coef),
            int(ignore_index),
            KL_MODE=int(kl_mode),
            HAS_WEIGHTS=weights is not None,
            HAS_SCALE=row_scale is not None,
            HAS_GRAD=grad is not None,
            ACC=ACC[logits.dtype],
            BLOCK_V=block,
            RN_BF16=rn_bf16(logits),
            num_warps=num_warps,
        )
    return terms
