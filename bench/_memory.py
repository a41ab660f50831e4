"""Peak extra memory of one call: CUDA allocator peak on GPU, sampled RSS on CPU."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _fix_malloc_threshold() -> None:
    # glibc raises its mmap threshold after large frees, so freed tensors would stay in the heap
    # and RSS would over-count; a fixed threshold returns every large block to the OS at free.
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    except OSError:
        pass


_fix_malloc_threshold()


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Runs fn() once and returns its peak memory above what was allocated before the call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], _rss())
    return peak[0] - base
