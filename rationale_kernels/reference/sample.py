"""Readable sort-based reference for ``rk.sample`` (the oracle of the tests and the baseline of the
benchmarks). Float64-capable: pass float64 logits for the exact distribution.

The filtered distribution of one row (DESIGN.md §2(3)); logits z, temperature T > 0:

1. ``p = softmax((z - max z) / T)`` (subtracting the max first keeps tiny T finite);
2. top-k (k > 0): keep every token with ``p >= `` the k-th largest p (ties stay together);
3. renormalise the kept tokens to ``p'``; top-p (p < 1): keep x iff the mass under ``p'`` of the
   tokens strictly more likely than x is ``< top_p`` (top_p = 1 keeps everything);
4. min-p: keep x iff ``p_x >= min_p * max p`` (scale-free, so the same on p or p');
5. renormalise the tokens kept by all three filters.

T = 0 is greedy: a point mass on the argmax (the lowest id among equal maxima), which every filter
keeps anyway.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

Param = Union[float, int, Tensor]


def _row_param(x: Param, B: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=dtype).reshape(-1).expand(B)
    return torch.full((B,), x, dtype=dtype, device=device)


def filtered_probs(
    logits: Tensor,
    temperature: Param = 1.0,
    top_k: Param = 0,
    top_p: Param = 1.0,
    min_p: Param = 0.0,
) -> Tensor:
    """The exact filtered, renormalised distribution ``[B, V]`` (in logits' dtype, float32 for
    half types; pass float64 logits for the oracle)."""
    B, V = logits.shape
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    dev = logits.device
    z = logits.to(dt)
    T = _row_param(temperature, B, dt, dev)[:, None]
    k = _row_param(top_k, B, torch.int64, dev)
    tp = _row_param(top_p, B, dt, dev)[:, None]
    mp = _row_param(min_p, B, dt, dev)[:, None]

    zmax = z.max(dim=-1, keepdim=True).values
    greedy = T == 0
    p = torch.softmax((z - zmax) / torch.where(greedy, torch.ones_like(T), T), dim=-1)

    # top-k: threshold = k-th largest probability; ties with it are kept
    s, order = torch.sort(p, dim=-1, descending=True)
    kk = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
    kth = s.gather(-1, (kk - 1)[:, None])
    keep = p >= kth

    # top-p on the top-k-renormalised distribution
    pk = torch.where(keep, p, torch.zeros_like(p))
    pk = pk / pk.sum(dim=-1, keepdim=True)
    sk = torch.sort(pk, dim=-1, descending=True).values
    excl = torch.cumsum(sk, dim=-1) - sk  # mass before each sorted position
    # mass strictly greater than sk[i] = excl at the first position of sk[i]'s tie group
    first = torch.searchsorted(-sk, -sk, side="left")
    greater_sorted = excl.gather(-1, first)
    # back to vocabulary order: the same value has the same "greater" mass
    greater = torch.empty_like(pk)
    order_k = torch.sort(pk, dim=-1, descending=True).indices
    greater.scatter_(-1, order_k, greater_sorted)
    keep &= (greater < tp) | (tp >= 1)

    # min-p relative to the most likely token
    keep &= p >= mp * p.max(dim=-1, keepdim=True).values

    q = torch.where(keep, p, torch.zeros_like(p))
    q = q / q.sum(dim=-1, keepdim=True)
    # greedy rows: point mass on the lowest-id argmax
    if bool(greedy.any()):
        am = torch.argmax(z, dim=-1)  # first maximal index
        onehot = torch.zeros_like(q).scatter_(-1, am[:, None], 1.0)
        q = torch.where(greedy, onehot, q)
    return q


def sample(
    logits: Tensor,
    temperature: Param = 1.0,
    top_k: Param = 0,
    top_p: Param = 1.0,
    min_p: Param = 0.0,
    num_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    return_logprobs: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Sort-based sampling: ``filtered_probs`` then ``torch.multinomial`` (with replacement).
    Returns int64 ids ``[B, num_samples]`` (and their log-probs under the filtered distribution)."""
    B, V = logits.shape
    q = filtered_probs(logits, temperature, top_k, top_p, min_p)
    if B == 0:
        ids = torch.empty((0, num_samples), dtype=torch.int64, device=logits.device)
    else:
        ids = torch.multinomial(q, num_samples, replacement=True, generator=generator)
    if not return_logprobs:
        return ids
    return ids, torch.log(q.gather(-1, ids))
