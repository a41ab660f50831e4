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
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dispatch import resolve_backend
from ..reference.sequence_logprobs import segment_sums
from . import sequence_logprobs as _seq
from ._common import (
    _acc_dtype,
    _accumulate_linear_grads,
    _check_device,
    _check_label_range,
    _check_labels,
    _check_linear,
    _default_chunk,
    _fake_grads,
    _linear_grad_buffers,
    _linear_grads_out,
)
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


def _pair_losses(pi, ref, pairs, beta, loss_type, label_smoothing):
    """Per-pair losses [P] and the implicit rewards' log-ratios of chosen and rejected."""
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
    return losses, chosen, rejected


def _pair_dloss(delta, beta, loss_type, label_smoothing):
    """d loss_p / d delta_p of :func:`_pair_losses` (d delta / d logp is +1 chosen, -1 rejected)."""
    eps = float(label_smoothing)
    if loss_type == "sigmoid":  # d/dx log sigma(x) = sigma(-x)
        return beta * (
            -(1 - eps) * torch.sigmoid(-beta * delta) + eps * torch.sigmoid(beta * delta)
        )
    if loss_type == "robust":
        return (
            beta
            * (-(1 - eps) * torch.sigmoid(-beta * delta) - eps * torch.sigmoid(beta * delta))
            / (1 - 2 * eps)
        )
    if loss_type == "hinge":  # relu'(0) = 0, as autograd has it
        return -beta * (1 - beta * delta > 0).to(delta.dtype)
    return 2 * (delta - 1 / (2 * beta))  # ipo


def preference_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    pairs: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    normalizer: Union[None, float, Tensor] = None,
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
        normalizer: divide the summed pair losses by this instead of P (e.g. the global pair
            count under data parallelism, so every rank's gradient adds up to the global mean).

    Returns:
        ``(loss, metrics)``: the mean loss over pairs (sum / ``normalizer`` when given;
        float32, float64 for float64 inputs) and detached per-pair
        ``chosen_rewards``/``rejected_rewards`` (β·(logπ − logπ_ref)), ``margins`` (chosen −
        rejected), ``chosen_logps``/``rejected_logps`` and the scalar
        ``accuracy`` (fraction of margins > 0; ties count as wrong).
    """
    _check_logps(policy_logps, ref_logps)
    _check_options(beta, loss_type, label_smoothing)
    _check_pairs(pairs, policy_logps.shape[0], policy_logps.device)
    _check_normalizer(normalizer)
    acc = torch.float64 if policy_logps.dtype == torch.float64 else torch.float32
    pi = policy_logps.to(acc)
    ref = ref_logps.detach().to(acc)
    losses, chosen, rejected = _pair_losses(pi, ref, pairs, beta, loss_type, label_smoothing)
    loss = losses.mean() if normalizer is None else losses.sum() / normalizer
    return loss, _metrics(pi, chosen, rejected, pairs, beta)


def _check_normalizer(normalizer) -> None:
    if normalizer is None:
        return
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError("normalizer tensor must have exactly one element")
        return
    if not isinstance(normalizer, Number) or not float(normalizer) > 0:
        raise ValueError(f"normalizer must be a number > 0, got {normalizer!r}")


def _metrics(pi, chosen, rejected, pairs, beta) -> Dict[str, Tensor]:
    with torch.no_grad():
        chosen_rewards = beta * chosen.detach()
        rejected_rewards = beta * rejected.detach()
        margins = chosen_rewards - rejected_rewards
        return {
            "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards,
            "margins": margins,
            "chosen_logps": pi.detach()[pairs[:, 0].long()],
            "rejected_logps": pi.detach()[pairs[:, 1].long()],
            "accuracy": (margins > 0).to(pi.dtype).mean(),
        }


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


# --------------------------------------------------------------------------------------------
# fused_linear_dpo_loss

# The one-pass path keeps a whole component of the pair graph in one chunk of logits; beyond this
# many bytes for the largest component it falls back to two passes (score, then recompute).
_DPO_MAX_CHUNK_BYTES = {"cpu": 1 << 30, "cuda": 8 << 30}


def pair_components(pairs: Tensor) -> List[List[int]]:
    """Connected components of the pair graph (candidates joined by a pair); candidates in no pair
    are left out. Ordered by smallest member, members ascending. (Also how COLLATE splits a DPO
    batch over ranks: :func:`rationale_train.collate.rank_pairs`.)"""
    flat = pairs.detach().to("cpu").tolist()
    parent: Dict[int, int] = {}

    def find(a: int) -> int:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for c, r in flat:
        a, b = find(c), find(r)
        if a != b:
            parent[max(a, b)] = min(a, b)
    comps: Dict[int, List[int]] = {}
    for u in sorted(parent):
        comps.setdefault(find(u), []).append(u)
    return list(comps.values())


def _pack(comps: List[List[int]], lens: List[int], budget_rows: int) -> List[List[int]]:
    """Greedy packing of whole components into chunks of at most budget_rows tokens (a component
    larger than the budget gets a chunk of its own)."""
    chunks, cur, rows = [], [], 0
    for comp in comps:
        n = sum(lens[c] for c in comp)
        if cur and rows + n > budget_rows:
            chunks.append(cur)
            cur, rows = [], 0
        cur = cur + comp
        rows += n
    if cur:
        chunks.append(cur)
    return chunks


def _dpo_one_pass(backend, hidden, weight, bias, labels, cu, ref_logps, pairs, beta, loss_type,
                  label_smoothing, average, ignore_index, budget_rows, need_gh, need_gw,
                  need_gb):  # fmt: skip
    """Loss, policy log-probs [C] and gradients in one pass over the logits: a chunk holds whole
    components of the pair graph, so its pairs' d loss / d logp is known as soon as the chunk's
    log-probs are; the kernel then turns the same logits into their gradient in place. FLOPs are
    those of a plain forward + backward (6 N H V), peak extra memory one chunk of logits."""
    N, H = hidden.shape
    dt, dev = hidden.dtype, hidden.device
    acc = _acc_dtype(dt)
    C, P = ref_logps.shape[0], pairs.shape[0]
    cu_l = cu.to("cpu", torch.int64).tolist()
    lens = [cu_l[c + 1] - cu_l[c] for c in range(C)]
    chunk_of = torch.full((C,), -1, dtype=torch.int64)
    # candidates ascending inside a chunk: the local pair indices come from searchsorted (whole
    # components interleave, e.g. pairs (0, 3) and (1, 2), so the packed order is not sorted)
    chunks = [sorted(c) for c in _pack(pair_components(pairs), lens, budget_rows)]
    for k, cands in enumerate(chunks):
        chunk_of[cands] = k
    pair_chunk = chunk_of[pairs[:, 0].to("cpu", torch.int64)]
    logps = torch.zeros(C, dtype=acc, device=dev)
    total = torch.zeros((), dtype=acc, device=dev)
    gh = torch.zeros_like(hidden) if need_gh else hidden.new_empty(0)
    gw, gb = _linear_grad_buffers(weight, need_gw, need_gb)
    ref = ref_logps.to(acc)
    for k, cands in enumerate(chunks):
        klens = torch.tensor([lens[c] for c in cands])
        rows = torch.cat([torch.arange(cu_l[c], cu_l[c + 1]) for c in cands]).to(dev)
        h, y = hidden[rows], labels[rows]
        z = torch.nn.functional.linear(h, weight, bias)
        tok, lse = _seq._launch_fwd(backend, z.unsqueeze(0), y.view(1, -1), ignore_index)
        valid = y != ignore_index
        local_cu = torch.cat([klens.new_zeros(1), klens.cumsum(0)]).to(dev)
        seq = segment_sums(tok.view(-1), valid, local_cu, average)
        ids = torch.tensor(cands, device=dev)
        logps[ids] = seq
        local = torch.searchsorted(ids, pairs[(pair_chunk == k).to(dev)].to(ids.dtype))
        losses, chosen, rejected = _pair_losses(seq, ref[ids], local, beta, loss_type,
                                                label_smoothing)  # fmt: skip
        part = losses.sum() / P
        # custom-op bodies run below autograd, so d loss / d logp is written out (_pair_dloss)
        d = _pair_dloss(chosen - rejected, beta, loss_type, label_smoothing) / P
        g_seq = torch.zeros_like(seq).index_add_(0, local[:, 0], d).index_add_(0, local[:, 1], -d)
        total += part.detach()
        if not (need_gh or need_gw or need_gb):
            continue
        if average:
            g_seq = g_seq / segment_sums(valid.to(acc), valid, local_cu, False).clamp_min(1)
        w_tok = torch.repeat_interleave(g_seq, klens.to(dev)).contiguous()
        z3, y2 = z.unsqueeze(0), y.view(1, -1)
        _seq._launch_bwd(backend, z3, y2, lse.view(-1), w_tok, ignore_index, z)
        if need_gh:
            gh.index_copy_(0, rows, z @ weight)
        _accumulate_linear_grads(z, h, gw, gb)
    return (total, logps, gh) + _linear_grads_out(weight, gw, gb)


@torch.library.custom_op("rationale_kernels::fused_linear_dpo_loss", mutates_args=())
def _dpo_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    cu_seqlens: Tensor,
    ref_logps: Tensor,
    pairs: Tensor,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    average: bool,
    ignore_index: int,
    backend: str,
    budget_rows: int,
    need_gh: bool,
    need_gw: bool,
    need_gb: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, policy log-probs [C] (0 for candidates in no pair), grad_hidden, grad_weight,
    grad_bias) with d loss as the upstream gradient; grads not asked for are empty."""
    _check_label_range(labels, weight.shape[0], ignore_index)
    return _dpo_one_pass(backend, hidden, weight, bias, labels, cu_seqlens, ref_logps, pairs,
                         beta, loss_type, label_smoothing, average, ignore_index, budget_rows,
                         need_gh, need_gw, need_gb)  # fmt: skip


@_dpo_op.register_fake
def _(hidden, weight, bias, labels, cu_seqlens, ref_logps, pairs, beta, loss_type,
      label_smoothing, average, ignore_index, backend, budget_rows, need_gh, need_gw,
      need_gb):  # fmt: skip
    acc = _acc_dtype(hidden.dtype)
    loss = hidden.new_empty((), dtype=acc)
    logps = hidden.new_empty(ref_logps.shape, dtype=acc)
    return (loss, logps) + _fake_grads(hidden, weight, need_gh, need_gw, need_gb)


def _dpo_setup(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(*output[2:])


def _dpo_backward(ctx, g_loss, g_logps, g_gh, g_gw, g_gb):
    none = (None,) * 17
    if g_loss is None:
        return none
    gh, gw, gb = ctx.saved_tensors
    gh = gh * g_loss.to(gh.dtype) if gh.dim() == 2 else None
    gw = gw * g_loss.to(gw.dtype) if gw.dim() == 2 else None
    gb = gb * g_loss.to(gb.dtype) if (ctx.has_bias and gb.numel()) else None
    return (gh, gw, gb) + none[3:]


_dpo_op.register_autograd(_dpo_backward, setup_context=_dpo_setup)


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
    normalizer: Union[None, float, Tensor] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """End-to-end DPO from hidden states, equal to :func:`preference_loss` of
    :func:`fused_linear_sequence_logprobs`, without materialising the logits. Each candidate that
    appears in ``pairs`` is scored once however many pairs it is in; candidates in no pair cost
    nothing.

    How: candidates joined by pairs form components (for COLLATE's pairs, one per question).
    Chunks of whole components are processed one at a time: logits once, token log-probs, the
    chunk's pairs' losses and d loss / d logp, then the same logits become their gradient in place
    and grad_hidden / grad_weight are accumulated -- in the forward, at the FLOPs of a plain
    forward + backward. When a single component's logits would exceed 1 GiB (CPU) / 8 GiB (GPU),
    it falls back to scoring first and recomputing the chunks in the backward (2 N H V more).

    Args:
        hidden: packed ``[N, H]`` with ``cu_seqlens`` ``[C + 1]``, or padded ``[C, T, H]`` with
            ``cu_seqlens=None``; labels ``[N]`` or ``[C, T]`` (``ignore_index`` on prompt and
            padding tokens), already aligned with hidden.
        weight, bias: LM head ``[V, H]`` and optional ``[V]``.
        ref_logps: ``[C]`` reference sequence log-probs (computed with the same ``average``).
        pairs, beta, loss_type, label_smoothing: as in :func:`preference_loss`.
        average, ignore_index, backend: as in :func:`fused_linear_sequence_logprobs`.
        chunk_size: target rows per chunk (whole components are never split); default keeps a
            chunk of logits near 64 MiB on CPU and 1 GiB on GPU.
        normalizer: as in :func:`preference_loss` (sum of pair losses / normalizer).

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
    if not ref_logps.is_floating_point():
        raise TypeError("ref_logps must be a floating-point tensor")
    _check_device(hidden.device, ref_logps=ref_logps)
    _check_options(beta, loss_type, label_smoothing)
    _check_pairs(pairs, C, hidden.device)
    _check_normalizer(normalizer)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_linear("hidden", hidden, "weight", weight, "bias", bias)
    V = weight.shape[0]
    _check_labels(labels, hidden.shape[:-1], V, ignore_index)
    _check_device(hidden.device, labels=labels)
    be = resolve_backend(backend, hidden.device)
    ref = ref_logps.detach()
    if cu_seqlens is None:  # padded -> packed view
        T = hidden.shape[1]
        cu_seqlens = torch.arange(C + 1, device=hidden.device) * T
        hidden, labels = hidden.reshape(C * T, -1), labels.reshape(C * T)

    elt = hidden.element_size()
    comp_rows = 0
    if be != "torch":
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to("cpu", torch.int64)
        comp_rows = max(int(lens[c].sum()) for c in pair_components(pairs))
    cap = _DPO_MAX_CHUNK_BYTES.get(hidden.device.type, 1 << 30)
    if be == "torch" or comp_rows * V * elt > cap:
        logps = fused_linear_sequence_logprobs(
            hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, ignore_index=ignore_index,
            average=average, chunk_size=chunk_size, backend=be,
        )  # fmt: skip
        return preference_loss(logps, ref.to(logps.dtype), pairs, beta=beta, loss_type=loss_type,
                               label_smoothing=label_smoothing,
                               normalizer=normalizer)  # fmt: skip
    budget = chunk_size or _default_chunk(hidden.shape[0], V, elt, False, hidden.device)
    grad_on = torch.is_grad_enabled()
    loss, logps, _, _, _ = _dpo_op(
        hidden, weight, bias, labels.to(torch.int64).contiguous(), cu_seqlens, ref, pairs,
        float(beta), loss_type, float(label_smoothing), bool(average), int(ignore_index), be,
        int(budget), grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )  # fmt: skip
    if normalizer is not None:  # the op returns the mean over the P pairs
        loss = loss * (pairs.shape[0] / normalizer)
    pi = logps.detach()
    refa = ref.to(pi.dtype)
    _, chosen, rejected = _pair_losses(pi, refa, pairs, beta, loss_type, label_smoothing)
    return loss, _metrics(pi, chosen, rejected, pairs, beta)
