"""Picture of a quality-benchmark run: each view's clean projection next to its class average.

Reads a folder written by ``benchmarks/quality.py`` (``quality.json``, ``sim/`` and
``class2d/run_classes.mrcs``) and writes a PNG with one column per view: the clean
projection on top, put in the pose that best matches the class (the scorer's
rotation and shift), and the class average below it. A recovered view shows the class
that recovers it; a missed view shows its best-matching class, labelled "missed".
Usage::

    python benchmarks/montage.py OUT [--png docs/images/classes_vs_views.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _show(ax, img) -> None:
    """Grey-scale image, contrast from its 1st to 99.5th percentile."""
    import numpy as np

    lo, hi = np.percentile(img, [1.0, 99.5])
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1e-6)


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mrcfile
    import numpy as np
    import torch

    from napari_class2d.sim.score import _resample_views
    from napari_class2d.sim.transforms import rotate_and_shift

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder written by benchmarks/quality.py")
    ap.add_argument("--png", type=Path, help="default: OUT/classes_vs_views.png")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)

    result = json.loads((args.out / "quality.json").read_text())
    sim = Path(result["simulation"]["dir"])
    info = json.loads((sim / "truth.json").read_text())
    views = torch.as_tensor(mrcfile.read(sim / "truth_views.mrcs").astype(np.float32))
    with mrcfile.open(args.out / "class2d" / "run_classes.mrcs", permissive=True) as mrc:
        classes = np.asarray(mrc.data, dtype=np.float32)
        apix = float(mrc.voxel_size.x)
    cbox = classes.shape[-1]
    views = _resample_views(views, float(info["pixel_size_A"]), cbox, apix)

    per_view = result["score"]["per_view"]
    ncol = min(7, len(per_view))
    nblock = -(-len(per_view) // ncol)
    fig, axes = plt.subplots(2 * nblock, ncol, figsize=(1.45 * ncol, 3.1 * nblock + 0.4))
    axes = np.asarray(axes).reshape(2 * nblock, ncol)
    pairs = [
        (axes[2 * (i // ncol), i % ncol], axes[2 * (i // ncol) + 1, i % ncol])
        for i in range(len(per_view))
    ]
    for i in range(len(per_view), nblock * ncol):  # empty cells of the last block
        axes[2 * (i // ncol), i % ncol].axis("off")
        axes[2 * (i // ncol) + 1, i % ncol].axis("off")
    for pv, (top, bottom) in zip(per_view, pairs, strict=True):
        c = pv["class"] if pv["recovered"] else pv["best_matching_class"]
        key = "align" if pv["recovered"] else "best_matching"
        psi, shift = pv[f"{key}_psi_deg"], pv[f"{key}_shift_A"]
        posed = rotate_and_shift(
            views[pv["view"] : pv["view"] + 1],
            torch.tensor([float(psi)]),
            torch.tensor([shift], dtype=torch.float32),
            apix,
        )[0].numpy()
        _show(top, posed)
        _show(bottom, classes[c - 1])
        res = pv["resolution_A"] if pv["recovered"] else pv["best_matching_resolution_A"]
        top.set_title(f"view {pv['view']}\n{pv['kind']}", fontsize=7)
        state = "" if pv["recovered"] else "missed\n"
        bottom.set_title(f"{state}class {c}, {res:.0f} Å", fontsize=7)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    s = result["summary"]
    title = args.title or (
        f"{result['map']}{' (hard)' if result.get('hard') else ''}: "
        f"{s['views_recovered']} views, {s['rare_views_recovered']} rare, "
        f"purity {s['purity']:.3f}  (top: clean projection, bottom: class average)"
    )
    fig.suptitle(title.replace("  (", "\n("), fontsize=9)
    fig.tight_layout()
    png = args.png or args.out / "classes_vs_views.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.name + ".part.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(png)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
