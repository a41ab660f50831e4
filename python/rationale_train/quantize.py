"""MaRio / Quark reward quantisation and control tokens.

Every round, each reward is quantised over the whole pool of sampled rationales (re-quantising as
the pool grows is calling ``quantize`` again on the grown pool), and each sample is prefixed with
one control token per reward that names its bin. At inference the model is conditioned on the best
bin of every reward (``best_code``).

Rules of ``quantize(values, K)`` (equal-count bins, bin 0 = best):

- Sort the N values descending, stably: tied values keep their pool order (the earlier sample ranks
  higher), so ties may straddle a bin boundary, as in Quark.
- Bin size ``s = N // K``; the sample of rank ``r`` (0 = best) goes to bin ``min(r // s, K - 1)``,
  so bins 0..K-2 hold ``s`` samples each and the remainder ``N % K`` goes to the worst bin, K - 1.
- N < K: ``s`` is taken as 1, so every sample gets its own bin top-down (ranks 0..N-1 → bins
  0..N-1) and bins N..K-1 stay empty. The best sample is always in bin 0, and adding samples
  only ever moves a sample to a worse-or-equal rank.
- N = 0 gives an empty tensor; NaN values are an error (their rank is undefined).

Binary rewards (registered with ``binary=True``, e.g. ``correctness``) use two bins by value,
``quantize_binary``: bin 0 (correct) where value >= 0.5, bin 1 (wrong) otherwise, whatever K is.

Control tokens are ``<|{code}_{bin}|>`` with the reward's registered ``code``
(``<|correct_0|>``, ``<|div_3|>``, ``<|consist_0|>``, ``<|plaus_4|>``). A sample's code is one token
per reward in the order the caller lists the rewards; keep that order fixed across a run.
"""

from __future__ import annotations

import operator
from typing import Dict, List, Mapping, Sequence, Union

import torch
from torch import Tensor

from .rewards import reward_spec

__all__ = [
    "quantize",
    "quantize_binary",
    "quantize_rewards",
    "num_bins",
    "control_token",
    "control_tokens",
    "control_code",
    "best_code",
]

Values = Union[Sequence[float], Tensor]


def _as_1d(values: Values) -> Tensor:
    if isinstance(values, Tensor):
        v = values.detach()
        if v.dim() != 1:
            raise ValueError(f"values must be 1-D, got shape {tuple(v.shape)}")
        v = v.to(torch.float64)
    else:
        v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    if torch.isnan(v).any():
        raise ValueError(f"values contain {int(torch.isnan(v).sum())} NaN(s): cannot rank them")
    return v


def quantize(values: Values, num_bins: int) -> Tensor:
    """Bin ids (int64, bin 0 = best, on the values' device) of ``values`` quantised into
    ``num_bins`` equal-count bins; see the module docstring for the rules (stable ties, remainder
    to the worst bin, N < K gives one sample per bin top-down)."""
    if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
    v = _as_1d(values)
    n = v.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=v.device)
    # negate and sort ascending, stably: descending order with ties kept in pool order
    order = torch.sort(-v, stable=True).indices
    size = max(n // num_bins, 1)
    ranks = torch.arange(n, device=v.device)
    bins = torch.empty(n, dtype=torch.long, device=v.device)
    bins[order] = torch.clamp(ranks // size, max=num_bins - 1)
    return bins


def quantize_binary(values: Values, threshold: float = 0.5) -> Tensor:
    """Two bins by value: 0 where ``value >= threshold`` (correct), 1 otherwise (wrong)."""
    v = _as_1d(values)
    return (v < threshold).to(torch.long)


def num_bins(name: str, k: int) -> int:
    """How many bins (control tokens) reward ``name`` has with K bins: 2 if binary, else K."""
    return 2 if reward_spec(name).binary else k


def quantize_rewards(pool: Mapping[str, Values], k: int) -> Dict[str, Tensor]:
    """Quantise every reward of a pool (name → values over the same N samples): binary rewards with
    ``quantize_binary``, the others with ``quantize(values, k)``."""
    sizes = {name: len(v) for name, v in pool.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"every reward must score the same samples, got sizes {sizes}")
    return {
        name: quantize_binary(v) if reward_spec(name).binary else quantize(v, k)
        for name, v in pool.items()
    }


def control_token(name: str, bin_id: int) -> str:
    """``<|{code}_{bin}|>`` for reward ``name`` (its registered code)."""
    spec = reward_spec(name)
    try:
        b = operator.index(bin_id)  # ints, numpy ints, 0-d integer tensors; not floats
    except TypeError:
        raise TypeError(f"bin id of {name!r} must be an integer, got {bin_id!r}") from None
    if b < 0 or (spec.binary and b > 1):
        raise ValueError(f"bin {b} out of range for reward {name!r}")
    return f"<|{spec.code}_{b}|>"


def control_tokens(reward_names: Sequence[str], k: int) -> List[str]:
    """Every control token of these rewards with K bins (add them to the tokenizer as special
    tokens): reward by reward in the given order, bins 0.. in order."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"K must be an int >= 1, got {k!r}")
    if isinstance(reward_names, str):
        reward_names = [reward_names]
    if len(set(reward_names)) != len(reward_names):
        raise ValueError(f"reward names repeat: {list(reward_names)}")
    return [control_token(n, b) for n in reward_names for b in range(num_bins(n, k))]


def control_code(bins_per_reward: Mapping[str, Union[int, Tensor]]) -> List[str]:
    """The control tokens of one sample, ``{reward name: bin id}`` → one token per reward in the
    mapping's order (``"".join(...)`` to prefix a target)."""
    return [control_token(name, b) for name, b in bins_per_reward.items()]


def best_code(reward_names: Sequence[str]) -> str:
    """The inference prefix: bin 0 of every reward, concatenated in the given order."""
    if isinstance(reward_names, str):
        reward_names = [reward_names]
    return "".join(control_code({n: 0 for n in reward_names}))
