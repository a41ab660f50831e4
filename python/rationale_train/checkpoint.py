"""Atomic training checkpoints with exact resume.

Layout of a run folder::

    run_dir/checkpoints/
        step_00000100/          one complete checkpoint
            model.safetensors   weights (shared / tied tensors stored once)
            optimizer.pt        optimizer.state_dict()          (only with an optimizer)
            dcp/                under FSDP instead of the two above: every rank's shards of the
                                model and optimizer (torch.distributed.checkpoint)
            scheduler.pt        scheduler.state_dict()          (only with a scheduler)
            rng.pt              python random, numpy, torch CPU and CUDA RNG states
            meta.json           {"format", "step", "extra", "files"}: written last
        step_00000200/
        latest                  "step_00000200\\n"

How a save stays atomic: everything is written into a hidden temporary directory
(``checkpoints/.tmp-step_XXXXXXXX-*``), every file and the directory are fsynced, the directory is
renamed onto ``step_XXXXXXXX`` with ``os.replace`` (atomic on POSIX), and only then is ``latest``
rewritten (temporary file + fsync + ``os.replace`` + directory fsync). A crash at any point leaves
``latest`` pointing to the previous complete checkpoint, and no ``step_*`` directory is ever
partially written. Pruning renames a directory to a hidden ``.trash-*`` name before deleting it.
Hidden leftovers of a crashed save are removed by the next save (one writer per run folder: under
torch.distributed only rank 0 saves).

Exact resume: weights are restored bit for bit, the optimizer / scheduler state dicts are
restored with ``load_state_dict``, and the RNG states are put back, so a run that resumes from step
``k`` computes the same losses as the uninterrupted run (same device, threads and batching). State
the loop keeps elsewhere (data order, round, pool) goes into ``extra`` (JSON) or its own files.

Loading uses ``torch.load(weights_only=True)`` (tensors and plain containers only); pass
``weights_only=False`` to :func:`load_checkpoint` for a scheduler whose state holds other objects
(only for checkpoints you trust).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

__all__ = [
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = "rationale-train-checkpoint/1"
CKPT_DIR = "checkpoints"
LATEST = "latest"
DCP_DIR = "dcp"  # torch.distributed.checkpoint shards of an FSDP run
_STEP_RE = re.compile(r"^step_(\d+)$")
_HIDDEN_PREFIXES = (".tmp-", ".trash-")

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------
# file system helpers


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so that renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: PathLike) -> None:
    """fsync every file and directory under ``path``."""
    for root, _dirs, files in os.walk(str(path)):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temporary checkpoint onto its final name (a separate function so that
    tests can simulate a crash at this point)."""
    os.replace(tmp, final)


def _remove(path: Path) -> None:
    """Delete a directory so that it never looks like a checkpoint while half deleted."""
    trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _ckpt_root(run_dir: PathLike) -> Path:
    """``run_dir/checkpoints``, or ``run_dir`` itself when it is that folder."""
    run_dir = Path(run_dir)
    if run_dir.name == CKPT_DIR and not (run_dir / CKPT_DIR).is_dir():
        return run_dir
    return run_dir / CKPT_DIR


def _is_complete(path: Path) -> bool:
    return _STEP_RE.match(path.name) is not None and (path / "meta.json").is_file()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # dist.Parallel (.model), DistributedDataParallel / DataParallel (.module), torch.compile
    # (._orig_mod)
    while True:
        if _is_parallel(model):
            model = model.model
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_parallel(model) -> bool:
    return hasattr(model, "gather_state") and hasattr(model, "load_state")


def _fsdp(model) -> bool:
    return _is_parallel(model) and model.mode == "fsdp"


# ----------------------------------------------------------------------------------------------
# RNG states


def _rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss),
                          float(cached))  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            np = None
        if np is not None:
            name, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        saved = list(state["cuda"])
        n = torch.cuda.device_count()
        if len(saved) != n:
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(saved)} devices, this process sees {n}: "
                "restoring the first min(...)",
                stacklevel=3,
            )
        for i, s in enumerate(saved[:n]):
            torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------------------------
# public API


def list_checkpoints(run_dir: PathLike) -> List[Path]:
    """Complete checkpoints of a run, oldest step first."""
    root = _ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The checkpoint ``latest`` points to; when the pointer is missing or names a checkpoint that
    is gone, the complete checkpoint with the highest step; ``None`` when the run has none."""
    root = _ckpt_root(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if target.is_dir() and _is_complete(target):
            return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    extra: Optional[Dict[str, Any]] = None,
    keep_last: Optional[int] = 2,
) -> Path:
    """Write checkpoint ``step`` of ``model`` (+ ``optimizer``, ``scheduler``, RNG states and the
    JSON-able ``extra``) atomically to ``run_dir/checkpoints/step_XXXXXXXX``, point ``latest`` at
    it, and delete all but the ``keep_last`` newest checkpoints (``None`` or ``<= 0``: keep all).
    Saving a step that already exists replaces it. Returns the checkpoint directory.

    ``model`` may be a :class:`rationale_train.dist.Parallel`: then every rank calls this and the
    ranks meet at a barrier before returning. DDP: rank 0 writes the model as above. FSDP: every
    rank writes its own shards of the model and optimizer with torch.distributed.checkpoint
    (``dcp/`` instead of ``model.safetensors`` and ``optimizer.pt``; nothing is gathered), rank 0
    the rest. Either resumes under any world size and mode, and in one process.
    """
    from . import dist

    meta = _meta(step, extra)  # every rank validates before anything is written
    if not _is_parallel(model):
        tmp = _begin(run_dir, meta)
        return _finish(tmp, run_dir, meta, model, optimizer, scheduler, keep_last)
    sharded = _fsdp(model)
    tmp = Path(dist.from_main(lambda: str(_begin(run_dir, meta))))
    if sharded:  # a collective: each rank writes its shards into the temporary directory
        model.save_sharded(tmp / DCP_DIR, optimizer)
        meta["dcp_optimizer"] = optimizer is not None
    rest = (None, None) if sharded else (model, optimizer)
    dist.main_only(lambda: _finish(tmp, run_dir, meta, *rest, scheduler, keep_last))
    return Path(run_dir) / CKPT_DIR / f"step_{meta['step']:08d}"


def _meta(step, extra) -> Dict[str, Any]:
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    meta = {"format": FORMAT, "step": step, "extra": extra or {}, "time": time.time()}
    try:  # before anything is written
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint `extra` must be JSON-serialisable: {e}") from e
    return meta


def _begin(run_dir, meta) -> Path:
    """Remove leftovers of a crashed save / prune (one writer per run) and make the hidden
    temporary directory the checkpoint is written into."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for p in root.iterdir():
        if p.name.startswith(_HIDDEN_PREFIXES):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-step_{meta['step']:08d}-", dir=str(root)))


def _finish(tmp, run_dir, meta, model, optimizer, scheduler, keep_last) -> Path:
    """Write what is left into ``tmp`` (``model`` / ``optimizer`` ``None``: already there as
    ``dcp/``), publish it and prune."""
    from safetensors.torch import save_model

    root = Path(run_dir) / CKPT_DIR
    name = f"step_{meta['step']:08d}"
    final = root / name
    try:
        files = [DCP_DIR] if (tmp / DCP_DIR).is_dir() else []
        if model is not None:
            save_model(_unwrap(model), str(tmp / "model.safetensors"), metadata={"format": "pt"},
                       force_contiguous=True)  # fmt: skip
            files.append("model.safetensors")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            files.append("optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            files.append("scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        files.append("rng.pt")
        meta = dict(meta, files=files)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, allow_nan=False))
        fsync_tree(tmp)
        if final.exists():
            _remove(final)
        _publish(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(root / LATEST, name + "\n")

    if keep_last is not None and keep_last > 0:
        done = list_checkpoints(run_dir)
        keep = {p.name for p in done[-keep_last:]} | {name}
        for p in done:
            if p.name not in keep:
                _remove(p)
        fsync_dir(root)
    return final


def load_checkpoint(
    run_dir_or_ckpt: PathLike,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    *,
    restore_rng: bool = True,
    weights_only: bool = True,
) -> Dict[str, Any]:
    """Restore a checkpoint into ``model`` (and ``optimizer`` / ``scheduler`` when given) and put
    back the RNG states (unless ``restore_rng=False``).

    ``run_dir_or_ckpt`` is a run folder (its latest checkpoint is loaded), its ``checkpoints``
    folder, or one ``step_XXXXXXXX`` directory. Returns ``{"step", "extra", "path"}``. Raises
    ``FileNotFoundError`` when there is no checkpoint, ``ValueError`` when an optimizer or
    scheduler is given but the checkpoint has none. ``model`` may be a
    :class:`rationale_train.dist.Parallel` (every rank calls this and reads the files; FSDP keeps
    each rank's shard).
    """
    from safetensors.torch import load_file, load_model

    path = Path(run_dir_or_ckpt)
    if not (path / "meta.json").is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint under {str(path)!r}")
        path = found
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint (format={meta.get('format')!r})")

    sharded = (path / DCP_DIR).is_dir()
    for obj, fname in ((optimizer, "optimizer.pt"), (scheduler, "scheduler.pt")):
        if obj is None or (path / fname).is_file():
            continue
        if not (obj is optimizer and sharded and meta.get("dcp_optimizer")):
            raise ValueError(f"{path} has no {fname}: it was saved without one")
    if sharded:  # written by FSDP ranks: resharded to this world size and mode
        from . import dist

        par = model if _is_parallel(model) else dist.Parallel(_unwrap(model), "none")
        par.load_sharded(path / DCP_DIR, optimizer)
    else:
        opt_state = None
        if optimizer is not None:
            opt_state = torch.load(path / "optimizer.pt", map_location="cpu",
                                   weights_only=weights_only)  # fmt: skip
        if _fsdp(model):
            model.load_state(load_file(str(path / "model.safetensors")), opt_state, optimizer)
        else:
            load_model(_unwrap(model), str(path / "model.safetensors"), strict=True)
            if optimizer is not None:
                optimizer.load_state_dict(opt_state)
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu",
                                             weights_only=weights_only))  # fmt: skip
    if restore_rng and (path / "rng.pt").is_file():
        _set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=weights_only))
    return {"step": int(meta["step"]), "extra": meta.get("extra", {}), "path": path}
