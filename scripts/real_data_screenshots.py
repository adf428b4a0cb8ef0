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
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _settle(app, seconds: float = 0.5) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        app.processEvents()
        time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--result", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    from napari_class2d._qt.live_layers import tile_gallery

    viewer = napari.Viewer(show=True, title="napari-class2d")
    viewer.window._qt_window.resize(1600, 1000)
    app = QApplication.instance()

    def shot(name: str) -> None:
        _settle(app)
        path = args.out / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=False)
        print("wrote", path)

    dock, sel = viewer.window.add_plugin_dock_widget("napari-class2d", "Class Selection")
    viewer.window._qt_window.resizeDocks([dock], [640], Qt.Orientation.Horizontal)
    sel.columns.setValue(5)
    sel.load(args.result)
    sel.auto_select(blocking=True)
    kept = np.nonzero(sel.auto.keep)[0] + 1
    print("kept", kept.tolist())
    viewer.add_image(tile_gallery(sel.result.class_averages), name="class averages")
    viewer.reset_view()
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
