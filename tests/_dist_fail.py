"""Run by tests/test_dist.py under torchrun: ``rationale-train ARGS...`` with MaRio's train step
raising on rank 1 at global step 3 (a crash on one rank, the others healthy)."""

import sys

from rationale_train import cli, dist, mario

_step = mario.train_step
_calls = [0]


def failing_step(*args, **kwargs):
    _calls[0] += 1
    if dist.rank() == 1 and _calls[0] == 3:
        raise RuntimeError("injected failure on rank 1")
    return _step(*args, **kwargs)


mario.train_step = failing_step

if __name__ == "__main__":
    cli.main(sys.argv[1:])
