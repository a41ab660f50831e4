"""Readable pure-PyTorch reference of sequence log-probs: the oracle of every backend and the
materialising baseline (one full log_softmax over the vocabulary, as TRL computes it).

Conventions (shared with rationale_kernels.ops.sequence_logprobs):
- a token whose label is ``ignore_index`` contributes nothing;
- a sequence's log-prob is the sum over its valid tokens, or with ``average=True`` that sum divided
  by the number of valid tokens; a sequence with no valid token has log-prob 0 either way;
- padded input: logits ``[B, T, V]``, labels ``[B, T]`` -> ``[B]``; packed input: logits ``[N, V]``,
  labels ``[N]`` and ``cu_seqlens`` ``[S + 1]`` (0 = cu[0] <= cu[1] <= ... <= cu[S] = N) -> ``[S]``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-token label log-probs ``log softmax(logits)[label]`` (0 at ignored tokens), computed in
    float32 (float64 for float64 logits), shaped like ``labels``."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    valid = labels != ignore_index
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    tok = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, tok, torch.zeros_like(tok))


def segment_sums(tok: Tensor, valid: Tensor, cu_seqlens: Optional[Tensor], average: bool) -> Tensor:
    """Per-sequence sum (or mean over valid tokens) of per-token values: rows of ``[B, T]`` when
    ``cu_seqlens`` is None, else the segments of ``[N]`` given by ``cu_seqlens``."""
    if cu_seqlens is None:
        total = tok.sum(-1)
        count = valid.sum(-1)
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        total = torch.segment_reduce(tok, "sum", lengths=lengths)
        count = torch.segment_reduce(valid.to(tok.dtype), "sum", lengths=lengths)
    if not average:
        return total
    return total / count.clamp_min(1).to(total.dtype)  # no valid token: 0 / 1 = 0


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    cu_seqlens: Optional[Tensor] = None,
    ignore_index: int = -100,
    average: bool = False,
) -> Tensor:
    """Per-sequence sum (or mean) of label log-probs; differentiable through torch autograd."""
    valid = labels != ignore_index
    tok = token_logprobs(logits, labels, ignore_index)
    return segment_sums(tok, valid, cu_seqlens, average)
