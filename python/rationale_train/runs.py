"""Run-folder helpers shared by the training commands (``rationale-train sft / mario / collate``).

A run folder holds::

    run_dir/
        config.json        the configuration the run used (written at start, checked on --resume)
        metrics.jsonl      one JSON object per line, appended and flushed as the run goes
        summary.md         the human-readable result (a markdown table), written at the end
        checkpoints/       see ``rationale_train.checkpoint``

Helpers here are generic: :func:`prepare_run_dir` (create, or reopen for ``--resume``),
:func:`save_config` / :func:`load_config`, :class:`MetricsLogger` (append + flush, truncatable so a
resumed run drops records written after its checkpoint), :func:`markdown_table` /
:func:`write_summary`, :func:`write_text_atomic` / :func:`write_jsonl_atomic`,
:func:`seed_everything` and :func:`progress` (a tqdm bar that is silent when stderr is not a
terminal or when disabled).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "MetricsLogger",
    "default_run_dir",
    "format_value",
    "load_config",
    "markdown_table",
    "prepare_run_dir",
    "progress",
    "read_metrics",
    "save_config",
    "seed_everything",
    "set_progress_enabled",
    "write_jsonl_atomic",
    "write_summary",
    "write_text_atomic",
    "add_dataclass_arguments",
    "build_config",
    "read_config_file",
]

PathLike = Union[str, "os.PathLike[str]"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.md"


# ------------------------------------------------------------------------------------ files


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary sibling + fsync + ``os.replace``: readers see
    either the old or the new complete file."""
    from .checkpoint import fsync_dir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def write_jsonl_atomic(path: PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line, atomically (:func:`write_text_atomic`)."""
    text = "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows)
    return write_text_atomic(path, text)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):  # 0-d tensors, numpy scalars
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    return obj


# ------------------------------------------------------------------------------------ run dir


def default_run_dir(command: str, root: PathLike = "runs") -> Path:
    """``runs/<command>-YYYYmmdd-HHMMSS`` (a suffix ``-2``, ``-3``... if it exists)."""
    base = Path(root) / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def prepare_run_dir(run_dir: PathLike, resume: bool = False, overwrite: bool = False) -> Path:
    """Create ``run_dir`` for a fresh run, or check it for ``resume``.

    Fresh: the folder must not exist or be empty (``overwrite=True`` empties it first). Resume:
    it must exist and hold a ``config.json``."""
    import shutil

    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"--resume: {str(run_dir)!r} is not a run folder (no config)")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"run folder {str(run_dir)!r} is not empty: pass --resume to continue it or "
                "--overwrite to start over"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_config(run_dir: PathLike, config: Any) -> Path:
    """Write ``config`` (a dataclass or mapping) as ``run_dir/config.json``, atomically."""
    text = json.dumps(_jsonable(config), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return write_text_atomic(Path(run_dir) / CONFIG_FILE, text)


def load_config(run_dir: PathLike) -> Dict[str, Any]:
    """The ``config.json`` of a run folder as a dict."""
    return json.loads((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------ metrics


class MetricsLogger:
    """Append JSON records to ``run_dir/metrics.jsonl``, one per line, flushed after each.

    ``len(logger)`` is the number of records in the file; a checkpoint stores it and a resumed run
    calls :meth:`truncate` with it, so records written after the checkpoint (and before a crash)
    are not duplicated. ``time`` (seconds since the logger opened, summed across resumes is not
    attempted) is added to each record unless it has one. Use as a context manager or ``close()``.
    """

    def __init__(self, path: PathLike, *, add_time: bool = True, write: bool = True):
        self.path = Path(path)
        self.write = write  # False: count records only (ranks other than 0 under torchrun)
        self._count = len(read_metrics(self.path)) if self.path.is_file() else 0
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path if write else os.devnull, "a", encoding="utf-8")
        self._t0 = time.time()
        self.add_time = add_time

    def __len__(self) -> int:
        return self._count

    def log(self, record: Optional[Mapping[str, Any]] = None, **fields: Any) -> Dict[str, Any]:
        rec = dict(record or {})
        rec.update(fields)
        if self.add_time and "time" not in rec:
            rec["time"] = round(time.time() - self._t0, 3)
        rec = _jsonable(rec)
        self._f.write(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")
        self._f.flush()
        self._count += 1
        return rec

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` records (rewritten atomically)."""
        if not self.write:
            self._count = min(self._count, max(int(n), 0))
            return
        rows = read_metrics(self.path)[: max(int(n), 0)]
        self._f.close()
        write_jsonl_atomic(self.path, rows)
        self._count = len(rows)
        self._f = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: PathLike) -> List[Dict[str, Any]]:
    """The records of a metrics file (a run folder or the ``.jsonl`` path); a torn last line
    (crash mid-write) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


# ------------------------------------------------------------------------------------ summary


def format_value(v: Any, digits: int = 4) -> str:
    """Table cell text: floats with ``digits`` significant decimals, ``None`` as ``-``."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None, digits: int = 4
) -> str:
    """A GitHub markdown table of ``rows`` (dicts); ``columns`` default to the keys in order of
    first appearance. Missing cells print ``-``."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    head = "| " + " | ".join(columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(format_value(r.get(c), digits) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def write_summary(run_dir: PathLike, title: str, sections: Sequence[tuple]) -> Path:
    """Write ``run_dir/summary.md``: ``# title`` then, for each ``(heading, body)``, a
    ``## heading`` section (``body``: markdown text, e.g. from :func:`markdown_table`)."""
    parts = [f"# {title}\n"]
    for heading, body in sections:
        parts.append(f"\n## {heading}\n\n{body.rstrip()}\n")
    return write_text_atomic(Path(run_dir) / SUMMARY_FILE, "".join(parts))


# ------------------------------------------------------------------------------------ RNG


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python ``random``, numpy (when installed) and torch (CPU and CUDA).
    ``deterministic=True`` also asks torch for deterministic algorithms (warn only)."""
    import torch

    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


# ------------------------------------------------------------------------------------ progress

_PROGRESS_ENABLED: Optional[bool] = None  # None: automatic (stderr is a TTY)


def set_progress_enabled(enabled: Optional[bool]) -> None:
    """Force progress bars on (``True``), off (``False``) or back to automatic (``None``: shown
    when stderr is a terminal). The CLI's ``--no-progress`` sets ``False``."""
    global _PROGRESS_ENABLED
    _PROGRESS_ENABLED = enabled


def _progress_on(disable: Optional[bool]) -> bool:
    if disable is not None:
        return not disable
    from . import dist

    if not dist.is_main():  # one set of bars per run: rank 0's
        return False
    if _PROGRESS_ENABLED is not None:
        return _PROGRESS_ENABLED
    if os.environ.get("RATIONALE_TRAIN_NO_PROGRESS"):
        return False
    return sys.stderr.isatty()


class _NullBar:
    """The no-op stand-in for a tqdm bar."""

    def __init__(self, iterable=None, total=None):
        self.iterable = iterable
        self.total = total
        self.n = 0

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else range(self.total or 0))

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_description(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(
    iterable: Optional[Iterable] = None,
    *,
    total: Optional[int] = None,
    desc: Optional[str] = None,
    disable: Optional[bool] = None,
    leave: bool = False,
    **kwargs: Any,
):
    """A tqdm progress bar over ``iterable`` (or a manual one with ``total``), shown only when
    enabled (see :func:`set_progress_enabled`); otherwise a silent stand-in with the same
    ``update`` / ``set_postfix`` / ``close`` methods. Without tqdm installed, always silent."""
    if _progress_on(disable):
        try:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True,
                        **kwargs)  # fmt: skip
        except ImportError:  # pragma: no cover
            pass
    return _NullBar(iterable, total)


# ------------------------------------------------------------------------------------ config CLI


def read_config_file(path: PathLike, section: Optional[str] = None) -> Dict[str, Any]:
    """A JSON (``.json``) or TOML (any other suffix) config file as a flat dict. With ``section``,
    a table / object of that name is used when the file has one (``[mario]`` in TOML), else the
    top level. Keys may use ``-`` or ``_``."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        try:
            import tomllib  # type: ignore[import-not-found]
        except ImportError:  # pragma: no cover - python < 3.11
            import tomli as tomllib  # type: ignore[no-redef]
        data = tomllib.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold an object / table")
    if section and isinstance(data.get(section), dict):
        data = data[section]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _field_types(cls) -> Dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple:
    import typing

    args = typing.get_args(tp)
    if typing.get_origin(tp) is Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return tp, False


def _scalar_parser(tp, optional: bool):
    def parse(s: str):
        if optional and s.strip().lower() in ("none", "null", ""):
            return None
        if tp is bool:
            low = s.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {s!r}")
        return tp(s)

    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def add_dataclass_arguments(parser, cls, exclude: Sequence[str] = ()) -> None:
    """One ``--flag`` per field of dataclass ``cls`` (``snake_case`` → ``--snake-case``), all with
    ``default=argparse.SUPPRESS`` so that the namespace only holds flags given explicitly (they
    override a config file, which overrides the defaults; see :func:`build_config`). Booleans get
    ``--x`` / ``--no-x``; list fields take several values or one comma-separated value; optional
    fields accept ``none``. Help text and ``choices`` come from the field's ``metadata``."""
    import argparse
    import typing

    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )  # fmt: skip
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
        flag = "--" + f.name.replace("_", "-")
        kw: Dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        origin = typing.get_origin(tp)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif origin in (list, List, tuple, Sequence) or tp in (list, tuple):
            inner = (typing.get_args(tp) or (str,))[0]
            kw["nargs"] = "+"
            kw["type"] = _scalar_parser(inner, False)
            kw["metavar"] = f.name.upper()
            parser.add_argument(flag, **kw)
        else:
            kw["type"] = _scalar_parser(tp if tp in (int, float, str) else str, optional)
            kw["metavar"] = getattr(tp, "__name__", "VALUE").upper()
            parser.add_argument(flag, **kw)


def build_config(cls, args=None, file_values: Optional[Mapping[str, Any]] = None, base=None):
    """``cls`` instance: ``base`` (an instance, default ``cls()``), then ``file_values`` (a dict
    from :func:`read_config_file`), then the explicit flags in ``args`` (a namespace from a parser
    built with :func:`add_dataclass_arguments`). List values given as one comma-separated string
    are split. Unknown keys in ``file_values`` raise ``ValueError``."""
    import typing

    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = dataclasses.asdict(base) if base is not None else {}
    unknown = sorted(set(file_values or {}) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known: {sorted(names)}")
    values.update(file_values or {})
    if args is not None:
        for name in names:
            if hasattr(args, name):
                values[name] = getattr(args, name)
    for name, v in list(values.items()):
        tp, _ = _unwrap_optional(hints[name])
        origin = typing.get_origin(tp)
        if origin in (list, List, tuple, Sequence) or tp in (list, tuple):
            if isinstance(v, str):
                v = [p.strip() for p in v.split(",") if p.strip()]
            elif v is not None:
                out = []
                for item in v:
                    if isinstance(item, str) and "," in item:
                        out.extend(p.strip() for p in item.split(",") if p.strip())
                    else:
                        out.append(item)
                v = out
            values[name] = v
    return cls(**values)


# --------------------------------------------------------------------------------------------
# derived seeds: every random choice of a run is keyed by (run seed, what it is for), so a resumed
# run draws exactly what an uninterrupted one would


def derive_seed(seed: int, *parts: Any) -> int:
    """A 62-bit seed from the run seed and a tag (sha256, so unrelated tags are independent)."""
    import hashlib

    h = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 62) - 1)


def seeded_generator(seed: int, *parts: Any):
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    import torch

    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def epoch_order(seed: int, tag: str, n: int, needed: int) -> List[int]:
    """Concatenated shuffled epochs of ``range(n)``, at least ``needed`` long (deterministic)."""
    import torch

    order: List[int] = []
    e = 0
    while len(order) < needed and n > 0:
        order.extend(torch.randperm(n, generator=seeded_generator(seed, tag, e)).tolist())
        e += 1
    return order
