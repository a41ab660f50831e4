"""Helpers shared by the Triton kernels (rationale_loss.py, sequence_logprobs.py, sample.py).

Accumulation types, the interpreter's bf16 rounding fix, the per-row block / warp choice and the
device context every launch runs under. Nothing here is op-specific.
"""

import contextlib

import torch
import triton
import triton.language as tl

# Accumulation type of each supported logits dtype (float32; float64 for float64).
ACC = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.float32,
    torch.float16: tl.float32,
    torch.float64: tl.float64,
}


def acc_dtype(dtype: torch.dtype, op: str) -> torch.dtype:
    """The torch accumulation dtype of `dtype` logits; TypeError (naming `op`) if unsupported."""
    if dtype not in ACC:
        raise TypeError(f"{op}: unsupported logits dtype {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.jit
def round_bf16(x):
    # fp32 -> nearest-even bf16 value (still fp32), NaN kept. Only for the Triton interpreter, whose
    # fp32 -> bf16 cast truncates; compiled code uses cvt.rn, which this reproduces.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


def rn_bf16(logits: torch.Tensor) -> bool:
    """The RN_BF16 flag of the kernels that store bf16 results: CPU tensors mean the interpreter,
    so emulate the GPU's round-to-nearest bf16 store there (with round_bf16)."""
    return logits.dtype == torch.bfloat16 and not logits.is_cuda


def row_block_config(V: int, dtype: torch.dtype, lanes: int = 16):
    """(BLOCK_V, num_warps) for one program per row streaming V columns. Big blocks amortise the
    per-block reductions; warps are sized so that each thread holds ~`lanes` fp32 lanes per block
    vector (half as many for fp64), capped at 4096 columns (2048 for fp64) and 16 warps."""
    cap = 2048 if dtype == torch.float64 else 4096
    block = min(triton.next_power_of_2(max(V, 1)), cap)
    per_thread = lanes // (2 if dtype == torch.float64 else 1)
    num_warps = max(1, min(16, block // (32 * per_thread)))
    return block, num_warps


def device_ctx(t: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
