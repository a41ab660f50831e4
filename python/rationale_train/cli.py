"""``rationale-train``: the command line of the training layer.

Subcommands (each a module with ``add_arguments(parser)`` and ``run(args)``):

- ``sft``: the SFT warm start and its evaluation (``rationale_train.mario``, zero rounds);
- ``mario``: SFT + MaRio rounds + evaluation (``rationale_train.mario``); with no arguments, the
  embedded default run (synthetic task, tiny Llama, a few minutes on a CPU);
- ``eval``: evaluate a run's checkpoint (``rationale_train.evaluate``);
- ``collate``: COLLATE (``rationale_train.collate``, loaded lazily).

Every training option is a flag and a key of a ``--config FILE`` (JSON, or TOML with the keys at
the top level or in a ``[mario]`` / ``[collate]`` table); explicit flags override the file, which
overrides the defaults. ``--no-progress`` hides progress bars (they are shown only on a terminal
anyway). Run as ``rationale-train ...`` or ``python -m rationale_train.cli ...``.

Several processes: ``torchrun --nproc-per-node N $(command -v rationale-train) mario ...`` (or
``torchrun ... -m rationale_train mario ...``); see :mod:`rationale_train.dist`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from typing import Any, Callable, Optional, Sequence

__all__ = ["build_parser", "main"]


class _Command:
    def __init__(self, module: str, add: str = "add_arguments", run: str = "run", help: str = ""):
        self.module, self.add, self.run, self.help = module, add, run, help

    def load(self):
        return importlib.import_module(self.module)


COMMANDS = {
    "sft": _Command("rationale_train.mario", "add_sft_arguments", "run_sft",
                    "SFT warm start on silver rationales (+ evaluation)"),
    "mario": _Command("rationale_train.mario", help="MaRio: SFT + multi-reward Quark rounds + "
                      "evaluation (no arguments: the embedded default run)"),
    "eval": _Command("rationale_train.evaluate", help="evaluate a run's checkpoint"),
    "collate": _Command("rationale_train.collate", help="COLLATE: preference tuning of "
                        "rationales with DPO"),
}  # fmt: skip


def _not_implemented(name: str, err: Exception) -> Callable[[argparse.Namespace], Any]:
    def run(args):
        raise SystemExit(
            f"rationale-train {name}: not implemented yet (module {COMMANDS[name].module} could "
            f"not be imported: {err})"
        )

    return run


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="JSON or TOML file of options (explicit flags override it)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all but ``collate`` when ``None``), so a
    missing or broken optional command never breaks the others."""
    parser = argparse.ArgumentParser(
        prog="rationale-train",
        description="Train small LMs to reason with rationales: MaRio and COLLATE.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{sft,mario,eval,collate}")
    sub.required = True
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        _add_common(p)
        if command is None and name == "collate" or command is not None and name != command:
            p.set_defaults(_run=None)
            continue
        try:
            mod = cmd.load()
        except ModuleNotFoundError as e:
            if e.name != cmd.module:
                raise
            p.set_defaults(_run=_not_implemented(name, e))
            continue
        if not (hasattr(mod, cmd.add) and hasattr(mod, cmd.run)):
            missing = AttributeError(f"{cmd.module} has no {cmd.add}() / {cmd.run}()")
            p.set_defaults(_run=_not_implemented(name, missing))
            continue
        getattr(mod, cmd.add)(p)
        p.set_defaults(_run=getattr(mod, cmd.run))
    return parser


def _command_of(argv: Sequence[str]) -> Optional[str]:
    for a in argv:
        if a in COMMANDS:
            return a
        if not a.startswith("-"):
            return None
    return None


def _record(fn):
    """torchrun's error recording: a rank that raises writes its traceback where the launcher
    reports it as the run's root cause (and the launcher stops the other ranks)."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
    except ImportError:  # pragma: no cover
        return fn
    return record(fn)


@_record
def main(argv: Optional[Sequence[str]] = None) -> Any:
    from . import dist
    from .runs import read_config_file, set_progress_enabled

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if getattr(args, "no_progress", False):
        set_progress_enabled(False)
    args.config_values = None
    if getattr(args, "config", None):
        args.config_values = read_config_file(args.config, section=args.command)
    if not dist.launched():
        return args._run(args)
    # under torchrun: one process group for the whole command; rank 0 alone prints
    dist.init()
    quiet = None if dist.is_main() else open(os.devnull, "w")
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            out = args._run(args)
    except BaseException:
        dist.shutdown(clean=False)
        raise
    finally:
        if quiet:
            quiet.close()
    dist.shutdown()
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
