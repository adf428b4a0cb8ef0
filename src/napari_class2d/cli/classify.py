"""Run a batch 2D classification and write RELION-style results.

Writes ``OUT/run_data.star`` (every particle with its class, psi, origin,
probability), ``OUT/run_classes.mrcs`` and ``OUT/run_model.star``, refreshed
after every iteration together with ``OUT/checkpoint.pt`` (``--resume``
continues a stopped job).
"""

from __future__ import annotations

import argparse
import sys

from napari_class2d.cli._config_args import add_config_args, config_from_args


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="particle file: .star, .cs or .mrcs")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        help="pixel size (Å) when the file does not give one",
    )
    parser.add_argument(
        "--project-dir", default=None, help="folder that image paths in the file are relative to"
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace results in OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(parser)


def format_snapshot(snap) -> str:
    """One status line for an iteration snapshot."""
    import numpy as np

    res = snap.class_resolution_A[np.isfinite(snap.class_resolution_A)]
    best = f"{res.min():.1f} Å" if res.size else "-"
    populated = int((snap.class_counts_hard > 0).sum())
    return (
        f"it {snap.iteration}/{snap.n_iterations_planned} {snap.phase}: "
        f"{snap.n_particles_used} particles, {populated} classes populated, "
        f"best class {best}, annealing {snap.annealing_factor:.2f}"
    )


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from napari_class2d.engine.config import ConfigError
    from napari_class2d.engine.job import Class2DJob
    from napari_class2d.io.errors import ParticleFileError
    from napari_class2d.io.readers import read_particles

    try:
        config = config_from_args(args)
        particles = read_particles(
            args.particles, pixel_size_A=args.pixel_size, project_dir=args.project_dir
        )
        if not particles.has_ctf and config.ctf_correction != "off":
            print(f"{args.particles}: no CTF parameters; CTF correction is off", file=sys.stderr)
            config = config.replace(ctf_correction="off")
        job = Class2DJob(
            particles, config, out_dir=args.out, resume=args.resume, overwrite=args.overwrite
        )
    except (ConfigError, ParticleFileError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bar = tqdm(
        total=job.n_iterations_planned,
        initial=job.iteration,
        disable=args.quiet,
        unit="it",
        desc="2D classification",
    )
    try:
        for snap in job.run():
            bar.update(1)
            bar.write(format_snapshot(snap))
    except KeyboardInterrupt:
        job.request_stop()
        job._save_checkpoint()
        print(f"\nstopped; resume with --resume (checkpoint in {args.out})", file=sys.stderr)
        return 130
    finally:
        bar.close()
    print(f"results: {args.out}/run_data.star, run_classes.mrcs, run_model.star")
    return 0
