"""Screenshots for docs/user_guide.md, taken from a real napari window.

Run (needs a display; on a headless machine use Xvfb)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py

Steps: simulate and open particles, run a small batch job, watch the classes
with the mask, keep some classes in the Class Selection widget, export.
Each step saves ``docs/images/<step>.png`` (whole window, widgets included).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _wait(app, condition, timeout_s=600.0):
    t0 = time.perf_counter()
    while not condition():
        app.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError("step did not finish in time")


def _settle(app, seconds=0.5):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        app.processEvents()
        time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "images"))
    parser.add_argument("--n-particles", type=int, default=1500)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_class2d._qt import live_layers
    from napari_class2d.sim.simulate import simulate_dataset

    work = Path(tempfile.mkdtemp(prefix="napari-class2d-shots-"))
    sim = simulate_dataset(work / "sim", n_particles=args.n_particles, box=64, seed=3)

    viewer = napari.Viewer(show=True, title="napari-class2d")
    viewer.window._qt_window.resize(1600, 1000)  # fixed size for reproducible shots
    app = QApplication.instance()

    def shot(name):
        _settle(app)
        path = out / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=False)
        print("wrote", path)

    # 1. open particles
    (layer,) = viewer.open(str(sim.particles_star), plugin="napari-class2d")
    viewer.reset_view()
    _, job = viewer.window.add_plugin_dock_widget("napari-class2d", "2D Classification")
    job.set_input(layer.name)
    job.output_dir.value = work / "job"
    for key, value in {
        "n_classes": 12,
        "max_res_A": "8",
        "n_online_em_iterations": 8,
        "batch_size_per_class": 20,
        "n_final_full_iterations": 1,
    }.items():
        job.form.fields[key].value = value
    shot("01_open_particles")

    # 2. run, 3. watch: the gallery with labels and the mask
    run = job.start()
    _wait(app, lambda: len(run.snapshots) >= 3)
    layer.visible = False
    viewer.reset_view()
    shot("02_job_running")
    _wait(app, lambda: not job.running)
    viewer.reset_view()
    shot("03_classes_with_mask")
    # zoom on the stack of averages with the mask circles over it
    d = viewer.layers[live_layers.AVERAGES].data.shape[-1]
    viewer.layers[live_layers.GALLERY].visible = False
    viewer.layers[live_layers.GALLERY_MASK].visible = False
    viewer.layers[live_layers.LABELS].visible = False
    viewer.scene.camera.center = (d / 2, -d / 2 - 4 * live_layers.GAP)
    viewer.scene.camera.zoom = 8.0
    shot("04_mask_over_average")
    for name in (live_layers.GALLERY, live_layers.GALLERY_MASK, live_layers.LABELS):
        viewer.layers[name].visible = True
    viewer.reset_view()

    # 4. selection: keep the best-resolved, well-populated classes
    sel = job.open_selection()
    for name in ("2D Classification (napari-class2d)", "Class statistics", "Class lineage"):
        viewer.window.dock_widgets[name].parent().hide()  # room for the gallery
    res = sel.result
    good = np.nonzero(
        (res.class_counts >= np.median(res.class_counts))
        & (res.class_resolution_A <= np.median(res.class_resolution_A))
    )[0]
    sel.set_kept(good + 1, True, exclusive=True)
    sel.sort_by.setCurrentText("particles")
    shot("05_class_selection")

    # 5. export
    n = sel.export(work / "selected_particles.star")
    print(f"exported {n} particles to {work / 'selected_particles.star'}")
    shot("06_exported")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
