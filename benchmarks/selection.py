"""Selection benchmark: automatic class ranking and the rare-view guard against ground truth.

Takes finished quality-benchmark folders (``python benchmarks/quality.py --map M [--hard]
--out DIR`` writes ``DIR/sim`` with the truth and ``DIR/class2d`` with the result) and
asks, per set, what the auto-selection at the default threshold keeps:

- junk classes (at least half junk particles): precision and recall of their rejection;
- rare-view classes (classes that recover a rare view under the scoring rule of
  ``docs/simulation.md``, and classes whose majority is a rare view): how many are kept;
- the junk share of the kept particles, and the share of the non-junk particles kept;

against the best single threshold on the job's resolution (keep <= r) or particle count
(keep >= n), chosen with the truth: the threshold that keeps every rare-view class with the
lowest junk share, and the one that keeps at least as many non-junk particles as the
ranking with the lowest junk share.

Usage::

    python benchmarks/selection.py DIR [DIR ...] [--out OUT] [--threshold T]
        [--weights '{"bias": 2, ...}'] [--fit]

Writes ``OUT/selection.json`` (default ``bench_out/selection``) and each set's class
features (``OUT/<name>_features.csv``). ``--fit`` also fits the score's weights by
logistic regression on every set but one and reports each held-out set (leave one set out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import REPO, machine, write_json

from napari_class2d.ranking import (
    DEFAULT_THRESHOLD,
    DEFAULT_WEIGHTS,
    DISTINCT_VIEW_FACTOR,
    TERMS,
    ScoreWeights,
    class_features,
    decide,
    score_classes,
    score_terms,
)
from napari_class2d.selection import load_result
from napari_class2d.sim.score import score_classification


# -- truth per class ------------------------------------------------------------------------
def load_set(folder: Path) -> dict:
    """Result, truth per class and the job's particle diameter of one benchmark folder."""
    job = folder / "class2d"
    sim = folder / "sim"
    if not (job / "run_data.star").is_file() or not (sim / "truth.json").is_file():
        sys.exit(f"{folder}: expected class2d/run_data.star and sim/truth.json (quality.py --out)")
    quality = (
        json.loads((folder / "quality.json").read_text())
        if (folder / "quality.json").is_file()
        else {}
    )
    score = quality.get("score")
    if score is None or "per_class" not in score:
        score = score_classification(sim, job / "run_data.star", job / "run_classes.mrcs")
    truth = json.loads((sim / "truth.json").read_text())
    rare = set(truth.get("rare_views", []))
    per_class = pd.DataFrame(score["per_class"])
    n = per_class["n_particles"].to_numpy()
    junk_frac = per_class["junk_fraction"].fillna(0.0).to_numpy(float)
    majority = per_class["majority_label"].tolist()
    maj_frac = per_class["majority_fraction"].fillna(0.0).to_numpy(float)
    recovers_rare = np.array([any(v in rare for v in r) for r in per_class["recovers_views"]])
    majority_rare = np.array(
        [m in rare and f * c >= 10 for m, f, c in zip(majority, maj_frac, n, strict=True)]
    )
    diameter = quality.get("config", {}).get("particle_diameter_A")
    return {
        "name": folder.name,
        "folder": str(folder),
        "result": load_result(job),
        "count": n,
        "junk_particles": junk_frac * n,
        "junk_class": (junk_frac >= 0.5) & (n > 0),
        "rare_class": recovers_rare,
        "rare_majority_class": majority_rare,
        "diameter": diameter,
        "summary": quality.get("summary", {}),
    }


# -- metrics --------------------------------------------------------------------------------
def metrics(s: dict, keep: np.ndarray) -> dict:
    """What a selection ``keep`` (bool per class) keeps of set ``s``."""
    populated = s["count"] > 0
    rejected = ~keep & populated
    junk = s["junk_class"]
    n_kept = float(s["count"][keep].sum())
    junk_kept = float(s["junk_particles"][keep].sum())
    good = s["count"] - s["junk_particles"]
    tp = int((junk & rejected).sum())
    return {
        "kept_classes": int((keep & populated).sum()),
        "junk_classes": int(junk.sum()),
        "junk_precision": tp / rejected.sum() if rejected.sum() else float("nan"),
        "junk_recall": tp / junk.sum() if junk.sum() else float("nan"),
        "rare_classes": int(s["rare_class"].sum()),
        "rare_kept": int((s["rare_class"] & keep).sum()),
        "rare_majority_classes": int(s["rare_majority_class"].sum()),
        "rare_majority_kept": int((s["rare_majority_class"] & keep).sum()),
        "junk_share_kept": junk_kept / n_kept if n_kept else float("nan"),
        "good_kept": float(good[keep].sum() / max(good.sum(), 1e-9)),
        "particles_kept": int(n_kept),
    }


def best_single_thresholds(s: dict, good_to_match: float) -> dict:
    """Per metric (resolution, count): the truth-chosen best single threshold."""
    res = s["result"].class_resolution_A
    out = {}
    for name, values, side in (("resolution", res, "below"), ("count", s["count"], "above")):
        candidates = np.unique(values[np.isfinite(values)])
        rows = []
        for t in candidates:
            keep = (values <= t) if side == "below" else (values >= t)
            keep &= np.isfinite(values) & (s["count"] > 0)
            rows.append((float(t), metrics(s, keep)))

        all_rare = int(s["rare_class"].sum())
        out[name] = {
            "keeps_every_rare_class": _pick(rows, lambda m, n=all_rare: m["rare_kept"] == n)
            if all_rare
            else None,
            "same_good_yield": _pick(rows, lambda m, g=good_to_match: m["good_kept"] >= g - 1e-9),
            "best_junk_f1": max(
                ({"threshold": t, **m} for t, m in rows),
                key=lambda m: _f1(m["junk_precision"], m["junk_recall"]),
            )
            if rows
            else None,
        }
    return out


def _pick(rows: list, ok) -> dict | None:
    """The lowest junk share (then the most non-junk particles) among rows that are ``ok``."""
    chosen = [r for r in rows if ok(r[1])]
    if not chosen:
        return None
    t, m = min(chosen, key=lambda r: (r[1]["junk_share_kept"], -r[1]["good_kept"]))
    return {"threshold": t, **m}


def _f1(p: float, r: float) -> float:
    if not (p > 0 and r > 0):
        return 0.0
    return 2 * p * r / (p + r)


# -- fitting (leave one set out) ----------------------------------------------------------
def fit_weights(sets: list[dict], l2: float = 1.0) -> ScoreWeights:
    """Logistic regression of "not a junk class" on the score's terms, particle-weighted
    classes of every set in ``sets`` (Newton iterations, L2 penalty ``l2``)."""
    xs, ys, ws = [], [], []
    for s in sets:
        t = score_terms(s["features"])
        populated = (s["count"] > 0) & ~s["features"].blank
        xs.append(np.stack([t[n] for n in TERMS], 1)[populated])
        ys.append((~s["junk_class"])[populated].astype(float))
        # every class counts, the larger ones a bit more (log of the count)
        ws.append(np.log2(1 + s["count"][populated]))
    x = np.concatenate(xs)
    x = np.concatenate([np.ones((len(x), 1)), x], 1)
    y, w = np.concatenate(ys), np.concatenate(ws)
    beta = np.zeros(x.shape[1])
    for _ in range(50):
        p = 1 / (1 + np.exp(-x @ beta))
        grad = x.T @ (w * (y - p)) - l2 * np.r_[0, beta[1:]]
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + l2 * np.diag(np.r_[0, np.ones(len(TERMS))])
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.abs(step).max() < 1e-8:
            break
    return ScoreWeights(
        bias=float(beta[0]), **{n: float(b) for n, b in zip(TERMS, beta[1:], strict=True)}
    )


def evaluate(s: dict, weights: ScoreWeights, threshold: float) -> dict:
    f = s["features"]
    score = score_classes(f, weights)
    quality = score_classes(f, weights, with_count=False)
    auto = decide(f, score, quality, threshold, f.similarity_matrix, guard=True)
    plain = decide(f, score, quality, threshold, f.similarity_matrix, guard=False)
    m = metrics(s, auto.keep)
    m["guarded"] = [int(c) + 1 for c in np.nonzero(auto.guarded)[0]]
    m["guarded_rare"] = int((auto.guarded & s["rare_class"]).sum())
    m["guarded_junk"] = int((auto.guarded & s["junk_class"]).sum())
    m["without_guard"] = metrics(s, plain.keep)
    m["rejected_rare"] = [int(c) + 1 for c in np.nonzero(s["rare_class"] & ~auto.keep)[0]]
    m["kept_junk"] = [int(c) + 1 for c in np.nonzero(s["junk_class"] & auto.keep)[0]]
    m["sweep"] = {
        f"{t:.2f}": metrics(s, decide(f, score, quality, t, f.similarity_matrix, guard=True).keep)
        for t in np.round(np.arange(0.1, 0.95, 0.1), 2)
    }
    m["per_class"] = [
        {
            "class": k + 1,
            "score": float(score[k]),
            "quality": float(quality[k]),
            "kept": bool(auto.keep[k]),
            "guarded": bool(auto.guarded[k]),
            "closest_kept": None
            if not np.isfinite(auto.closest_kept[k])
            else float(auto.closest_kept[k]),
            "junk_class": bool(s["junk_class"][k]),
            "rare_class": bool(s["rare_class"][k]),
            "reason": auto.reasons[k],
        }
        for k in range(f.n_classes)
    ]
    return m


def _fmt(x, pct=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f} %" if pct else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="quality.py output folders")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "selection")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    ap.add_argument("--weights", default=None, help="JSON object of ScoreWeights fields")
    ap.add_argument("--fit", action="store_true", help="leave-one-set-out logistic fit")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    weights = DEFAULT_WEIGHTS
    if args.weights:
        weights = dataclasses.replace(DEFAULT_WEIGHTS, **json.loads(args.weights))

    sets = []
    for folder in args.folders:
        t0 = time.perf_counter()
        s = load_set(folder)
        s["features"] = class_features(s["result"], particle_diameter_A=s["diameter"])
        s["feature_seconds"] = time.perf_counter() - t0
        table = s["features"].table()
        table["junk_fraction"] = s["junk_particles"] / np.maximum(s["count"], 1)
        table["junk_class"] = s["junk_class"]
        table["rare_class"] = s["rare_class"]
        table["rare_majority_class"] = s["rare_majority_class"]
        for name, values in score_terms(s["features"]).items():
            table[f"term_{name}"] = values
        table.to_csv(args.out / f"{s['name']}_features.csv", index=False)
        sets.append(s)
        print(f"{s['name']}: features in {s['feature_seconds']:.1f} s", flush=True)

    report = {
        "threshold": args.threshold,
        "distinct_view_factor": DISTINCT_VIEW_FACTOR,
        "weights": dataclasses.asdict(weights),
        "machine": machine(),
        "sets": {},
    }
    for s in sets:
        m = evaluate(s, weights, args.threshold)
        m["best_single_threshold"] = best_single_thresholds(s, m["good_kept"])
        # the best any class-level selection does: every class that is not mostly junk
        m["every_non_junk_class"] = metrics(s, ~s["junk_class"] & (s["count"] > 0))
        m["classification_summary"] = s["summary"]
        m["folder"] = s["folder"]
        report["sets"][s["name"]] = m
    if args.fit:
        report["leave_one_out"] = {}
        for i, s in enumerate(sets):
            w = fit_weights([o for j, o in enumerate(sets) if j != i])
            m = evaluate(s, w, args.threshold)
            m["weights"] = dataclasses.asdict(w)
            report["leave_one_out"][s["name"]] = m
        report["fit_all"] = dataclasses.asdict(fit_weights(sets))

    print()
    head = (
        f"{'set':<22} {'junk P':>6} {'junk R':>6} {'rare kept':>9} {'junk share':>10} "
        f"{'good kept':>9} | {'best res. (rare kept)':>24} | {'best count (rare kept)':>24}"
    )
    print(head)
    for name, m in report["sets"].items():
        b = m["best_single_threshold"]

        def cell(entry, sign="≤"):
            if entry is None:
                return "–"
            share, good = _fmt(entry["junk_share_kept"], True), _fmt(entry["good_kept"], True)
            return f"{sign}{entry['threshold']:.0f}: {share}, {good}"

        def cell_n(entry):
            return cell(entry, "≥")

        rare = f"{m['rare_kept']}/{m['rare_classes']}"
        print(
            f"{name:<22} {_fmt(m['junk_precision']):>6} {_fmt(m['junk_recall']):>6} {rare:>9} "
            f"{_fmt(m['junk_share_kept'], True):>10} {_fmt(m['good_kept'], True):>9} | "
            f"{cell(b['resolution']['keeps_every_rare_class']):>24} | "
            f"{cell_n(b['count']['keeps_every_rare_class']):>24}"
        )
        print(
            f"{'':<22} same good yield: resolution "
            f"{cell(b['resolution']['same_good_yield'])}, "
            f"count {cell_n(b['count']['same_good_yield'])}; "
            f"guarded {m['guarded']} (rare {m['guarded_rare']}, junk {m['guarded_junk']}); "
            f"rare rejected {m['rejected_rare']}; junk kept {m['kept_junk']}; "
            f"rare-majority classes kept {m['rare_majority_kept']}/{m['rare_majority_classes']}; "
            f"every non-junk class: {_fmt(m['every_non_junk_class']['junk_share_kept'], True)}"
        )
    if args.fit:
        print("\nleave one set out (weights fitted on the others):")
        for name, m in report["leave_one_out"].items():
            print(
                f"  {name:<22} junk P {_fmt(m['junk_precision'])} R {_fmt(m['junk_recall'])} "
                f"rare {m['rare_kept']}/{m['rare_classes']} junk share "
                f"{_fmt(m['junk_share_kept'], True)} good kept {_fmt(m['good_kept'], True)}"
            )
        print("  fitted on all sets:", report["fit_all"])
    write_json(args.out / "selection.json", report)
    print(f"\nwrote {args.out / 'selection.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
