"""rationale-kernels: fused kernels for training small LMs to reason with rationales.

Ops (each takes ``backend="auto" | "torch" | "cpu" | "triton" | "cuda"``):

- :func:`rationale_loss`: MaRio/Quark per-token loss from logits.
- :func:`fused_linear_rationale_loss`: the same from hidden states and the LM-head weight, without
  materialising the full logits.
- :func:`sequence_logprobs` / :func:`fused_linear_sequence_logprobs`: per-sequence sums (or means)
  of label log-probs, padded or packed (``cu_seqlens``), from logits or hidden states.
- :func:`preference_loss`, :func:`preference_pairs`, :func:`fused_linear_dpo_loss`: DPO-family
  losses over scored candidates (each scored once), COLLATE's pair builder, and DPO end to end.
- :func:`sample`: temperature / top-k / top-p / min-p sampling, exact and sorting-free.
"""

from ._native import build_info
from .ops.preference_loss import fused_linear_dpo_loss, preference_loss, preference_pairs
from .ops.rationale_loss import fused_linear_rationale_loss, rationale_loss
from .ops.sample import sample
from .ops.sequence_logprobs import fused_linear_sequence_logprobs, sequence_logprobs

__all__ = [
    "build_info",
    "fused_linear_dpo_loss",
    "fused_linear_rationale_loss",
    "fused_linear_sequence_logprobs",
    "preference_loss",
    "preference_pairs",
    "rationale_loss",
    "sample",
    "sequence_logprobs",
]
__version__ = "0.1.0"
