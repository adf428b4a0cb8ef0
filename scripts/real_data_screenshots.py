"""Screenshots of the real-data walkthrough of docs/user_guide.md (issue 12), from a real
napari window: the class averages of a finished job on real particles, auto-selected in
the Class Selection widget, and the particles of its largest kept class.

Run (needs a display; on a headless machine use Xvfb)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/real_data_screenshots.py \\
        --result bench_out/real_betagal/class2d

``--result``: a finished job (e.g. the one ``benchmarks/real_betagal.py`` runs on the
β-galactosidase tutorial particles). Saves ``docs/images/12_real_classes.png`` and
``13_real_class_particles.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--result", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from selection_screenshots import open_selection

    viewer, _, sel, shot = open_selection(args.result, args.out)
    kept = np.nonzero(sel.auto.keep)[0] + 1
    print("kept", kept.tolist())
    shot("12_real_classes")

    counts = sel.result.class_counts
    if len(kept):
        largest_kept = int(kept[np.argmax(counts[kept - 1])])
    else:
        largest_kept = int(np.argmax(counts)) + 1
    viewer.layers["class averages"].visible = False
    sel.open_particles(largest_kept)
    shot("13_real_class_particles")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
