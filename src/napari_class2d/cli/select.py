"""Export the particles of chosen classes of a 2D classification result.

RESULT is a result folder (run_data.star + run_classes.mrcs + run_model.star,
or a RELION Class2D job folder: its last iteration is used) or a ``*_data.star``.
"""

from __future__ import annotations

import argparse


def _class_list(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--keep {text!r}: expected 1-based class numbers separated by commas, e.g. 1,4,7"
        ) from None
    if not out:
        raise argparse.ArgumentTypeError("--keep: give at least one class number")
    return out


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("result", metavar="RESULT_DIR", help="result folder or *_data.star")
    parser.add_argument(
        "--keep", required=True, type=_class_list, help="classes to keep, 1-based: 1,4,7"
    )
    parser.add_argument("--out", required=True, help="particle STAR file to write")
    parser.add_argument("--reject-out", default=None, help="also write the other particles here")
    parser.add_argument("--classes-out", default=None, help="also write the kept averages (.mrcs)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def main(args: argparse.Namespace) -> int:
    import sys

    from napari_class2d.selection import export_selection, load_result

    try:
        result = load_result(args.result)
        empty = result.empty_classes(args.keep)
        n = export_selection(
            result,
            args.keep,
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
    kept = sorted(set(args.keep))
    print(
        f"wrote {n} particles from {len(kept)} of {result.n_classes} classes "
        f"({', '.join(map(str, kept))}) to {args.out}"
    )
    if args.reject_out:
        print(f"wrote {result.n_particles - n} rejected particles to {args.reject_out}")
    if args.classes_out:
        print(f"wrote {len(kept)} class averages to {args.classes_out}")
    return 0
