"""Triton sampler: same contract as csrc/sample.h, one program per row, no sorting.

Every pass streams the row in BLOCK chunks and recomputes ``e = exp((z - m) / T)`` (cast to
float32, in [0, 1], the max has e = 1). Non-negative float32 values order like their int32 bit
patterns, so thresholds are found by a radix search over those keys: each of 8 passes evaluates 16
candidate keys at once (4 bits), keeping the largest key K with W(K) >= target, where
W(K) = sum over tokens with key >= K of a weight:

- top-k: weight 1, target k -> K is the key of the k-th largest e (ties with it are kept);
- top-p: weight e over the top-k survivors, target top_p * S_k -> the largest K whose upper set
  holds mass >= top_p * S_k, i.e. the smallest x whose strictly-larger mass is < top_p * S_k.

min-p is the key of min_p itself. Then Z (sum of kept e) and the draws: for a block of draws,
``u = (tl.randint(seed, (row << 32) | d) >> 8) * 2**-24`` (the Philox stream of csrc/philox.h),
target u * Z, and the first kept token with positive weight whose prefix mass exceeds it.
"""

import torch
import triton
import triton.language as tl

from .. import _native
from ._common import ACC, device_ctx


@triton.jit
def _e_block(row_ptr, cols, V, m, inv_t, ACC: tl.constexpr):
    z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(ACC)
    d = tl.where(z == float("-inf"), float("-inf"), (z - m) * inv_t)
    return tl.exp(d).to(tl.float32)


@triton.jit
def _radix_search(row_ptr, V, m, inv_t, key_min, target, MASS: tl.constexpr,
                  ACC: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Largest int32 key K with sum_{key >= max(K, key_min)} weight >= target (keys < 2**30)."""
    d = tl.arange(0, 16)
    prefix = tl.zeros([], dtype=tl.int32)
    for it in tl.static_range(8):
        shift: tl.constexpr = 28 - 4 * it
        piv = prefix | (d << shift)
        acc = tl.zeros([16], dtype=tl.float32)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            e = _e_block(row_ptr, cols, V, m, inv_t, ACC)
            key = e.to(tl.int32, bitcast=True)
            ok = (cols < V) & (key >= key_min)
            if MASS:
                w = tl.where(ok, e, 0.0)
            else:
                w = tl.where(ok, 1.0, 0.0)
            hit = key[:, None] >= piv[None, :]
            acc += tl.sum(tl.where(hit, w[:, None], 0.0), 0)
        # at shift 28 only digits < 8 are valid (d << 28 must stay positive)
        lim: tl.constexpr = 8 if it == 0 else 16
        good = (acc >= target) & (d < lim)
        best = tl.max(tl.where(good, d, 0), 0)
        prefix = prefix | (best << shift)
    return prefix


@triton.jit
def _sample_kernel(
    logits_ptr, ld, V, temp_ptr, temp_s, topk_ptr, topk_s, topp_ptr, topp_s, minp_ptr, minp_s,
    S, seed, ids_ptr, lp_ptr,
    HAS_T: tl.constexpr, HAS_K: tl.constexpr, HAS_P: tl.constexpr, HAS_M: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, SB: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * ld
    out_ids = ids_ptr + row.to(tl.int64) * S
    out_lp = lp_ptr + row.to(tl.int64) * S
    lanes = tl.arange(0, BLOCK)
    BIG: tl.constexpr = 2147483647

    # pass 1: max, NaN / +inf
    m = tl.full([], float("-inf"), dtype=ACC)
    nbad = tl.zeros([], dtype=tl.int32)
    for off in range(0, V, BLOCK):
        cols = off + lanes
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(ACC)
        m = tl.maximum(m, tl.max(z, 0))
        nbad += tl.sum(((z != z) | (z == float("inf"))).to(tl.int32), 0)

    if HAS_T:
        temp = tl.load(temp_ptr + row).to(tl.float32)
    else:
        temp = temp_s
    if (nbad > 0) | (m == float("-inf")):
        code = tl.where(nbad > 0, -1, -2).to(tl.int64)
        for s0 in range(0, S, SB):
            ds = s0 + tl.arange(0, SB)
            tl.store(out_ids + ds, tl.zeros([SB], dtype=tl.int64) + code, mask=ds < S)
            tl.store(out_lp + ds, tl.full([SB], float("nan"), dtype=ACC), mask=ds < S)
    elif temp == 0.0:
        # greedy: the lowest index of the maximum
        am = tl.full([], BIG, dtype=tl.int32)
        for off in range(0, V, BLOCK):
            cols = off + lanes
            z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(ACC)
            am = tl.minimum(am, tl.min(tl.where(z == m, cols, BIG), 0))
        for s0 in range(0, S, SB):
            ds = s0 + tl.arange(0, SB)
            tl.store(out_ids + ds, tl.zeros([SB], dtype=tl.int64) + am.to(tl.int64), mask=ds < S)
            tl.store(out_lp + ds, tl.zeros([SB], dtype=ACC), mask=ds < S)
    else:
        inv_t = tl.minimum(1.0 / temp.to(ACC), 3.0e38)
        if HAS_K:
            k = tl.load(topk_ptr + row)
        else:
            k = topk_s + tl.zeros([], dtype=tl.int64)  # (an int arg of 1 is a constexpr)
        if HAS_P:
            top_p = tl.load(topp_ptr + row).to(tl.float32)
        else:
            top_p = topp_s
        if HAS_M:
            min_p = tl.load(minp_ptr + row).to(tl.float32)
        else:
            min_p = minp_s

        key_k = tl.zeros([], dtype=tl.int32)
        if (k > 0) & (k < V):
            key_k = _radix_search(row_ptr, V, m, inv_t, 0, k.to(tl.float32), False, ACC, BLOCK)
        key_p = tl.zeros([], dtype=tl.int32)
        if top_p < 1.0:
            s_k = tl.zeros([], dtype=tl.float32)
            for off in range(0, V, BLOCK):
                cols = off + lanes
                e = _e_block(row_ptr, cols, V, m, inv_t, ACC)
                s_k += tl.sum(tl.where(e.to(tl.int32, bitcast=True) >= key_k, e, 0.0), 0)
            key_p = _radix_search(row_ptr, V, m, inv_t, key_k, top_p * s_k, True, ACC, BLOCK)
        key_m = min_p.to(tl.float32).to(tl.int32, bitcast=True)
        thr = tl.maximum(tl.maximum(key_k, key_p), key_m)

        # Z with the same prefix arithmetic as the draws; the last kept token with mass
        z_tot = tl.zeros([], dtype=tl.float32)
        last = tl.zeros([], dtype=tl.int32)
        for off in range(0, V, BLOCK):
            cols = off + lanes
            e = _e_block(row_ptr, cols, V, m, inv_t, ACC)
            w = tl.where((e.to(tl.int32, bitcast=True) >= thr) & (cols < V), e, 0.0)
            z_tot = tl.max(tl.cumsum(w, 0) + z_tot, 0)
            last = tl.maximum(last, tl.max(tl.where(w > 0, cols, 0), 0))
        log_z = tl.log(z_tot.to(ACC))

        for s0 in range(0, S, SB):
            ds = s0 + tl.arange(0, SB)
            offs = (row.to(tl.int64) << 32) | ds.to(tl.int64)
            bits = tl.randint(seed, offs)
            u = (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)
            t = u * z_tot
            found = tl.full([SB], BIG, dtype=tl.int32)
            carry = tl.zeros([], dtype=tl.float32)
            for off in range(0, V, BLOCK):
                cols = off + lanes
                e = _e_block(row_ptr, cols, V, m, inv_t, ACC)
                w = tl.where((e.to(tl.int32, bitcast=True) >= thr) & (cols < V), e, 0.0)
                c = tl.cumsum(w, 0) + carry
                hit = (c[None, :] > t[:, None]) & (w[None, :] > 0)
                found = tl.minimum(found, tl.min(tl.where(hit, cols[None, :], BIG), 1))
                carry = tl.max(c, 0)
            pick = tl.where(found == BIG, last, found)
            zp = tl.load(row_ptr + pick).to(ACC)
            lp = (zp - m) * inv_t - log_z
            tl.store(out_ids + ds, pick.to(tl.int64), mask=ds < S)
            tl.store(out_lp + ds, lp, mask=ds < S)


def sample_rows(logits, temperature, temperature_s, top_k, top_k_s, top_p, top_p_s, min_p, min_p_s,
                num_samples, seed):  # fmt: skip
    """Launches the kernel; returns (ids int64 [B, S], logprobs [B, S] float32/float64).
    Bad rows get negative ids (see csrc/sample.h); the caller raises."""
    B, V = logits.shape
    S = num_samples
    dev = logits.device
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ids = torch.empty((B, S), dtype=torch.int64, device=dev)
    lp = torch.empty((B, S), dtype=acc, device=dev)
    if B == 0:
        return ids, lp
    dummy = torch.empty(1, dtype=torch.float32, device=dev)

    def arr(t, dtype):
        return dummy if t is None else t.to(dtype).contiguous()

    block = min(triton.next_power_of_2(V), 1024)
    # draws per inner step: a [SB, BLOCK] tile; the interpreter (numpy) prefers big tiles
    tile = 1 << 18 if _native.triton_interpret() else 1 << 14
    sb = max(2, min(triton.next_power_of_2(S), tile // block))
    num_warps = 4 if block <= 256 else 8
    with device_ctx(logits):
        _sample_kernel[(B,)](
            logits, logits.stride(0), V,
            arr(temperature, torch.float32), float(temperature_s),
            arr(top_k, torch.int64), int(top_k_s),
            arr(top_p, torch.float32), float(top_p_s),
            arr(min_p, torch.float32), float(min_p_s),
            S, int(seed), ids, lp,
            HAS_T=temperature is not None, HAS_K=top_k is not None,
            HAS_P=top_p is not None, HAS_M=min_p is not None,
            ACC=ACC[logits.dtype], BLOCK=block, SB=sb, num_warps=num_warps,
        )  # fmt: skip
    return ids, lp
