"""Scale-out: the MaRio and COLLATE loops under ``torchrun`` (torch.distributed, DDP or FSDP2).

``torchrun --nproc-per-node N $(command -v rationale-train) mario ...`` starts N copies of the same
command; :func:`init` joins them into one process group from torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``): nccl when the run's device is CUDA (rank r
uses ``cuda:LOCAL_RANK``), gloo on CPU. Without that environment nothing changes: one process, no
process group, identical results to before.

How the loops use it (every rank runs the same code):

- **data**: every rank builds the same example lists and takes a contiguous shard by index
  (:func:`shard`); the global batch of a step is drawn from the same seeded order on every rank
  and split by :func:`shard` too, so the union of the ranks' rows is the one-process batch;
- **generation / scoring / evaluation** (:func:`map_shards`): each rank handles its shard and the
  results are gathered in rank order, so rewards, quantisation and pairing see the whole pool as
  one process would (sampling draws use per-rank seeds, :func:`rank_seed`);
- **training** (:class:`Parallel`): DDP by default, or FSDP2 (``fully_shard``) per decoder layer
  and at the root. The loss normaliser (target tokens for MaRio, pairs for COLLATE) is summed over
  the ranks (:func:`all_sum`) and passed as ``normalizer = global / world`` (DDP and FSDP average
  gradients over ranks), so the gradient equals the one-process gradient of the global batch;
- **files**: only rank 0 writes, except FSDP checkpoints, whose shards every rank writes with
  torch.distributed.checkpoint (a run resumes under any world size and mode either way); the run
  folder must be visible to every rank (one machine, or a shared filesystem); other ranks wait at
  :func:`barrier` before reading what rank 0 wrote.

A rank that raises stops the run: ``torchrun`` tears down the other ranks (they would otherwise
block in their next collective) and prints the failing rank's traceback, recorded by
``torch.distributed.elastic.multiprocessing.errors.record`` on the CLI's entry point. Checkpoints
are published atomically, so an interrupted save never becomes the latest one.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
import warnings
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch
import torch.distributed as tdist

__all__ = [
    "Parallel",
    "active",
    "all_sum",
    "barrier",
    "broadcast",
    "check_batch",
    "device",
    "from_main",
    "gather",
    "init",
    "is_main",
    "launched",
    "main_only",
    "map_shards",
    "part",
    "rank",
    "rank_seed",
    "shard",
    "shutdown",
    "world",
]

# generous: a rank may spend long stretches alone (rank 0 writing a checkpoint or a summary)
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("RATIONALE_TRAIN_DIST_TIMEOUT_MIN", "60")))


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its env)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init() -> None:
    """Join torchrun's process group (idempotent; nothing without a launcher). CPU tensors go
    through gloo and, where CUDA is available, CUDA tensors through nccl, with rank r on
    ``cuda:LOCAL_RANK``."""
    if not launched() or tdist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    tdist.init_process_group(backend=backend, timeout=TIMEOUT)


def device(name: str = "cpu") -> torch.device:
    """The device this rank runs on for a run configured with ``name`` (``auto`` picks CUDA when
    available): under a launcher a CUDA device becomes ``cuda:LOCAL_RANK``."""
    init()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and launched():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def shutdown(clean: bool = True) -> None:
    """Leave the process group. ``clean`` (every rank got here): meet at a barrier first, then
    release the GIL for a moment. Why: a gloo worker thread drops a finished collective (and the
    Python tensors it holds, which needs the GIL) just after the waiting rank resumes; a drop still
    pending when the interpreter finalises aborts the process ("terminate called without an active
    exception": 1 two-process FSDP step in ~30 on 2 cores with neither, 1 in 120 with the barrier
    alone, whose work holds the previous ones, 0 in 269 with both). After an error, no barrier:
    the other ranks may never get there."""
    if tdist.is_initialized():
        if clean:
            tdist.barrier()
            time.sleep(0.05)
        tdist.destroy_process_group()


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        tdist.barrier()


def rank_seed(seed: int, *parts: Any) -> int:
    """This rank's seed for a random stream of the run: ``seed`` itself in one process (so a
    one-process run is unchanged), distinct per rank otherwise."""
    from .runs import derive_seed

    return int(seed) if world() == 1 else derive_seed(seed, *parts, "rank", rank())


def shard(n: int, r: Optional[int] = None, w: Optional[int] = None) -> range:
    """The contiguous block of ``range(n)`` rank ``r`` (default: this rank) handles; blocks
    differ in size by at most one and concatenate, in rank order, to ``range(n)``."""
    r = rank() if r is None else r
    w = world() if w is None else w
    return range(r * n // w, (r + 1) * n // w)


def part(items: Sequence[Any]) -> List[Any]:
    """This rank's contiguous share of ``items`` (all of them in one process)."""
    r = shard(len(items))
    return list(items[r.start : r.stop])


def gather(items: Sequence[Any]) -> List[Any]:
    """Every rank's ``items`` concatenated in rank order (picklable objects)."""
    if not active():
        return list(items)
    parts: List[Any] = [None] * world()
    tdist.all_gather_object(parts, list(items))
    return [x for p in parts for x in p]


def map_shards(fn: Callable[[List[Any]], Sequence[Any]], items: Sequence[Any]) -> List[Any]:
    """``fn(items)`` computed as ``fn`` of each rank's shard, gathered in order. ``fn`` maps a
    list to a list of the same length and is not called on an empty shard."""
    mine = part(items)
    out = list(fn(mine)) if mine else []
    if len(out) != len(mine):
        raise RuntimeError(f"map_shards: fn returned {len(out)} results for {len(mine)} items")
    return gather(out)


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def main_only(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 alone, then every rank waits for it: the run folder has one writer, and
    what it wrote is there for every rank afterwards. Returns ``fn()`` on rank 0, else ``None``."""
    out = fn() if is_main() else None
    barrier()
    return out


def from_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` evaluated on rank 0 and broadcast: for a decision every rank must take alike,
    such as what the run folder already holds (rank 0 may be writing it meanwhile)."""
    return broadcast(fn() if is_main() else None)


def all_sum(values: Sequence[float]) -> List[float]:
    """Element-wise sum of ``values`` over the ranks (float64)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)  # gloo
    tdist.all_reduce(t)
    return t.tolist()


def check_batch(size: int, name: str) -> None:
    """Every rank needs rows: DDP and FSDP run the forward on each rank every step."""
    if size < world():
        raise ValueError(f"{name}={size} is smaller than the world size {world()}: every rank "
                         "needs at least one row per step")  # fmt: skip


# ----------------------------------------------------------------------------------- wrapping


class _Call(torch.nn.Module):
    """``forward(fn, *args)`` = ``fn(model, *args)``: a whole loss computation (body, fused head
    loss) as the forward of one module, so DDP's and FSDP's forward hooks see every parameter the
    step uses, the LM head's weight that the fused loss reads directly included."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # public FSDP2 API: torch >= 2.6
    except ImportError as e:  # 2.4 / 2.5 had it under _composable, with fewer of the methods used
        raise ValueError(f"parallel='fsdp' needs torch >= 2.6 (FSDP2's fully_shard; this is "
                         f"torch {torch.__version__}); use parallel='ddp'") from e  # fmt: skip
    return fully_shard


def _decoder_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one (Hugging Face's ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


class Parallel:
    """A model set up for data-parallel training. ``parallel(fn, *args)`` returns
    ``fn(model, *args)`` computed inside the wrapper's forward (so DDP / FSDP synchronise the
    gradients of the following ``backward``); :attr:`model` is the Hugging Face model itself (for
    generation, see :meth:`gathered`). ``mode``: ``"ddp"``, ``"fsdp"``, or ``"none"`` (no
    wrapping; also what every mode becomes without a process group)."""

    def __init__(self, model: torch.nn.Module, mode: str = "ddp"):
        if mode not in ("ddp", "fsdp", "none"):
            raise ValueError(f"parallel mode must be ddp, fsdp or none, got {mode!r}")
        self.model = model
        self.mode = mode if active() else "none"
        # tied weights (an LM head sharing the embedding): the names of each shared parameter
        names: dict = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        self._tied = [ns for ns in names.values() if len(ns) > 1]
        call = _Call(model)
        if self.mode == "ddp":
            dev = next(model.parameters()).device
            ids = [dev.index] if dev.type == "cuda" else None
            self._fwd = torch.nn.parallel.DistributedDataParallel(call, device_ids=ids)
        elif self.mode == "fsdp":
            fully_shard = _fully_shard()
            layers = _decoder_layers(model)
            if not layers:
                raise ValueError(f"fsdp: {type(model).__name__} names no decoder layer class in "
                                 "_no_split_modules")  # fmt: skip
            for m in layers:
                fully_shard(m)
            fully_shard(call)
            self._fwd = call
        else:
            self._fwd = call

    def __call__(self, fn, *args, **kwargs):
        return self._fwd(fn, *args, **kwargs)

    def parameters(self):
        """The parameters the optimizer updates (FSDP: the local shards)."""
        return [p for p in self._fwd.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def gathered(self) -> Iterator[torch.nn.Module]:
        """The model with full weights on every rank, for generation and scoring, whose forward
        count differs between ranks (FSDP would all-gather per layer call): FSDP modules are
        unsharded once and kept so until the block ends. DDP / none: the model as is."""
        if self.mode != "fsdp":
            yield self.model
            return
        mods = [m for m in self._fwd.modules() if hasattr(m, "unshard")]
        for m in mods:
            m.set_reshard_after_forward(False)
        for m in mods:
            m.unshard()
        try:
            yield self.model
        finally:
            for m in mods:
                m.reshard()
                m.set_reshard_after_forward(True)

    def gather_state(self) -> Optional[dict]:
        """The model's full state in one-process form (for a model folder, e.g. the SFT model):
        FSDP gathers it (a collective: every rank calls it) and returns it on rank 0 (``None``
        elsewhere), keyed as ``safetensors.torch.save_model`` writes it (one name kept per tied
        group). DDP / none: ``None``, the model is complete on every rank."""
        if self.mode != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(self._fwd, options=opts)
        if not is_main():
            return None
        aliases = {n for ns in self._tied for n in ns[1:]}
        return {k[len(_PREFIX) :]: v for k, v in msd.items() if k[len(_PREFIX) :] not in aliases}

    def load_state(self, model_state: dict, optimizer_state=None, optimizer=None) -> None:
        """Put a one-process state (as :meth:`gather_state` returns, or a single process saves:
        ``model.safetensors``, ``optimizer.state_dict()``) into the model and optimizer; under
        FSDP every rank calls it with the full state and keeps its shard."""
        msd = dict(model_state)
        for ns in self._tied:  # a file keeps one name of each tied group, whichever
            present = [n for n in ns if n in msd]
            for n in ns if present else ():
                msd.setdefault(n, msd[present[0]])
        if self.mode != "fsdp":
            self.model.load_state_dict(msd)
            if optimizer is not None and optimizer_state is not None:
                optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self._fwd, {_PREFIX + k: v for k, v in msd.items()}, options=opts)
        if optimizer is not None and optimizer_state is not None:
            names = self._names()
            osd = {"state": {names[int(i)]: v for i, v in optimizer_state["state"].items()},
                   "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]])
                                    for g in optimizer_state["param_groups"]]}  # fmt: skip
            set_optimizer_state_dict(self._fwd, optimizer, osd, options=opts)

    def save_sharded(self, path, optimizer=None) -> None:
        """Write the model (and optimizer) state to ``path`` with torch.distributed.checkpoint
        (a collective: every rank calls it and writes its own FSDP shards, nothing is gathered).
        :meth:`load_sharded` reads it back under any world size and mode, or in one process."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state(optimizer), checkpoint_id=str(path))

    def load_sharded(self, path, optimizer=None) -> None:
        """Restore what :meth:`save_sharded` wrote (resharded to this world size and mode)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._dcp_state(optimizer)
        try:
            with warnings.catch_warnings():  # one process: DCP says it assumes so
                warnings.filterwarnings("ignore", message=".*load in a single process")
                dcp.load(state, checkpoint_id=str(path))  # in place, into this rank's tensors
        except CheckpointException as e:  # a BaseException: make it a plain error
            why = "; ".join(dict.fromkeys(str(f[0]) for f in e.failures.values()))
            raise ValueError(f"checkpoint {path} does not fit this model: {why}") from e
        if optimizer is None:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(self._fwd, state["model"])
        else:
            set_state_dict(self._fwd, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])  # fmt: skip

    def _dcp_state(self, optimizer) -> dict:
        # keys as _Call names them in every mode (DCP drops DDP's "module."), so a checkpoint
        # written under one mode loads under another
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if optimizer is None:
            return {"model": get_model_state_dict(self._fwd)}
        msd, osd = get_state_dict(self._fwd, optimizer)
        return {"model": msd, "optim": osd}

    def _names(self) -> List[str]:
        return [n for n, p in self._fwd.named_parameters() if p.requires_grad]


_PREFIX = "model."  # _Call's child
