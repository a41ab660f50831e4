import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. This must be set before
# triton is imported (it decides at decoration time), so it lives here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
