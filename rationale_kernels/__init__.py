"""rationale-kernels: fused kernels for training small LMs to reason with rationales.

Ops (each takes ``backend="auto" | "torch" | "cpu" | "triton" | "cuda"``):

- :func:`rationale_loss`: MaRio/Quark per-token loss from logits.
- :func:`fused_linear_rationale_loss`: the same from hidden states and the LM-head weight, without
  materialising the full logits.
- :func:`sample`: temperature / top-k / top-p / min-p sampling, exact and sorting-free.
"""

from ._native import build_info
from .ops.rationale_loss import fused_linear_rationale_loss, rationale_loss
from .ops.sample import sample

__all__ = ["build_info", "fused_linear_rationale_loss", "rationale_loss", "sample"]
__version__ = "0.1.0"
