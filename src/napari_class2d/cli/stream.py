"""Classify particles while they arrive.

Watches a folder into which per-micrograph particle STAR files and their .mrcs
stacks are written (RELION Extract/jobNNN/, `napari-class2d simulate
--stream-into`), or one STAR file that grows, and runs a streaming 2D
classification on the complete files. Class averages and run_data.star in
--out are refreshed after every iteration. Press Ctrl-C to stop (the checkpoint
is kept; continue with --resume), or let --finish-after-idle finish the job once
no new particles arrived for that long. See docs/streaming.md.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from pathlib import Path


def _add(parser: argparse.ArgumentParser, *flags: str, **kwargs) -> None:
    """Add an option unless the shared classify options already define it."""
    if any(f in parser._option_string_actions for f in flags):
        return
    parser.add_argument(*flags, **kwargs)


def _nonneg_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text}: expected a number of seconds >= 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer >= 1")
    return value


def add_args(parser: argparse.ArgumentParser) -> None:
    from napari_class2d.cli._config_args import add_config_args

    parser.add_argument(
        "watch",
        metavar="WATCH_DIR_OR_STAR",
        type=Path,
        help="folder to watch (searched recursively for *.star) or one growing STAR file",
    )
    _add(parser, "--out", "-o", type=Path, required=True, help="output folder")
    stream = parser.add_argument_group("streaming")
    stream.add_argument(
        "--poll-seconds",
        type=_nonneg_float,
        default=2.0,
        metavar="S",
        help="pause between looks at the folder while waiting for particles (default 2)",
    )
    stream.add_argument(
        "--finish-after-idle",
        type=_nonneg_float,
        default=None,
        metavar="SECONDS",
        help="finish the job (remaining online and final full iterations, outputs) once no "
        "new particles arrived for this long (default: run until Ctrl-C)",
    )
    stream.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    stream.add_argument(
        "--start-after",
        type=_positive_int,
        default=None,
        metavar="N",
        help="particles needed before the first iteration (default: one online mini-batch, "
        "batch size per class x classes)",
    )
    stream.add_argument(
        "--full-every",
        type=_positive_int,
        default=None,
        metavar="N",
        help="after the online phase, new particles that trigger a full iteration "
        "(default: 2 mini-batches)",
    )
    stream.add_argument(
        "--mode",
        choices=("full", "incremental"),
        default=None,
        help="after the online phase: full iterations over all particles (default) or "
        "incremental updates on the new particles with a full pass every few updates",
    )
    stream.add_argument(
        "--full-pass-every",
        type=_positive_int,
        default=None,
        metavar="N",
        help="--mode incremental: a full pass over all particles every N updates (default 5)",
    )
    stream.add_argument(
        "--stable-seconds",
        type=_nonneg_float,
        default=0.0,
        metavar="S",
        help="take a file only once it has not changed for this long (default 0: as soon "
        "as it is complete)",
    )
    stream.add_argument(
        "--broken-after-seconds",
        type=_nonneg_float,
        default=60.0,
        metavar="S",
        help="report a file that stays incomplete for this long (default 60)",
    )
    _add(
        parser,
        "--pixel-size",
        type=float,
        default=None,
        metavar="A",
        help="pixel size in Å for STAR files that give none",
    )
    _add(
        parser,
        "--project-dir",
        type=Path,
        default=None,
        help="RELION project folder that relative image paths start from",
    )
    _add(parser, "--overwrite", action="store_true", help="replace outputs already in --out")
    add_config_args(parser)


def stream_config(args: argparse.Namespace):
    """The job configuration: the classify options plus the streaming ones.

    Raises
    ------
    ConfigError
        An invalid value (the message names the parameter).
    """
    from napari_class2d.cli._config_args import config_from_args

    extra = {}
    if args.start_after is not None:
        extra["start_after_n_particles"] = args.start_after
    if args.full_every is not None:
        extra["full_iteration_every_n_new"] = args.full_every
    if args.mode is not None:
        extra["stream_mode"] = args.mode
    if args.full_pass_every is not None:
        extra["full_pass_every_n_updates"] = args.full_pass_every
    return config_from_args(args, **extra)


def _status(snap, started: float) -> str:
    """One line per snapshot: phase, particles seen/used/needed, iteration, classes."""
    elapsed = time.monotonic() - started
    parts = [
        f"[{elapsed:7.1f} s]",
        f"{snap.phase:<11}",
        f"it {snap.iteration}/{snap.n_iterations_planned}",
        f"seen {snap.n_particles_seen}",
        f"used {snap.n_particles_used}",
    ]
    if snap.n_particles_needed:
        parts.append(f"need {snap.n_particles_needed} more")
    if snap.phase != "waiting" or snap.iteration:
        populated = int((snap.class_counts_hard > 0).sum())
        parts.append(f"classes {populated}/{snap.n_classes} populated")
        finite = snap.class_resolution_A[snap.class_resolution_A < float("inf")]
        if len(finite):
            parts.append(f"best {float(finite.min()):.1f} Å")
        parts.append(f"anneal {snap.annealing_factor:.2f}")
    if snap.next_full_at:
        parts.append(f"next full at {snap.next_full_at}")
    if snap.message:
        parts.append(f"- {snap.message}")
    return "  ".join(parts)


def _resume_hint(args) -> str:
    return f"napari-class2d stream {args.watch} --out {args.out} --resume"


def main(args: argparse.Namespace) -> int:
    import logging

    from napari_class2d.engine.config import ConfigError
    from napari_class2d.engine.job import Class2DJob
    from napari_class2d.stream.watcher import FolderWatcher

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    out = sys.stdout
    try:
        config = stream_config(args)
    except ConfigError as err:
        print(f"napari-class2d stream: error: {err}", file=sys.stderr)
        return 2
    try:
        watcher = FolderWatcher(
            args.watch,
            pixel_size_A=args.pixel_size,
            project_dir=args.project_dir,
            stable_seconds=args.stable_seconds,
            broken_after_seconds=args.broken_after_seconds,
            exclude=[args.out],
        )
        job = Class2DJob(
            watcher,
            config,
            out_dir=args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            poll_seconds=args.poll_seconds,
        )
    except FileExistsError as err:
        print(
            f"napari-class2d stream: error: {err}. Add --resume to continue that job or "
            "--overwrite to start over.",
            file=sys.stderr,
        )
        return 2
    except (FileNotFoundError, ConfigError, ValueError) as err:
        print(f"napari-class2d stream: error: {err}", file=sys.stderr)
        return 2

    what = "STAR file" if watcher.single_file else "folder"
    print(
        f"watching {what} {watcher.path} -> {args.out}"
        + (f" (resumed: {watcher.n_taken} particles already taken)" if args.resume else ""),
        file=out,
        flush=True,
    )

    # First Ctrl-C: stop after the current iteration (checkpoint kept); second: abort.
    interrupted = []

    def on_interrupt(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        print("\nstopping after the current iteration (Ctrl-C again to abort)...", file=out)
        job.request_stop()

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if in_main_thread else None
    started = time.monotonic()
    last_arrival = time.monotonic()
    last_seen = -1
    finishing = False
    last_line, last_line_time = "", 0.0
    reported_broken: set[str] = set()
    try:
        for snap in job.run():
            now = time.monotonic()
            if snap.n_particles_seen != last_seen:
                last_seen, last_arrival = snap.n_particles_seen, now
            line = _status(snap, started)
            # repeated waiting lines: at most one every 30 s
            key = line.split("]", 1)[1]
            if snap.phase != "waiting" or key != last_line or now - last_line_time > 30:
                print(line, file=out, flush=True)
                last_line, last_line_time = key, now
            for path in sorted(set(watcher.broken_files) - reported_broken):
                print(f"incomplete file: {path}: {watcher.broken_files[path]}", file=out)
                reported_broken.add(path)
            if (
                args.finish_after_idle is not None
                and not finishing
                and now - last_arrival >= args.finish_after_idle
            ):
                if snap.n_particles_seen == 0:
                    print(
                        f"no particles arrived in {args.finish_after_idle:g} s; nothing to "
                        "classify",
                        file=sys.stderr,
                    )
                    return 1
                print(
                    f"no new particles for {args.finish_after_idle:g} s: finishing "
                    f"({snap.n_particles_seen} particles)",
                    file=out,
                    flush=True,
                )
                job.request_finish()
                finishing = True
    except KeyboardInterrupt:
        print(
            f"aborted; the last checkpoint is in {args.out}. Resume with:\n  "
            + _resume_hint(args),
            file=out,
        )
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)

    if job.done:
        print(
            f"done: {job.n_particles} particles in {config.n_classes} classes; wrote "
            f"{args.out / 'run_data.star'}, {args.out / 'run_classes.mrcs'}, "
            f"{args.out / 'run_model.star'}",
            file=out,
        )
        if watcher.broken_files:
            print(
                f"{len(watcher.broken_files)} file(s) were never complete and were not used:",
                file=out,
            )
            for path, reason in sorted(watcher.broken_files.items()):
                print(f"  {path}: {reason}", file=out)
        return 0
    print(
        f"stopped; outputs and checkpoint are in {args.out}. Resume with:\n  "
        + _resume_hint(args),
        file=out,
    )
    return 0
