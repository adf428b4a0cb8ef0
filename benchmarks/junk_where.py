"""Where the junk of a scored job sits: per class, and how far a likelihood test could move it.

``quality.py`` reports how much of each kind of junk ends in classes that recover a
view. This script says where: for every class that recovers a view and holds junk
that is not an aggregate (empty boxes, blobs, edges), its size, its view, its share of
that view and how many particles of each junk kind it holds. It then asks whether a
per-particle outlier test could take that junk out: each particle's log-likelihood
contribution (``rlnLogLikeliContribution``) as a robust z-score within its class
(median and 1.4826 × median absolute deviation), and, for thresholds of -2 to -5, how
many true particles, non-aggregate junk and aggregates of the recovered classes fall
below it.

Usage::

    python benchmarks/junk_where.py OUT [OUT ...]

where ``OUT`` holds ``sim/``, ``class2d/run_data.star`` and ``quality.json`` (a folder
written by ``benchmarks/quality.py``). Writes ``OUT/junk_where.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import image_key, write_json

THRESHOLDS = (-2.0, -3.0, -4.0, -5.0)


def junk_where(out: Path) -> dict:
    """The per-class junk table and the likelihood test of one scored job in ``out``."""
    import pandas as pd
    import starfile

    quality = json.loads((out / "quality.json").read_text())
    score = quality.get("score", quality)
    truth = starfile.read(out / "sim" / "truth.star")
    data = starfile.read(out / "class2d" / "run_data.star", always_dict=True)["particles"]
    t = truth.set_index(image_key(truth.rlnImageName)).loc[image_key(data.rlnImageName)]
    df = pd.DataFrame(
        {
            "cls": data.rlnClassNumber.to_numpy(),
            "kind": t.sim_junk_kind.astype(str).to_numpy(),
            "view": t.sim_view.to_numpy(),
            "ll": data.rlnLogLikeliContribution.to_numpy(dtype=float),
        }
    )
    recovered = {c["class"]: c for c in score["per_class"] if c["recovers_views"]}
    in_rec = df.cls.isin(list(recovered))
    non_agg = ~df.kind.isin(["none", "aggregate"])
    view_sizes = {v["view"]: v["n_particles"] for v in score["per_view"]}
    classes = []
    for c, info in sorted(recovered.items()):
        here = df[df.cls == c]
        junk = here[here.kind != "none"].kind.value_counts().to_dict()
        if not sum(n for k, n in junk.items() if k != "aggregate"):
            continue
        view = info["recovers_views"][0]
        classes.append(
            {
                "class": c,
                "n_particles": int(len(here)),
                "view": view,
                "purity": round(info["majority_fraction"], 3),
                "share_of_view": round(
                    float(((here.kind == "none") & (here.view == view)).sum()) / view_sizes[view],
                    3,
                ),
                "junk": {k: int(n) for k, n in junk.items()},
            }
        )
    classes.sort(key=lambda c: -sum(n for k, n in c["junk"].items() if k != "aggregate"))
    # robust z-score of each particle's log-likelihood within its class
    g = df.groupby("cls").ll
    med = g.transform("median")
    mad = g.transform(lambda x: 1.4826 * (x - x.median()).abs().median())
    z = (df.ll - med) / mad.clip(lower=1e-9)
    test = []
    for th in THRESHOLDS:
        below = in_rec & (z < th)
        test.append(
            {
                "z_below": th,
                "true_particles": int((below & (df.kind == "none")).sum()),
                "non_aggregate_junk": int((below & non_agg).sum()),
                "aggregates": int((below & (df.kind == "aggregate")).sum()),
            }
        )
    return {
        "job": str(out),
        "non_aggregate_junk_in_recovered_classes": int((in_rec & non_agg).sum()),
        "non_aggregate_junk": int(non_agg.sum()),
        "aggregates_in_recovered_classes": int((in_rec & (df.kind == "aggregate")).sum()),
        "classes_with_non_aggregate_junk": classes,
        "likelihood_test": test,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="+", help="folders written by quality.py")
    args = ap.parse_args(argv)
    for out in args.out:
        result = junk_where(out)
        write_json(out / "junk_where.json", result)
        print(
            f"{out}: {result['non_aggregate_junk_in_recovered_classes']} of "
            f"{result['non_aggregate_junk']} non-aggregate junk particles in view classes"
        )
        for c in result["classes_with_non_aggregate_junk"][:5]:
            print(
                f"  class {c['class']:3d}  n={c['n_particles']:4d}  view {c['view']:2d} "
                f"(purity {c['purity']:.2f}, {c['share_of_view']:.0%} of the view)  {c['junk']}"
            )
        for row in result["likelihood_test"]:
            print(
                f"  z < {row['z_below']:+.0f}: {row['true_particles']} true particles, "
                f"{row['non_aggregate_junk']} non-aggregate junk, {row['aggregates']} aggregates"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
