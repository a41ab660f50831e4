"""Backend selection shared by every op: ``backend="auto"|"torch"|"cpu"|"triton"|"cuda"``."""

from __future__ import annotations

import torch

from . import _native

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Returns the concrete backend for tensors on ``device``, or raises a clear error when the
    requested one was not built or cannot run on that device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            # The CUDA row kernel first (no JIT warm-up), then Triton, then the reference.
            if _native.has_cuda():
                return "cuda"
            return "triton" if _native.has_triton() else "torch"
        if device.type == "cpu" and _native.has_cpu():
            return "cpu"
        return "torch"
    if backend == "torch":
        return backend
    if backend == "cpu":
        _native.native()
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        return backend
    if backend == "cuda":
        if not _native.has_cuda():
            raise RuntimeError(
                "backend='cuda' is not available: rationale_kernels._C was built without CUDA "
                f"(build_info: cuda={_native.has_cuda()}); rebuild with nvcc on PATH and RK_CUDA=ON"
            )
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        return backend
    # triton
    if not _native.has_triton():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if device.type == "cuda":
        return backend
    if device.type == "cpu" and _native.triton_interpret():
        return backend
    raise ValueError(
        f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the Triton interpreter "
        f"on CPU tensors), got tensors on {device}"
    )
