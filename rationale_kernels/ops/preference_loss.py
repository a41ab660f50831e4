"""Pairwise preference (DPO-family) losses over scored candidates, the pair builder COLLATE uses,
and the end-to-end ``fused_linear_dpo_loss``.

Candidates are scored once and pairs index into them (``pairs[p] = (chosen, rejected)``), so a
candidate that appears in several pairs costs one log-prob computation and receives the sum of its
pairs' gradients (autograd's gather backward). TRL instead pads chosen and rejected into one batch
and recomputes a candidate every time it appears in a pair.

The losses are O(P) elementwise torch code (no kernel is worth it); formulas and conventions are
written out in ``reference/preference_loss.py`` and DESIGN.md §2(2).
"""

from __future__ import annotations

import math
from numbers import Number
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import _check_device
from .sequence_logprobs import _check_cu_seqlens, fused_linear_sequence_logprobs

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
PAIR_MODES = ("best_vs_worst", "all_pairs")


def _check_pairs(pairs: Tensor, num_candidates: int, device: torch.device) -> None:
    if not isinstance(pairs, Tensor) or pairs.dtype not in (torch.int32, torch.int64):
        what = getattr(pairs, "dtype", type(pairs).__name__)
        raise TypeError(f"pairs must be an int32/int64 tensor, got {what}")
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be [P, 2] (chosen, rejected), got {tuple(pairs.shape)}")
    if pairs.shape[0] == 0:
        raise ValueError("pairs is empty: a preference loss needs at least one pair")
    if pairs.device != device:
        raise ValueError(f"pairs is on {pairs.device} but the log-probs are on {device}")
    if torch.compiler.is_compiling():
        return
    lo, hi = int(pairs.min()), int(pairs.max())
    if lo < 0 or hi >= num_candidates:
        bad = lo if lo < 0 else hi
        raise ValueError(f"pair index {bad} is out of range for {num_candidates} candidates")
    if bool((pairs[:, 0] == pairs[:, 1]).any()):
        p = int((pairs[:, 0] == pairs[:, 1]).nonzero()[0, 0])
        raise ValueError(f"pair {p} compares candidate {int(pairs[p, 0])} with itself")


def _check_options(beta, loss_type, label_smoothing) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not isinstance(beta, Number) or not (math.isfinite(float(beta)) and float(beta) > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    eps = label_smoothing
    if not isinstance(eps, Number) or not math.isfinite(float(eps)):
        raise ValueError(f"label_smoothing must be a finite number, got {eps!r}")
    if loss_type in ("hinge", "ipo") and eps != 0:
        raise ValueError(f"label_smoothing is not defined for loss_type={loss_type!r}; use 0")
    if loss_type == "sigmoid" and not 0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for sigmoid, got {eps}")
    if loss_type == "robust" and not 0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for robust, got {eps}")


def _check_logps(policy_logps: Tensor, ref_logps: Tensor) -> None:
    for name, t in (("policy_logps", policy_logps), ("ref_logps", ref_logps)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D [num_candidates], got {tuple(t.shape)}")
    if policy_logps.shape != ref_logps.shape:
        raise ValueError(
            f"policy_logps has {policy_logps.shape[0]} candidates but ref_logps has "
            f"{ref_logps.shape[0]}"
        )
    _check_device(policy_logps.device, ref_logps=ref_logps)


def preference_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    pairs: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """DPO-family loss over (chosen, rejected) pairs of scored candidates.

    Args:
        policy_logps: ``[C]`` sequence log-probs of the candidates under the policy
            (differentiable).
        ref_logps: ``[C]`` the same under the frozen reference (never receives a gradient).
        pairs: int ``[P, 2]`` (chosen, rejected) candidate indices, P >= 1; a candidate may appear
            in many pairs (its gradient is the sum over them).
        beta: the KL temperature β > 0.
        loss_type: ``"sigmoid"`` (DPO; conservative DPO with label_smoothing), ``"ipo"``,
            ``"hinge"`` or ``"robust"`` (unbiased under label noise, label_smoothing < 0.5).
            IPO uses the log-probs as passed: pass ``average=True`` log-probs for the paper's
            length-normalised IPO.
        label_smoothing: ε, the assumed probability that a pair's preference is flipped.

    Returns:
        ``(loss, metrics)``: the mean loss over pairs (float32, float64 for float64 inputs) and
        detached per-pair ``chosen_rewards``/``rejected_rewards`` (β·(logπ − logπ_ref)),
        ``margins`` (chosen − rejected), ``chosen_logps``/``rejected_logps`` and the scalar
        ``accuracy`` (fraction of margins > 0; ties count as wrong).
    """
    _check_logps(policy_logps, ref_logps)
    _check_options(beta, loss_type, label_smoothing)
    _check_pairs(pairs, policy_logps.shape[0], policy_logps.device)
    acc = torch.float64 if policy_logps.dtype == torch.float64 else torch.float32
    pi = policy_logps.to(acc)
    ref = ref_logps.detach().to(acc)
    c, r = pairs[:, 0].long(), pairs[:, 1].long()
    chosen = pi[c] - ref[c]
    rejected = pi[r] - ref[r]
    delta = chosen - rejected
    eps = float(label_smoothing)
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (
            1 - 2 * eps
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo
        losses = (delta - 1 / (2 * beta)) ** 2
    with torch.no_grad():
        chosen_rewards = beta * chosen.detach()
        rejected_rewards = beta * rejected.detach()
        margins = chosen_rewards - rejected_rewards
        metrics = {
            "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards,
            "margins": margins,
            "chosen_logps": pi.detach()[c],
            "rejected_logps": pi.detach()[r],
            "accuracy": (margins > 0).to(acc).mean(),
        }
    return losses.mean(), metrics


def preference_pairs(scores: Tensor, groups: Tensor, *, mode: str = "best_vs_worst") -> Tensor:
    """(chosen, rejected) pairs from per-candidate scores grouped by question.

    Args:
        scores: ``[C]`` float, higher is better (e.g. COLLATE's log-likelihood of the gold answer).
        groups: ``[C]`` int group id (question) of each candidate; ids need not be sorted or dense.
        mode: ``"best_vs_worst"``: one pair per group, its highest against its lowest score
            (COLLATE); ``"all_pairs"``: every (i, j) in a group with ``scores[i] > scores[j]``.

    Ties are deterministic: the best is the lowest index among equal maxima and the worst the
    highest index among equal minima; tied candidates never form a pair (nothing to prefer), so a
    group whose scores are all equal, or that has a single candidate, gives no pair. Pairs are
    ordered by group id, then chosen, then rejected index. Returns int64 ``[P, 2]`` on the scores'
    device (P may be 0). NaN scores are an error.
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"mode must be one of {PAIR_MODES}, got {mode!r}")
    if not isinstance(scores, Tensor) or not scores.is_floating_point() or scores.dim() != 1:
        raise TypeError("scores must be a 1-D floating-point tensor [num_candidates]")
    if not isinstance(groups, Tensor) or groups.is_floating_point() or groups.is_complex():
        raise TypeError("groups must be an integer tensor [num_candidates]")
    if groups.shape != scores.shape:
        raise ValueError(f"groups shape {tuple(groups.shape)} != scores {tuple(scores.shape)}")
    _check_device(scores.device, groups=groups)
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")
    s = scores.detach().to("cpu", torch.float64)
    g = groups.detach().to("cpu", torch.int64)
    out = []
    for gid in torch.unique(g).tolist():  # sorted
        idx = (g == gid).nonzero().squeeze(1)  # ascending candidate index
        if idx.numel() < 2:
            continue
        sg = s[idx]
        if mode == "best_vs_worst":
            hi, lo = sg.max(), sg.min()
            if hi == lo:
                continue
            best = idx[(sg == hi).nonzero()[0, 0]]
            worst = idx[(sg == lo).nonzero()[-1, 0]]
            out.append(torch.stack([best, worst]).unsqueeze(0))
        else:
            better = sg[:, None] > sg[None, :]
            ci, ri = better.nonzero(as_tuple=True)  # row-major: by chosen, then rejected
            if ci.numel():
                out.append(torch.stack([idx[ci], idx[ri]], 1))
    pairs = torch.cat(out) if out else torch.empty((0, 2), dtype=torch.int64)
    return pairs.to(scores.device)


def fused_linear_dpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    cu_seqlens: Optional[Tensor],
    ref_logps: Tensor,
    pairs: Tensor,
    *,
    bias: Optional[Tensor] = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average: bool = False,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """End-to-end DPO from hidden states: :func:`fused_linear_sequence_logprobs` of the candidates
    that appear in ``pairs`` (each computed once, however many pairs it is in; candidates in no
    pair are skipped entirely), then :func:`preference_loss`.

    Args:
        hidden: packed ``[N, H]`` with ``cu_seqlens`` ``[C + 1]``, or padded ``[C, T, H]`` with
            ``cu_seqlens=None``; labels ``[N]`` or ``[C, T]`` (``ignore_index`` on prompt and
            padding tokens), already aligned with hidden.
        weight, bias: LM head ``[V, H]`` and optional ``[V]``.
        ref_logps: ``[C]`` reference sequence log-probs (computed with the same ``average``).
        pairs, beta, loss_type, label_smoothing: as in :func:`preference_loss`.
        average, ignore_index, chunk_size, backend: as in :func:`fused_linear_sequence_logprobs`.

    Returns ``(loss, metrics)`` as :func:`preference_loss`.
    """
    if not isinstance(hidden, Tensor):
        raise TypeError("hidden must be a tensor")
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(
                f"hidden must be padded [C, T, H] (or packed [N, H] with cu_seqlens), got "
                f"{tuple(hidden.shape)}"
            )
        C = hidden.shape[0]
    else:
        if hidden.dim() != 2:
            raise ValueError(f"with cu_seqlens, hidden must be [N, H], got {tuple(hidden.shape)}")
        C = _check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device)
    if not isinstance(ref_logps, Tensor) or ref_logps.dim() != 1 or ref_logps.shape[0] != C:
        raise ValueError(
            f"ref_logps must be [{C}] (one per candidate), got "
            f"{tuple(getattr(ref_logps, 'shape', ()))}"
        )
    _check_device(hidden.device, ref_logps=ref_logps)
    _check_options(beta, loss_type, label_smoothing)
    _check_pairs(pairs, C, hidden.device)

    used = torch.unique(pairs)  # sorted candidate ids that appear in some pair
    new_pairs = torch.searchsorted(used, pairs.to(used.dtype).contiguous())
    cu = cu_seqlens
    if used.numel() < C:  # drop the candidates no pair uses before any matmul
        if cu_seqlens is None:
            hidden, labels = hidden[used], labels[used]
        else:
            cu64 = cu_seqlens.long()
            starts, lens = cu64[used], cu64[used + 1] - cu64[used]
            new_cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
            rows = torch.repeat_interleave(starts - new_cu[:-1], lens)
            rows = rows + torch.arange(rows.numel(), device=rows.device)
            hidden, labels, cu = hidden[rows], labels[rows], new_cu.to(cu_seqlens.dtype)
    logps = fused_linear_sequence_logprobs(
        hidden, weight, labels, bias=bias, cu_seqlens=cu, ignore_index=ignore_index,
        average=average, chunk_size=chunk_size, backend=backend,
    )  # fmt: skip
    return preference_loss(
        logps, ref_logps[used].to(logps.dtype), new_pairs, beta=beta, loss_type=loss_type,
        label_smoothing=label_smoothing,
    )  # fmt: skip
