"""Loads the native module ``rationale_kernels._C`` and reports what was built."""

from __future__ import annotations

import importlib
import os
from typing import Any, Optional

_C: Optional[Any] = None
_IMPORT_ERROR: Optional[BaseException] = None
try:
    _C = importlib.import_module("rationale_kernels._C")
except ImportError as exc:  # pure-Python checkout (not built): the torch backend still works
    _IMPORT_ERROR = exc


def native() -> Any:
    """The native module, or a clear error saying why it is missing."""
    if _C is None:
        raise RuntimeError(
            "rationale_kernels._C is not built (import failed: "
            f"{_IMPORT_ERROR}); install the package with `pip install .` to build it, "
            "or use backend='torch'"
        )
    return _C


def has_cpu() -> bool:
    return _C is not None


def has_cuda() -> bool:
    return _C is not None and bool(_C.build_info()["cuda"])


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def build_info() -> dict:
    """What this installation can run: the native build (cpu, openmp, cuda, archs, compiler) plus
    the torch/triton found at run time."""
    import torch

    info: dict = {"native": _C is not None}
    if _C is not None:
        info.update(_C.build_info())
    else:
        info.update(
            cpu=False, cuda=False, openmp=False, cuda_archs="", import_error=str(_IMPORT_ERROR)
        )
    info["torch"] = torch.__version__
    info["torch_cuda_available"] = torch.cuda.is_available()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
