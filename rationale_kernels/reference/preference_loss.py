"""Readable reference of the pairwise preference losses, written out as published (float64).

With Δ = (logπ(chosen) − logπ_ref(chosen)) − (logπ(rejected) − logπ_ref(rejected)), β > 0 and
label smoothing ε (TRL's conventions, DESIGN.md §2(2)):
- sigmoid (DPO, Rafailov et al. 2023; conservative DPO for ε > 0):
  −(1 − ε)·log σ(βΔ) − ε·log σ(−βΔ)
- robust (Chowdhury et al. 2024, unbiased under label noise ε < 1/2):
  (−(1 − ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1 − 2ε)
- hinge (SLiC, Zhao et al. 2023): max(0, 1 − βΔ)
- ipo (Azar et al. 2023): (Δ − 1/(2β))²
The loss is the mean over pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pairwise_losses(
    policy_logps: Tensor,
    ref_logps: Tensor,
    pairs: Tensor,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-pair losses [P] in float64; ``pairs`` [P, 2] holds (chosen, rejected) indices."""
    pi = policy_logps.double()
    ref = ref_logps.double()
    c, r = pairs[:, 0].long(), pairs[:, 1].long()
    delta = (pi[c] - ref[c]) - (pi[r] - ref[r])
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * torch.log(torch.sigmoid(beta * delta)) - eps * torch.log(
            torch.sigmoid(-beta * delta)
        )
    if loss_type == "robust":
        return (
            -(1 - eps) * torch.log(torch.sigmoid(beta * delta))
            + eps * torch.log(torch.sigmoid(-beta * delta))
        ) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.clamp(1 - beta * delta, min=0)
    if loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(loss_type)


def preference_loss(policy_logps, ref_logps, pairs, beta, loss_type, label_smoothing=0.0):
    """Mean over pairs of :func:`pairwise_losses`."""
    return pairwise_losses(policy_logps, ref_logps, pairs, beta, loss_type, label_smoothing).mean()
