"""The training layer on top of rationale_kernels: data (``data``), tiny / local / GGUF models
(``models``), candidate generation (``generate``), rewards and quantised control codes
(``rewards``, ``quantize``), the MaRio and COLLATE loops (``mario``, ``collate``), evaluation,
atomic checkpoints and run folders (``checkpoint``, ``runs``) and the ``rationale-train`` CLI
(``cli``; also ``python -m rationale_train``). Modules are imported on demand: importing this
package loads nothing heavy."""

__all__: list = []
