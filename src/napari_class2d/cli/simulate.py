"""Simulate a ground-truth particle data set (RELION 3.1 STAR + .mrcs, with the truth).

Writes OUT/particles.star (all particles), OUT/stacks/mic_NNNN.mrcs with one
OUT/stacks/mic_NNNN.star per stack, and the truth: OUT/truth.star (view,
junk kind, in-plane angle and shift of every particle), OUT/truth_views.mrcs
(clean projection of each view) and OUT/truth.json. With --stream-into DIR the
per-micrograph files are then copied into DIR at --rate particles per second,
each written under a temporary name and renamed when complete (.mrcs before
.star), as a live pre-processing pipeline would. See docs/simulation.md.
"""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--map",
        default=None,
        metavar="MAP",
        help="density map .mrc, or a built-in map: phantom (default), micelle (a membrane "
        "protein with a nanobody in a detergent micelle, ~100 Å; e.g. --box 96 --apix 1.3)",
    )
    parser.add_argument(
        "--micelle-fraction",
        type=float,
        default=0.4,
        metavar="F",
        help="--map micelle: detergent density / protein density (0.4)",
    )
    parser.add_argument(
        "--map-apix",
        type=float,
        default=None,
        metavar="A",
        help="voxel size of --map in Å when its header has none (0); default: assume --apix",
    )
    parser.add_argument("--n", type=int, default=6000, metavar="N", help="particles (6000)")
    parser.add_argument("--box", type=int, default=96, metavar="B", help="box, even px (96)")
    parser.add_argument("--apix", type=float, default=3.0, metavar="A", help="pixel size Å (3.0)")
    parser.add_argument(
        "--snr",
        type=float,
        default=0.03,
        metavar="S",
        help="signal variance in the particle disk / noise variance (0.03)",
    )
    parser.add_argument(
        "--junk", type=float, default=0.08, metavar="F", help="junk fraction (0.08)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (0)")
    parser.add_argument("--views", type=int, default=14, metavar="V", help="view directions (14)")
    parser.add_argument(
        "--rare-views", type=int, default=3, metavar="R", help="views holding 1 %% each (3)"
    )
    parser.add_argument(
        "--micrographs",
        type=int,
        default=None,
        metavar="M",
        help="number of .mrcs stacks (default: one per 100 particles)",
    )
    parser.add_argument(
        "--no-ctf", action="store_true", help="no CTF (negative stain); no CTF columns"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier simulation")
    parser.add_argument(
        "--stream-into",
        default=None,
        metavar="DIR",
        help="after simulating, feed the per-micrograph files into DIR over time",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=200.0,
        metavar="N",
        help="with --stream-into: particles per second (200)",
    )


def main(args: argparse.Namespace) -> int:
    import sys

    from napari_class2d.sim.simulate import simulate_dataset, stream_into

    try:
        result = simulate_dataset(
            args.out,
            map_path=args.map,
            n_particles=args.n,
            box=args.box,
            pixel_size_A=args.apix,
            snr=args.snr,
            junk_fraction=args.junk,
            n_views=args.views,
            rare_views=args.rare_views,
            seed=args.seed,
            n_micrographs=args.micrographs,
            map_pixel_size_A=args.map_apix,
            micelle_fraction=args.micelle_fraction,
            ctf=not args.no_ctf,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"napari-class2d simulate: error: {err}", file=sys.stderr)
        return 2
    truth = result.truth
    print(
        f"simulated {truth['n_particles']} particles ({truth['junk']['n_particles']} junk), "
        f"{truth['n_views']} views (rare: {truth['rare_views']}), box {truth['box']} px at "
        f"{truth['pixel_size_A']} Å, in {result.seconds:.1f} s"
    )
    print(f"particles:   {result.particles_star}")
    print(f"stacks:      {result.out_dir / 'stacks'} ({len(result.stack_files)} x .mrcs + .star)")
    print(f"truth:       {result.truth_star}")
    print(f"truth views: {result.truth_views}")
    print(f"summary:     {result.truth_json}")
    if args.stream_into:
        print(f"streaming into {args.stream_into} at {args.rate:g} particles/s ...", flush=True)
        try:
            written = stream_into(
                result.out_dir, args.stream_into, args.rate, overwrite=args.overwrite
            )
        except (ValueError, FileExistsError) as err:
            print(f"napari-class2d simulate: error: {err}", file=sys.stderr)
            return 2
        print(f"streamed {len(written)} micrographs into {args.stream_into}")
    return 0
