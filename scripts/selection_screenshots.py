"""Screenshots of the selection features of docs/user_guide.md (issue 14), from a real
napari window.

Run (needs a display; on a headless machine use Xvfb)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/selection_screenshots.py \\
        --result bench_out/quality_micelle/class2d \\
        [--micrograph-result BETAGAL_JOB --micrographs MICROGRAPH_FOLDER]

``--result``: a finished job (with its lineage record, e.g. from
``benchmarks/quality.py``); ``--micrograph-result``: a job whose particles' micrographs
are in ``--micrographs`` (e.g. the β-gal tutorial particles extracted with
``../shared/tools/extract_particles.py``). Saves ``docs/images/07_auto_selection.png``,
``08_threshold_moved.png``, ``09_class_particles.png``, ``10_class_lineage.png`` and,
with a micrograph result, ``11_particles_on_micrograph.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _settle(app, seconds=0.5):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        app.processEvents()
        time.sleep(0.02)


def open_selection(result: Path, out: Path):
    """A napari window with the Class Selection widget on ``result``, auto-selected, and
    every average tiled in the canvas as the job widget shows them.

    Returns ``(viewer, app, widget, shot)``; ``shot(name)`` saves ``out/name.png``.
    """
    import napari
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    from napari_class2d._qt.live_layers import tile_gallery

    viewer = napari.Viewer(show=True, title="napari-class2d")
    viewer.window._qt_window.resize(1600, 1000)
    app = QApplication.instance()

    def shot(name):
        _settle(app)
        path = out / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=False)
        print("wrote", path)

    dock, sel = viewer.window.add_plugin_dock_widget("napari-class2d", "Class Selection")
    viewer.window._qt_window.resizeDocks([dock], [640], Qt.Orientation.Horizontal)
    sel.columns.setValue(5)
    sel.load(result)
    sel.auto_select(blocking=True)
    viewer.add_image(tile_gallery(sel.result.class_averages), name="class averages")
    viewer.reset_view()
    return viewer, app, sel, shot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--result", required=True, type=Path)
    parser.add_argument("--micrograph-result", type=Path, default=None)
    parser.add_argument("--micrographs", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    viewer, app, sel, shot = open_selection(args.result, args.out)
    guarded = np.nonzero(sel.auto.guarded)[0] + 1
    flagged = [k + 1 for k, f in enumerate(sel.auto.features.lineage_warning) if f]
    print("guarded", guarded.tolist(), "flagged", flagged)
    focus = int(guarded[0]) if len(guarded) else 1
    sel.scroll.ensureWidgetVisible(sel.tiles[focus])
    _settle(app)
    viewer.reset_view()
    shot("07_auto_selection")

    sel.set_auto_threshold(0.8)
    sel.scroll.ensureWidgetVisible(sel.tiles[focus])
    shot("08_threshold_moved")
    sel.set_auto_threshold(0.5)

    # a class's particles: the best-scoring big class, and the guarded one's lineage
    best = int(np.argmax(sel.auto.score * (sel.result.class_counts > 0))) + 1
    viewer.layers["class averages"].visible = False
    sel.open_particles(best)
    shot("09_class_particles")
    lineage_class = flagged[0] if flagged else focus
    if sel.lineage_plot is not None:
        sel.lineage_plot.show_class(lineage_class)
        sel.lineage_plot.parent().raise_()
    sel.open_particles(focus)
    if sel.lineage_plot is not None:
        sel.lineage_plot.show_class(lineage_class)
    shot("10_class_lineage")

    if args.micrograph_result is not None:
        sel.load(args.micrograph_result)
        if args.micrographs is not None:
            sel.set_micrograph_dir(args.micrographs)
        counts = sel.result.class_counts
        sel.open_particles(int(np.argmax(counts)) + 1)
        sel.set_micrograph_dir(args.micrographs)
        sel.show_micrograph(0)
        shot("11_particles_on_micrograph")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
