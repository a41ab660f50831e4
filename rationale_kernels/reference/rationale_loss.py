"""Readable pure-PyTorch reference of the rationale loss: the oracle for tests and the eager
baseline for benchmarks. Works in any floating dtype (float64 for tests); materialises
full log-probs.

Per valid token t (label != ignore_index), with p = softmax(z_t), q = softmax(r_t):
    nll_t = -log p[y_t]
    kl_t  = sum_v p~_v (log p~_v - log q~_v)       kl="full" (p~, q~ over ids < kl_vocab)
          = logp_t - ref_logp_t                     kl="k1"
          = exp(rho) - 1 - rho, rho = ref_logp_t - logp_t     kl="k3"
    H_t   = -sum_v p_v log p_v
    loss_t = w_t * nll_t + kl_coef * kl_t - entropy_coef * H_t
Ignored tokens contribute 0 to every term.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _xlogy_safe(p: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """p * logp with 0 where p == 0 (logp = -inf there), with finite gradients."""
    return p * logp.masked_fill(p == 0, 0.0)


def rationale_loss_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    token_weights: Optional[torch.Tensor] = None,
    ref_logits: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl: str = "full",
    kl_vocab: Optional[int] = None,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    ignore_index: int = -100,
) -> dict:
    """Per-token terms, each shaped like ``labels``: loss, nll, kl, entropy, and the valid mask."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    y = labels.reshape(-1)
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))

    # Full-vocabulary work runs in the logits' dtype (like eager user code); the per-token scalars
    # are then kept in at least float32, as the kernels do (k3's exp overflows float16 otherwise).
    acc = torch.promote_types(logits.dtype, torch.float32)
    logp = F.log_softmax(z, dim=-1)
    nll = -logp.gather(1, y_safe[:, None]).squeeze(1).to(acc)
    entropy = -_xlogy_safe(logp.exp(), logp).sum(-1).to(acc)

    if kl == "full" and ref_logits is not None:
        K = V if kl_vocab is None else kl_vocab
        logp_k = F.log_softmax(z[:, :K], dim=-1)
        logq_k = F.log_softmax(ref_logits.reshape(-1, ref_logits.shape[-1])[:, :K].detach(), dim=-1)
        p_k = logp_k.exp()
        # p log p - p log q, each guarded where p == 0
        kl_t = (_xlogy_safe(p_k, logp_k) - _xlogy_safe(p_k, logq_k)).sum(-1).to(acc)
    elif kl in ("k1", "k3") and ref_logprobs is not None:
        ref = ref_logprobs.reshape(-1).detach().to(nll.dtype)
        if kl == "k1":
            kl_t = -nll - ref
        else:
            rho = ref + nll
            kl_t = torch.exp(rho) - 1 - rho
    else:
        kl_t = torch.zeros_like(nll)

    w = 1.0 if token_weights is None else token_weights.reshape(-1).detach().to(nll.dtype)
    loss = w * nll + kl_coef * kl_t - entropy_coef * entropy
    zero = torch.zeros((), dtype=nll.dtype, device=nll.device)
    out = {
        name: torch.where(valid, t, zero).reshape(labels.shape)
        for name, t in (("loss", loss), ("nll", nll), ("kl", kl_t), ("entropy", entropy))
    }
    out["valid"] = valid.reshape(labels.shape)
    return out


def rationale_loss(logits, labels, *, reduction="mean", normalizer=None, **kw) -> torch.Tensor:
    """Reduced reference loss (mean over valid tokens, sum, none, or sum / normalizer)."""
    t = rationale_loss_terms(logits, labels, **kw)
    if reduction == "none":
        return t["loss"]
    total = t["loss"].sum()
    if reduction == "sum":
        return total
    denom = t["valid"].sum().clamp_min(1) if normalizer is None else normalizer
    return total / denom


def fused_linear_rationale_loss(
    hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None, **kw
) -> torch.Tensor:
    """The eager baseline: materialise logits = hidden @ weight.T (+ bias), then the loss."""
    logits = F.linear(hidden, weight, bias)
    ref_logits = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref_logits = F.linear(ref_hidden, ref_weight, ref_bias)
    return rationale_loss(logits, labels, ref_logits=ref_logits, **kw)
