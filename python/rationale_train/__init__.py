"""Training loops for MaRio and COLLATE on top of rationale_kernels
(stub: built in later issues)."""

__all__: list = []
