"""Export the particles of chosen classes of a 2D classification result.

RESULT is a result folder (run_data.star + run_classes.mrcs + run_model.star,
or a RELION Class2D job folder: its last iteration is used) or a ``*_data.star``.

Choose the classes with ``--keep 1,4,7``, or let the ranking choose them with
``--auto`` (classes scoring at least ``--threshold``, plus the distinct views the
rare-view guard keeps; ``--keep``/``--reject`` then change its choice, and win).
``--auto`` prints one line per class (score, kept or not and why, lineage flags);
without ``--out`` it only prints.
"""

from __future__ import annotations

import argparse


def _class_list(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected 1-based class numbers separated by commas, e.g. 1,4,7"
        ) from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one class number")
    return out


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threshold {text!r}: expected a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--threshold {value}: must be between 0 and 1")
    return value


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("result", metavar="RESULT_DIR", help="result folder or *_data.star")
    parser.add_argument(
        "--keep", type=_class_list, default=None, help="classes to keep, 1-based: 1,4,7"
    )
    parser.add_argument(
        "--auto",
        action="store_true",
        help="keep the classes the ranking keeps (with the rare-view guard); "
        "--keep/--reject change its choice",
    )
    parser.add_argument(
        "--threshold",
        type=_threshold,
        default=None,
        metavar="T",
        help="with --auto: score (0-1) a class needs (default: the ranking's, 0.5)",
    )
    parser.add_argument(
        "--reject", type=_class_list, default=None, help="with --auto: classes to reject"
    )
    parser.add_argument(
        "--no-guard",
        action="store_true",
        help="with --auto: no rare-view guard (reject every class below the threshold)",
    )
    parser.add_argument(
        "--particle-diameter",
        type=float,
        default=None,
        metavar="A",
        help="with --auto: particle diameter in Å (default: the job's)",
    )
    parser.add_argument("--out", default=None, help="particle STAR file to write")
    parser.add_argument("--reject-out", default=None, help="also write the other particles here")
    parser.add_argument("--classes-out", default=None, help="also write the kept averages (.mrcs)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _print_ranking(result, auto) -> None:
    flags = auto.features.lineage_flag
    print(f"class ranking of {result.data_star} (threshold {auto.threshold:.2f}):")
    print(f"{'class':>5} {'particles':>9} {'res. Å':>7} {'score':>5}  decision")
    for c in range(result.n_classes):
        res = result.class_resolution_A[c]
        res_txt = f"{res:.1f}" if res < float("inf") else "–"
        line = (
            f"{c + 1:>5} {int(result.class_counts[c]):>9} {res_txt:>7} "
            f"{auto.score[c]:>5.2f}  {auto.reasons[c]}"
        )
        if flags and flags[c]:
            line += f"  [lineage: {flags[c]}]"
        print(line)


def main(args: argparse.Namespace) -> int:
    import sys

    import numpy as np

    from napari_class2d.ranking import DEFAULT_THRESHOLD, apply_user_choice, auto_select
    from napari_class2d.selection import export_selection, load_result

    if args.keep is None and not args.auto:
        print("napari-class2d select: error: give --keep CLASSES or --auto", file=sys.stderr)
        return 2
    if not args.auto and (args.reject or args.threshold is not None or args.no_guard):
        print(
            "napari-class2d select: error: --reject, --threshold and --no-guard go with --auto",
            file=sys.stderr,
        )
        return 2
    if args.out is None and not args.auto:
        print("napari-class2d select: error: --out is required", file=sys.stderr)
        return 2
    try:
        result = load_result(args.result)
        if args.auto:
            auto = auto_select(
                result,
                DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
                guard=not args.no_guard,
                particle_diameter_A=args.particle_diameter,
            )
            user = {k: True for k in args.keep or []} | {k: False for k in args.reject or []}
            for k in user:
                if not 1 <= k <= result.n_classes:
                    raise ValueError(f"class {k} out of range: classes are 1..{result.n_classes}")
            keep = np.nonzero(apply_user_choice(auto, user))[0] + 1
            _print_ranking(result, auto)
            if user:
                choice = ", ".join(f"{k}: {'keep' if v else 'reject'}" for k, v in user.items())
                print(f"your choice on top: {choice}")
        else:
            keep = np.asarray(args.keep)
        if args.out is None:
            listed = ", ".join(map(str, keep))
            print(f"auto-selected {len(keep)} of {result.n_classes} classes: {listed}")
            return 0
        if not len(keep):
            raise ValueError("no class is kept: nothing to write")
        empty = result.empty_classes(keep)
        n = export_selection(
            result,
            keep,
            args.out,
            rejected_out=args.reject_out,
            classes_out=args.classes_out,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as err:
        print(f"napari-class2d select: error: {err}", file=sys.stderr)
        return 2
    if len(empty):
        listed = ", ".join(map(str, empty))
        what = f"classes {listed} hold" if len(empty) > 1 else f"class {listed} holds"
        print(f"napari-class2d select: warning: {what} no particles", file=sys.stderr)
    kept = sorted(set(int(k) for k in keep))
    print(
        f"wrote {n} particles from {len(kept)} of {result.n_classes} classes "
        f"({', '.join(map(str, kept))}) to {args.out}"
    )
    if args.reject_out:
        print(f"wrote {result.n_particles - n} rejected particles to {args.reject_out}")
    if args.classes_out:
        print(f"wrote {len(kept)} class averages to {args.classes_out}")
    return 0
