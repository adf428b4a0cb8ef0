"""Run ``napari-class2d`` under ``torchrun`` with a fault injected by the test, not the code.

    torchrun ... tests/dist_driver.py [--stop-rank R | --kill-rank R | --hang-rank R]
        --after N -- ARGS...

runs ``napari_class2d.cli.main(ARGS)`` in every process; after the N-th iteration of
the job, process R either sends itself SIGINT (what Ctrl-C in its terminal does:
the command asks the job to stop after the current iteration), is killed with
SIGKILL (a process that dies: out of memory, a node that fails) or stops itself with
SIGSTOP (a process that hangs: a node that no longer answers).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from napari_class2d.cli import main
from napari_class2d.engine.job import Class2DJob


def _inject(rank: int, after: int, sig: int) -> None:
    if int(os.environ.get("RANK", 0)) != rank:
        return
    original = Class2DJob._after

    def after_iteration(self, *args, **kwargs):
        snap = original(self, *args, **kwargs)
        if self.iteration == after:
            os.kill(os.getpid(), sig)
        return snap

    Class2DJob._after = after_iteration


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stop-rank", type=int)
    parser.add_argument("--kill-rank", type=int)
    parser.add_argument("--hang-rank", type=int)
    parser.add_argument("--after", type=int, default=2)
    argv = sys.argv[1:]
    cut = argv.index("--")
    args = parser.parse_args(argv[:cut])
    if args.stop_rank is not None:
        _inject(args.stop_rank, args.after, signal.SIGINT)
    if args.kill_rank is not None:
        _inject(args.kill_rank, args.after, signal.SIGKILL)
    if args.hang_rank is not None:
        _inject(args.hang_rank, args.after, signal.SIGSTOP)
    sys.exit(main(argv[cut + 1 :]))
