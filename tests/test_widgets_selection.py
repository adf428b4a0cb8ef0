"""Class Selection widget and the job widgets' forms in a real napari viewer (Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
import starfile

from _selection_data import make_result
from napari_class2d._qt.config_form import ConfigForm, attribute_docs
from napari_class2d._qt.job_widget import Class2DJobWidget
from napari_class2d._qt.selection_widget import ClassSelectionWidget
from napari_class2d.engine.config import Class2DConfig

pytestmark = pytest.mark.gui


def _dock(viewer, name):
    _, widget = viewer.window.add_plugin_dock_widget("napari-class2d", name)
    return widget


def test_all_widgets_open_from_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    assert isinstance(_dock(viewer, "2D Classification"), Class2DJobWidget)
    stream = _dock(viewer, "Streaming 2D Classification")
    assert isinstance(stream, Class2DJobWidget) and stream.finish_button is not None
    assert isinstance(_dock(viewer, "Class Selection"), ClassSelectionWidget)


def test_docstring_gives_every_field_a_tooltip():
    docs = attribute_docs()
    names = {n for n in Class2DConfig.__dataclass_fields__ if n != "extra"}
    assert names <= set(docs)
    assert (
        "Å" in docs["max_res_A"] and docs["mask_outer_diameter_A"] == docs["mask_inner_diameter_A"]
    )


def test_form_is_built_from_config_and_refuses_bad_values(qtbot):
    form = ConfigForm(streaming=False)
    qtbot.addWidget(form)
    names = {n for n in Class2DConfig.__dataclass_fields__ if n != "extra"}
    streaming_only = {
        "start_after_n_particles",
        "full_iteration_every_n_new",
        "stream_mode",
        "full_pass_every_n_updates",
    }
    assert set(form.fields) == names - streaming_only
    assert form.config() == Class2DConfig()  # defaults round-trip
    assert "Number of 2D classes" in form.fields["n_classes"].tooltip
    assert {w.name for w in form.common} >= {"n_classes", "max_res_A", "seed", "device"}
    assert "icuf" in {w.name for w in form.advanced}
    cfg = Class2DConfig(n_classes=7, particle_diameter_A=150.0, ctf_correction="flip")
    form.set_config(cfg)
    assert form.config() == cfg
    stream_form = ConfigForm(streaming=True)
    qtbot.addWidget(stream_form)
    assert set(stream_form.fields) == names


def test_job_widget_shows_reason_and_disables_start(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    w = _dock(viewer, "2D Classification")
    assert not w.start_button.isEnabled()
    assert "particle" in w.error_label.text()
    stack = tmp_path / "p.mrcs"
    import mrcfile

    with mrcfile.new(stack) as mrc:
        mrc.set_data(np.zeros((4, 16, 16), np.float32))
    w.set_input(str(stack))
    w.output_dir.value = tmp_path / "out"
    assert w.start_button.isEnabled(), w.error_label.text()
    w.form.fields["n_classes"].value = 0
    assert not w.start_button.isEnabled()
    assert w.error_label.text().startswith("n_classes=0: must be >= 1")
    w.form.fields["n_classes"].value = 3
    w.form.fields["particle_diameter_A"].value = "abc"
    assert "particle_diameter_A='abc': must be a number" in w.error_label.text()
    w.form.fields["particle_diameter_A"].value = ""
    w.form.fields["mask_inner_diameter_A"].value = "200"
    w.form.fields["mask_outer_diameter_A"].value = "100"
    assert "mask_outer_diameter_A" in w.error_label.text()
    assert not w.start_button.isEnabled()
    assert not w.resume_button.isEnabled()  # no checkpoint in the output folder


def test_selection_widget_select_sort_export(make_napari_viewer, tmp_path):
    truth = make_result(tmp_path / "res", n_particles=90, n_classes=6)
    viewer = make_napari_viewer()
    w = _dock(viewer, "Class Selection")
    w.load(tmp_path / "res")
    assert len(w.tiles) == 6 and w.kept.all()
    assert "90 of 90 particles" in w.summary.text()
    # click class 2 and 5 -> rejected (red), summary follows
    from napari_class2d._qt.selection_widget import REJECT_COLOR

    click(w.tiles[2])  # a real mouse click on the tile
    w.toggle(5)
    assert w.kept_classes().tolist() == [1, 3, 4, 6]
    assert REJECT_COLOR in w.tiles[2].styleSheet()
    n_kept = int(np.isin(truth["classes"], [1, 3, 4, 6]).sum())
    assert f"Kept 4 of 6 classes: {n_kept} of 90" in w.summary.text()
    w.invert()
    assert w.kept_classes().tolist() == [2, 5]
    # threshold: resolution 8, 10.4, 12.8, ... Å; keep <= 11 Å
    w.metric.setCurrentText("resolution (Å)")
    w.threshold.setValue(11.0)
    w.keep_by_threshold("below")
    assert w.kept_classes().tolist() == [1, 2]
    # sort by particle count: the grid order follows
    w.sort_by.setCurrentText("particles")
    counts = np.bincount(truth["classes"] - 1)
    first = w.grid.itemAtPosition(0, 0).widget().class_number
    assert counts[first - 1] == counts.max()
    click(w.tiles[6])
    assert w.kept_classes().tolist() == [1, 2, 6]
    n = w.export(tmp_path / "subset.star")
    back = starfile.read(tmp_path / "subset.star")["particles"]
    assert n == len(back) == int(np.isin(truth["classes"], [1, 2, 6]).sum())
    assert set(back["rlnClassNumber"]) == {1, 2, 6}
    assert (tmp_path / "subset_classes.mrcs").is_file()


def click(widget):
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    QTest.mouseClick(widget, Qt.MouseButton.LeftButton)


def test_sample_data_opens_simulated_particles(make_napari_viewer):
    from napari_class2d._reader import META_PARTICLES

    viewer = make_napari_viewer()
    (layer,) = viewer.open_sample("napari-class2d", "simulated_particles")
    particles = layer.metadata[META_PARTICLES]
    assert layer.data.shape == (particles.n_particles, particles.box, particles.box)
    assert particles.n_particles == 600 and particles.source_path.is_file()
    # the job widget offers the sample as input
    w = _dock(viewer, "2D Classification")
    assert layer.name in w.layer_choice.choices


def test_both_front_ends_offer_every_option(make_napari_viewer, tmp_path):
    """The streaming widget sets what `napari-class2d stream` sets (pixel size, project
    folder, poll / stable / broken-after seconds, finish after idle), from the same
    dataclasses as the command's flags."""
    import dataclasses

    from napari_class2d.cli import build_parser
    from napari_class2d.run.spec import SourceOptions, StreamOptions

    viewer = make_napari_viewer()
    w = _dock(viewer, "Streaming 2D Classification")
    stream_parser = build_parser()._subparsers._group_actions[0].choices["stream"]
    flags = {a.dest for a in stream_parser._actions}
    for cls, form in (
        (Class2DConfig, w.form),
        (SourceOptions, w.source_form),
        (StreamOptions, w.stream_form),
    ):
        names = {f.name for f in dataclasses.fields(cls)}
        assert names == set(form.fields), cls
        assert names <= flags, names - flags
    w.set_input(str(tmp_path))
    w.output_dir.value = tmp_path / "out"
    w.source_form.fields["pixel_size_A"].value = "1.25"
    w.source_form.fields["project_dir"].value = tmp_path
    w.stream_form.fields["poll_seconds"].value = 0.5
    w.stream_form.fields["stable_seconds"].value = 3.0
    w.stream_form.fields["finish_after_idle_seconds"].value = "600"
    spec = w.spec()
    assert spec.source == SourceOptions(1.25, str(tmp_path))
    assert spec.stream == StreamOptions(0.5, 3.0, 60.0, 600.0)
    assert spec.streaming and spec.out_path == tmp_path / "out"
    batch = _dock(viewer, "2D Classification")
    assert set(batch.source_form.fields) == {"pixel_size_A", "project_dir"}
    assert batch.stream_form is None


# -- ranking, rare-view guard, a class's particles, lineage (issue 14) ----------------------
@pytest.fixture(scope="module")
def ranked_folder(tmp_path_factory):
    from _selection_data import make_ranked_result

    folder = tmp_path_factory.mktemp("ranked")
    return folder, make_ranked_result(folder)


def _border(tile) -> str:
    return tile.styleSheet().split("solid")[1].split(";")[0].strip()


def test_auto_select_threshold_guard_and_clicks(make_napari_viewer, qtbot, ranked_folder):
    from napari_class2d._qt.selection_widget import GUARD_COLOR, KEEP_COLOR
    from napari_class2d.ranking import GUARD_MARK

    folder, truth = ranked_folder
    viewer = make_napari_viewer()
    w = _dock(viewer, "Class Selection")
    w.load(folder)
    # the gallery shows the job's lineage warning under the emptied class
    assert "⚠ emptied it 6 → 1" in w.tiles[truth["empty"]].mark.text()
    # Auto-select (in a worker thread, as the button does)
    w.auto_button.click()
    qtbot.waitUntil(lambda: w.auto is not None, timeout=60000)
    assert w.kept_classes().tolist() == [1, 2, 3, 4, 5, 6]
    rare = w.tiles[truth["rare"]]
    assert _border(rare) == GUARD_COLOR and GUARD_MARK in rare.mark.text()
    assert _border(w.tiles[1]) == KEEP_COLOR and not w.tiles[7].kept
    assert "Ranking keeps 6 of 9 classes at 0.50, 1 of them by the rare-view guard" in (
        w.auto_label.text()
    )
    # the threshold moves, the kept classes follow at once
    w.auto_slider.setValue(95)
    strict = w.kept_classes().tolist()
    assert set(strict) < {1, 2, 3, 4, 5, 6} and truth["rare"] in strict
    assert w.auto_threshold_label.text() == "0.95"
    assert [k for k, t in w.tiles.items() if t.kept] == strict
    # a click wins over the ranking, whatever the threshold
    click(w.tiles[7])
    assert 7 in w.kept_classes()
    w.auto_slider.setValue(50)
    assert w.kept_classes().tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert "your choice: keep" in w.tiles[7].toolTip()
    w.reset_button.click()
    assert w.kept_classes().tolist() == [1, 2, 3, 4, 5, 6]
    # sort by score: the best class first, the empty class last
    w.sort_by.setCurrentText("score")
    assert w.grid.itemAtPosition(0, 0).widget().class_number != truth["empty"]
    assert w.order()[-1] == truth["empty"]
    n = w.export(folder / "auto_selected.star", overwrite=True)
    back = starfile.read(folder / "auto_selected.star")["particles"]
    assert n == len(back) and set(back["rlnClassNumber"]) == {1, 2, 3, 4, 5, 6}


def test_double_click_opens_a_class_particles_and_micrograph(
    make_napari_viewer, qtbot, ranked_folder
):
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    from napari_class2d._qt import particles_view as pv
    from napari_class2d._qt.selection_widget import LINEAGE_DOCK

    folder, truth = ranked_folder
    viewer = make_napari_viewer()
    w = _dock(viewer, "Class Selection")
    w.load(folder)
    QTest.mouseDClick(w.tiles[3], Qt.MouseButton.LeftButton)
    assert w.kept[2]  # a double-click does not change keep / reject
    layer = viewer.layers[pv.PARTICLES]
    n3 = int(truth["counts"][2])
    assert layer.metadata["class"] == 3 and layer.metadata["n_particles"] == n3
    assert layer.data.shape[0] == -(-n3 // 48)  # pages of 48, read when looked at
    page = np.asarray(layer.data[0])
    assert page.shape == layer.data.shape[1:] and np.isfinite(page).all()
    assert "Class 3: 100 particles" in w.particles_label.text()
    # its micrographs, and the particles on one of them
    assert w.micrograph_choice.count() == 2
    assert w.show_micrograph(0)
    points = viewer.layers[pv.POSITIONS]
    name = viewer.layers[pv.MICROGRAPH].metadata["micrograph"]
    on = starfile.read(folder / "run_data.star")["particles"]
    on = on[(on["rlnClassNumber"] == 3) & (on["rlnMicrographName"] == name)]
    assert len(points.data) == len(on)
    np.testing.assert_allclose(
        np.sort(points.data[:, 1]), np.sort(on["rlnCoordinateX"].to_numpy()), atol=1e-3
    )
    assert len(viewer.layers[pv.OTHERS].data) > len(points.data)
    # the lineage of the class opened, in its own dock
    assert viewer.window.dock_widgets[LINEAGE_DOCK] is w.lineage_plot
    assert w.lineage_plot.class_box.value() == 3
    w.open_particles(truth["empty"])
    assert pv.PARTICLES not in viewer.layers  # an empty class has no particles to show
    assert w.lineage_plot.flag_label.text() == "emptied it 6 → 1"


def test_live_labels_carry_lineage_flags():
    from napari_class2d._qt.live_layers import class_labels

    labels = class_labels(
        np.array([10, 0]), np.array([12.0, np.inf]), ("", "emptied it 5 → 1; split from 1")
    )
    assert labels == ["1: n=10, 12.0 Å", "2: n=0, – Å\n⚠ emptied it 5 → 1"]
