"""Run a batch 2D classification and write RELION-style results.

Writes ``OUT/run_data.star`` (every particle with its class, psi, origin,
probability), ``OUT/run_classes.mrcs`` and ``OUT/run_model.star``, refreshed
after every iteration together with ``OUT/checkpoint.pt``. Ctrl-C stops after
the current iteration; ``--resume`` continues a stopped job. Started by torchrun
(``torchrun --nproc-per-node N -m napari_class2d classify ...``), the job runs over
all its processes, one GPU each (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from napari_class2d.cli._options import (
    add_config_args,
    add_source_args,
    config_from_args,
    source_options,
)
from napari_class2d.engine.config import ConfigError
from napari_class2d.run.spec import JobSpec


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="particle file: .star, .cs or .mrcs")
    parser.add_argument("--out", "-o", required=True, help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace results in OUT")
    parser.add_argument("--quiet", action="store_true", help="no line per iteration")
    add_source_args(parser)
    add_config_args(parser, streaming=False)


def main(args: argparse.Namespace) -> int:
    # imported here: the runner loads torch, which `napari-class2d info` and --help do not need
    from napari_class2d.cli._run import run_spec

    prog = "napari-class2d classify"
    try:
        spec = JobSpec(
            config=config_from_args(args),
            input=args.particles,
            out_dir=args.out,
            source=source_options(args),
            resume=args.resume,
            overwrite=args.overwrite,
        ).validate()
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2

    def resume_command() -> str:
        from napari_class2d.engine.distributed import launch_words

        words = launch_words(["classify", str(args.particles), "--out", str(args.out), "--resume"])
        return shlex.join(words)

    return run_spec(spec, prog, resume_command, quiet=args.quiet)
