"""The "2D Classification" and "Streaming 2D Classification" dock widgets.

A thin shell over the run layer (:mod:`napari_class2d.run`): the forms build a
:class:`~napari_class2d.run.spec.JobSpec`, Start runs a
:class:`~napari_class2d.run.runner.JobRunner` in a napari ``thread_worker`` and
the main thread draws every :class:`~napari_class2d.run.runner.RunUpdate` it
yields. Each run carries an id; yields of a stopped or superseded run are
dropped, and a run counts as finished only once every update it yielded has
been drawn (so the status line never lags behind ``running``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from magicgui import widgets
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from napari_class2d._qt.config_form import ConfigForm, DataclassForm
from napari_class2d._qt.lineage_plot import ClassLineagePlot
from napari_class2d._qt.live_layers import LiveLayers
from napari_class2d._qt.plots_widget import ClassHistoryPlot
from napari_class2d._reader import META_PARTICLES, META_SOURCE
from napari_class2d.engine.config import ConfigError
from napari_class2d.engine.job import CHECKPOINT
from napari_class2d.engine.lineage import LINEAGE_FILE, read_lineage
from napari_class2d.run.runner import JobRunner
from napari_class2d.run.spec import JobSpec, SourceOptions, StreamOptions

NO_LAYER = "(file below)"
PLOTS_NAME = "Class statistics"
LINEAGE_NAME = "Class lineage"


@dataclass
class JobRun:
    """One start (or resume) of a job; shared by the widget and its worker thread."""

    run_id: int
    runner: JobRunner
    snapshots: list = field(default_factory=list)

    def request_stop(self) -> None:
        self.runner.request_stop()

    def request_finish(self) -> None:
        self.runner.request_finish()


def _run_job(runner: JobRunner):
    """Worker generator (other thread): the runner's updates. Never touches napari or Qt."""
    yield from runner.run()


class Class2DJobWidget(QWidget):
    """Parameter form, input/output choice, Start/Stop/Resume(/Finish) and live display.

    Parameters
    ----------
    napari_viewer
        The napari viewer to draw into.
    streaming
        Streaming job (input: a folder or growing STAR file; adds Finish).
    """

    def __init__(self, napari_viewer, streaming: bool = False):
        super().__init__()
        viewer = napari_viewer
        self.viewer = viewer
        self.streaming = streaming
        self.live = LiveLayers(viewer)
        self.plots: ClassHistoryPlot | None = None
        self.lineage_plot: ClassLineagePlot | None = None
        self._run: JobRun | None = None  # the run whose updates are drawn (None: stopped)
        self._active: JobRun | None = None  # the run whose worker is alive
        self._run_counter = 0
        self._worker = None
        self._progress = None
        self._pending: list = []
        self._drawing = False
        self._finished_pending: int | None = None  # a run that ended while drawing
        #: (start, end) perf_counter seconds of each snapshot drawn (GUI cost per iteration)
        self.draw_windows: list[tuple[float, float]] = []
        self.last_out_dir: Path | None = None

        outer = QVBoxLayout(self)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        inner = QWidget()
        layout = QVBoxLayout(inner)
        scroll.setWidget(inner)
        outer.addWidget(scroll)

        # -- input ------------------------------------------------------------------------
        if streaming:
            self.input_path = QLineEdit()
            self.input_path.setPlaceholderText("folder of per-micrograph STAR files, or a STAR")
            row = QHBoxLayout()
            row.addWidget(QLabel("watch"))
            row.addWidget(self.input_path)
            for text, slot in (("Folder…", self._browse_folder), ("STAR…", self._browse_star)):
                b = QPushButton(text)
                b.clicked.connect(slot)
                row.addWidget(b)
            layout.addLayout(row)
            self.input_path.textChanged.connect(self._revalidate)
            self.layer_choice = None
            self.input_file = None
        else:
            self.layer_choice = widgets.ComboBox(
                label="particle layer", choices=self._layer_choices, nullable=False
            )
            self.input_file = widgets.FileEdit(
                label="particles file", mode="r", filter="*.star *.cs *.mrcs *.mrc"
            )
            self.input_file.tooltip = "A RELION .star, cryoSPARC .cs or .mrcs particle file"
            box = widgets.Container(widgets=[self.layer_choice, self.input_file])
            layout.addWidget(box.native)
            self.layer_choice.changed.connect(self._revalidate)
            self.input_file.changed.connect(self._revalidate)
            viewer.layers.events.inserted.connect(self._refresh_layers)
            viewer.layers.events.removed.connect(self._refresh_layers)
        self.output_dir = widgets.FileEdit(label="output folder", mode="d")
        self.output_dir.tooltip = (
            "run_data.star, run_classes.mrcs, run_model.star and checkpoint.pt go here"
        )
        self.overwrite = widgets.CheckBox(label="overwrite existing results", value=False)
        out_box = widgets.Container(widgets=[self.output_dir, self.overwrite])
        layout.addWidget(out_box.native)
        self.output_dir.changed.connect(self._revalidate)
        self.overwrite.changed.connect(self._revalidate)

        # -- how particles are read and (streaming) watched: the command line's options ----
        self.source_form = DataclassForm(
            SourceOptions,
            common=(),
            on_change=self._revalidate,
            folded_title="Particle files: pixel size, project folder",
        )
        layout.addWidget(self.source_form)
        self.stream_form = None
        if streaming:
            self.stream_form = DataclassForm(
                StreamOptions, on_change=self._revalidate, folded_title="Watching"
            )
            layout.addWidget(self.stream_form)

        # -- parameters -------------------------------------------------------------------
        self.form = ConfigForm(streaming=streaming, on_change=self._revalidate)
        layout.addWidget(self.form)
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color: #ff6b6b;")
        layout.addWidget(self.error_label)

        # -- actions ----------------------------------------------------------------------
        row = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.stop_button = QPushButton("Stop")
        self.resume_button = QPushButton("Resume")
        self.start_button.clicked.connect(lambda: self.start(resume=False))
        self.resume_button.clicked.connect(lambda: self.start(resume=True))
        self.stop_button.clicked.connect(self.stop)
        for b in (self.start_button, self.stop_button, self.resume_button):
            row.addWidget(b)
        self.finish_button = None
        if streaming:
            self.finish_button = QPushButton("Finish")
            self.finish_button.setToolTip(
                "Finish the schedule on the particles seen and write the final results"
            )
            self.finish_button.clicked.connect(self.finish)
            row.addWidget(self.finish_button)
        layout.addLayout(row)
        self.select_button = QPushButton("Open in Class Selection")
        self.select_button.clicked.connect(self.open_selection)
        layout.addWidget(self.select_button)
        self.status_label = QLabel("Ready.")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        layout.addStretch(1)
        self._revalidate()

    # -- input helpers ---------------------------------------------------------------------
    def _layer_choices(self, *_):
        names = [
            layer.name
            for layer in self.viewer.layers
            if META_SOURCE in getattr(layer, "metadata", {})
        ]
        return [NO_LAYER, *names]

    def _refresh_layers(self, *_):
        if self.layer_choice is not None:
            self.layer_choice.reset_choices()
            self._revalidate()

    def _browse_folder(self):
        path = QFileDialog.getExistingDirectory(self, "Folder to watch")
        if path:
            self.input_path.setText(path)

    def _browse_star(self):
        path, _ = QFileDialog.getOpenFileName(self, "Growing STAR file", "", "STAR (*.star)")
        if path:
            self.input_path.setText(path)

    def set_input(self, path_or_layer) -> None:
        """Choose the input: a path, or (batch) the name of a particle layer."""
        if self.streaming:
            self.input_path.setText(str(path_or_layer))
        elif isinstance(path_or_layer, str) and path_or_layer in self._layer_choices():
            self.layer_choice.value = path_or_layer
        else:
            self.layer_choice.value = NO_LAYER
            self.input_file.value = Path(path_or_layer)

    def _selected_layer(self):
        if self.layer_choice is None or self.layer_choice.value in (None, NO_LAYER):
            return None
        name = self.layer_choice.value
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _input(self):
        """``(description, input)`` of the job: a path, or the particles of a layer.

        Raises
        ------
        ValueError
            No input chosen, or it does not exist.
        """
        if self.streaming:
            text = self.input_path.text().strip()
            if not text:
                raise ValueError("choose a folder or STAR file to watch")
            path = Path(text)
            if not path.exists() and not (path.suffix == ".star" and path.parent.is_dir()):
                raise ValueError(f"{path}: does not exist")
            return str(path), path
        layer = self._selected_layer()
        if layer is not None:
            particles = layer.metadata.get(META_PARTICLES)
            source = layer.metadata[META_SOURCE]
            return layer.name, (particles if particles is not None else Path(source))
        value = self.input_file.value
        if value is None or str(value) in ("", "."):
            raise ValueError("choose a particle layer or a particles file")
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{path}: particles file not found")
        return str(path), path

    def spec(self, resume: bool = False) -> JobSpec:
        """The job the widget describes (the same object the command line builds).

        Raises
        ------
        ConfigError, ValueError
            The reason the job cannot start.
        """
        _, source = self._input()
        return JobSpec(
            config=self.form.config(),
            input=source,
            out_dir=self._out_dir(),
            streaming=self.streaming,
            source=self.source_form.value(),
            stream=self.stream_form.value() if self.stream_form is not None else StreamOptions(),
            resume=resume,
            overwrite=bool(self.overwrite.value) and not resume,
        ).validate()

    def _out_dir(self) -> Path:
        value = self.output_dir.value
        if value is None or str(value) in ("", "."):
            raise ValueError("choose an output folder")
        return Path(value)

    # -- validation ------------------------------------------------------------------------
    def validation_error(self) -> str:
        """Why Start is refused ("" when the job can start)."""
        try:
            spec = self.spec()
        except (ConfigError, ValueError) as err:
            return str(err)
        out_dir = spec.out_path
        if out_dir.exists() and not out_dir.is_dir():
            return f"{out_dir}: output is not a folder"
        layer = self._selected_layer()
        particles = layer.metadata.get(META_PARTICLES) if layer is not None else None
        if particles is not None and len(particles):
            try:
                spec.config.resolve(particles.box, float(particles.pixel_size_A[0]))
            except ConfigError as err:
                return str(err)
        return ""

    def _revalidate(self, *_):
        running = self._worker is not None
        reason = self.validation_error()
        self.error_label.setText(reason)
        self.error_label.setVisible(bool(reason))
        self.start_button.setEnabled(not running and not reason)
        has_ckpt = False
        try:
            has_ckpt = (self._out_dir() / CHECKPOINT).is_file()
        except ValueError:
            pass
        self.resume_button.setEnabled(not running and not reason and has_ckpt)
        self.stop_button.setEnabled(running)
        if self.finish_button is not None:
            self.finish_button.setEnabled(running)
        self.select_button.setEnabled(
            self.last_out_dir is not None and (self.last_out_dir / "run_data.star").is_file()
        )

    # -- running ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._worker is not None

    def start(self, resume: bool = False) -> JobRun | None:
        """Start (or resume from ``checkpoint.pt`` in the output folder) a job."""
        if self.running:
            return None
        reason = self.validation_error()
        if reason:
            show_error(f"2D classification not started: {reason}")
            return None
        spec = self.spec(resume)
        description, _ = self._input()
        self._run_counter += 1
        run = JobRun(self._run_counter, JobRunner(spec))
        self._run = self._active = run
        self.last_out_dir = spec.out_path
        if self.plots is None:
            self.plots = ClassHistoryPlot()
            stats = self.viewer.window.add_dock_widget(self.plots, name=PLOTS_NAME, area="bottom")
            self.lineage_plot = ClassLineagePlot()
            self.viewer.window.add_dock_widget(
                self.lineage_plot, name=LINEAGE_NAME, area="bottom", tabify=True
            )
            stats.raise_()  # the statistics in front, the lineage one tab away
        if not resume:
            self.plots.clear()
        config = spec.config
        total = config.n_online_em_iterations + config.n_final_full_iterations
        self._progress = progress(total=total, desc="2D classification")
        worker = create_worker(_run_job, run.runner, _ignore_errors=True)
        worker.yielded.connect(lambda update, rid=run.run_id: self._on_update(rid, update))
        worker.errored.connect(lambda err, rid=run.run_id: self._on_error(rid, err))
        worker.finished.connect(lambda rid=run.run_id: self._on_finished(rid))
        self._worker = worker
        verb = "Resuming" if resume else "Starting"
        self.status_label.setText(f"{verb} on {description} → {spec.out_path} …")
        self._revalidate()
        worker.start()
        return run

    def stop(self) -> None:
        """Stop after the current iteration (the checkpoint keeps what was done)."""
        run = self._run
        if run is None or not self.running:
            return
        run.request_stop()
        # drop this run's late updates: what is shown stays as it is now
        self._run = None
        self._pending.clear()
        self.status_label.setText("Stopping after the current iteration …")

    def finish(self) -> None:
        """Streaming: finish the schedule on the particles seen and write the results."""
        if self._run is not None:
            self._run.request_finish()
            self.status_label.setText("Finishing: remaining online and final full iterations …")

    def _current(self, run_id: int) -> bool:
        return self._run is not None and self._run.run_id == run_id

    def _on_update(self, run_id: int, update) -> None:
        if not self._current(run_id):
            return
        if update.snapshot is not None:
            self._run.snapshots.append(update.snapshot)
        # Drawing may process events (napari's progress bar does), which can deliver the
        # next update, or the end of the run, inside this call: queue updates so they are
        # drawn in order, and end the run only once the queue is drawn.
        self._pending.append((run_id, update))
        if self._drawing:
            return
        self._drawing = True
        try:
            while self._pending:
                rid, next_update = self._pending.pop(0)
                if not self._current(rid):
                    continue
                t0 = time.perf_counter()
                self._draw(next_update)
                self.draw_windows.append((t0, time.perf_counter()))
        finally:
            self._drawing = False
        if self._finished_pending is not None:
            rid, self._finished_pending = self._finished_pending, None
            self._end_run(rid)

    def _draw(self, update) -> None:
        snap = update.snapshot
        for note in update.notes:
            (show_warning if note.startswith("warning:") else show_info)(note)
        if snap is None:
            if not update.final:  # the final line is set when the run ends
                self.status_label.setText(update.status)
            return
        if snap.phase != "waiting" and snap.iteration > 0:
            self.live.update(snap)
            if self.plots is not None:
                self.plots.add(snap)
            self._update_lineage()
        self.status_label.setText(update.status)
        if self._progress is not None and snap.iteration > self._progress.n:
            self._progress.total = max(snap.n_iterations_planned, snap.iteration)
            self._progress.update(snap.iteration - self._progress.n)

    def _update_lineage(self) -> None:
        """Plot the lineage record the job wrote with this iteration's results."""
        if self.lineage_plot is None or self.last_out_dir is None:
            return
        path = self.last_out_dir / LINEAGE_FILE
        try:
            record = read_lineage(path)
        except (OSError, ValueError):
            return  # not written yet (or by an older version)
        self.lineage_plot.set_record(record)

    def _on_error(self, run_id: int, err: Exception) -> None:
        if run_id != self._run_counter:
            return
        show_error(f"2D classification failed: {err}")
        self.status_label.setText(f"Failed: {err}")
        self._run = None
        self._pending.clear()

    def _on_finished(self, run_id: int) -> None:
        if run_id != self._run_counter:
            return
        if self._drawing:  # updates of this run are still being drawn: end after them
            self._finished_pending = run_id
            return
        self._end_run(run_id)

    def _end_run(self, run_id: int) -> None:
        """The run's worker is done and all its updates are drawn: say how it ended."""
        if run_id != self._run_counter or self._worker is None:
            return
        run, was_current = self._active, self._run is not None
        self._worker = None
        self._active = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        runner = run.runner if run is not None else None
        if self.status_label.text().startswith("Failed"):
            pass
        elif runner is not None and runner.outcome == "done" and was_current:
            self.status_label.setText(runner.final_status())
            show_info(f"2D classification done: results in {self.last_out_dir}")
        elif runner is not None:
            self.status_label.setText(runner.final_status())
        self._run = None
        self._revalidate()

    # -- hand-over -------------------------------------------------------------------------
    def open_selection(self):
        """Open the Class Selection widget on this job's result."""
        if self.last_out_dir is None:
            return None
        _, widget = self.viewer.window.add_plugin_dock_widget("napari-class2d", "Class Selection")
        widget.load(self.last_out_dir)
        return widget

    def closeEvent(self, event):  # noqa: N802 - Qt API
        if self._active is not None:
            self._active.request_stop()
        super().closeEvent(event)


class StreamingClass2DJobWidget(Class2DJobWidget):
    """The "Streaming 2D Classification" dock widget."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer, streaming=True)
