"""Classify particles while they arrive.

Watches a folder into which per-micrograph particle STAR files and their .mrcs
stacks are written (RELION Extract/jobNNN/, `napari-class2d simulate
--stream-into`), or one STAR file that grows, and runs a streaming 2D
classification on the complete files. Class averages and run_data.star in
--out are refreshed after every iteration. Press Ctrl-C to stop (the checkpoint
is kept; continue with --resume), or let --finish-after-idle finish the job once
no new particles arrived for that long. See docs/streaming.md; under torchrun the job
runs over all its processes (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from napari_class2d.cli._options import (
    add_config_args,
    add_source_args,
    add_stream_args,
    config_from_args,
    source_options,
    stream_options,
)
from napari_class2d.engine.config import ConfigError
from napari_class2d.run.spec import JobSpec


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "watch",
        metavar="WATCH_DIR_OR_STAR",
        help="folder to watch (searched recursively for *.star) or one growing STAR file",
    )
    parser.add_argument("--out", "-o", required=True, help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace results in OUT")
    parser.add_argument("--quiet", action="store_true", help="no line per iteration")
    add_stream_args(parser)
    add_source_args(parser)
    add_config_args(parser, streaming=True)


def spec_from_args(args: argparse.Namespace):
    """The job specification of the parsed options.

    Raises
    ------
    ConfigError
        An invalid value (the message names the parameter).
    """
    return JobSpec(
        config=config_from_args(args),
        input=args.watch,
        out_dir=args.out,
        streaming=True,
        source=source_options(args),
        stream=stream_options(args),
        resume=args.resume,
        overwrite=args.overwrite,
    ).validate()


def main(args: argparse.Namespace) -> int:
    # imported here: the runner loads torch, which `napari-class2d info` and --help do not need
    from napari_class2d.cli._run import run_spec

    prog = "napari-class2d stream"
    try:
        spec = spec_from_args(args)
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2

    def resume_command() -> str:
        from napari_class2d.engine.distributed import launch_words

        words = launch_words(["stream", str(args.watch), "--out", str(args.out), "--resume"])
        return shlex.join(words)

    return run_spec(spec, prog, resume_command, quiet=args.quiet)
