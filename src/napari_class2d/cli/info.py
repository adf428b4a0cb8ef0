"""Describe a particle file (RELION .star, cryoSPARC .cs, .mrcs stack) as one JSON object.

Only the particle file and the image-stack headers are read, so this takes
seconds even for very large data sets. Prints, for example::

    {"n_particles": 4748, "box": 256, "pixel_size_A": {"1": 1.06}, "has_ctf": true,
     "source_format": "relion3.1", "path": "...", "n_optics_groups": 1, "n_stacks": 523}

Exit code 0 on success; 2 (message on stderr naming the file) when the file
cannot be used.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="particle file: .star, .cs, .mrcs or .mrc")
    parser.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        metavar="A",
        help="pixel size in Å when the file gives none (overrides a bare stack's header)",
    )
    parser.add_argument(
        "--project-dir",
        default=None,
        metavar="DIR",
        help="RELION/cryoSPARC project folder for resolving relative stack paths",
    )


def describe(particles) -> dict:
    """The JSON-able summary of a particle set."""
    out = {
        "n_particles": int(particles.n_particles),
        "box": int(particles.box),
        "pixel_size_A": {
            str(g): round(a, 6) for g, a in particles.pixel_size_by_optics_group.items()
        },
        "has_ctf": bool(particles.has_ctf),
        "source_format": particles.source_format,
        "path": str(particles.source_path) if particles.source_path else None,
        "n_optics_groups": len(particles.pixel_size_by_optics_group),
        "n_stacks": len(particles.images.stacks),
    }
    if not particles.has_ctf:
        out["note"] = (
            "no CTF parameters in this file: CTF correction will be off (ctf_correction='off')"
        )
    return out


def main(args: argparse.Namespace) -> int:
    from napari_class2d.io.errors import ParticleFileError
    from napari_class2d.io.readers import read_particles

    try:
        particles = read_particles(
            args.path, pixel_size_A=args.pixel_size, project_dir=args.project_dir
        )
    except (ParticleFileError, OSError) as err:
        print(f"napari-class2d info: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(describe(particles)))
    return 0
