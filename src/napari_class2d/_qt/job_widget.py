"""The "2D Classification" and "Streaming 2D Classification" dock widgets.

A thin shell: the form builds a :class:`Class2DConfig`, Start runs a
:class:`~napari_class2d.engine.job.Class2DJob` in a napari ``thread_worker``
and every yielded :class:`IterationSnapshot` is drawn by the main thread.
Each run carries an id; yields of a stopped or superseded run are dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from magicgui import widgets
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
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

from napari_class2d._qt.config_form import ConfigForm
from napari_class2d._qt.live_layers import LiveLayers
from napari_class2d._qt.plots_widget import ClassHistoryPlot
from napari_class2d._reader import META_PARTICLES, META_SOURCE
from napari_class2d.engine.config import ConfigError

NO_LAYER = "(file below)"
PLOTS_NAME = "Class statistics"


@dataclass
class JobRun:
    """One start (or resume) of a job; shared by the widget and its worker thread."""

    run_id: int
    job: object = None
    stop_requested: bool = False
    finish_requested: bool = False
    snapshots: list = field(default_factory=list)

    def request_stop(self) -> None:
        self.stop_requested = True
        if self.job is not None:
            self.job.request_stop()

    def request_finish(self) -> None:
        self.finish_requested = True
        if self.job is not None:
            self.job.request_finish()


def _run_job(run: JobRun, source_factory, config, out_dir, resume, overwrite):
    """Worker generator (other thread): build the job, yield its snapshots.

    Never touches napari or Qt.
    """
    from napari_class2d.engine.job import Class2DJob

    source = source_factory()
    job = Class2DJob(source, config, out_dir=out_dir, resume=resume, overwrite=overwrite)
    run.job = job
    if run.stop_requested:
        job.request_stop()
    if run.finish_requested:
        job.request_finish()
    yield from job.run()


def stream_status(snapshot) -> str:
    """The streaming status line: phase, particles seen / used / needed, next full iteration."""
    parts = [f"phase: {snapshot.phase}", f"seen {snapshot.n_particles_seen:,}"]
    parts.append(f"used {snapshot.n_particles_used:,}")
    if snapshot.n_particles_needed:
        parts.append(f"need {snapshot.n_particles_needed:,} more for warm-up")
    if snapshot.next_full_at:
        parts.append(f"next full iteration at {snapshot.next_full_at:,} seen")
    return " · ".join(parts)


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
        self._run: JobRun | None = None
        self._run_counter = 0
        self._worker = None
        self._progress = None
        self._pending: list = []
        self._drawing = False
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
        """``(description, factory)`` of the particle source; raises ValueError if unset."""
        if self.streaming:
            text = self.input_path.text().strip()
            if not text:
                raise ValueError("choose a folder or STAR file to watch")
            path = Path(text)
            if not path.exists():
                raise ValueError(f"{path}: does not exist")
            out = self.output_dir.value

            def watcher():
                from napari_class2d.stream.watcher import FolderWatcher

                # never import the job's own outputs when they sit inside the watched folder
                exclude = [Path(out)] if out is not None and str(out) not in ("", ".") else []
                return FolderWatcher(path, exclude=exclude)

            return str(path), watcher
        layer = self._selected_layer()
        if layer is not None:
            particles = layer.metadata.get(META_PARTICLES)
            source = layer.metadata[META_SOURCE]
            if particles is not None:
                return layer.name, lambda: particles
            return layer.name, lambda: _read(source)
        value = self.input_file.value
        if value is None or str(value) in ("", "."):
            raise ValueError("choose a particle layer or a particles file")
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{path}: particles file not found")
        return str(path), lambda: _read(path)

    def _out_dir(self) -> Path:
        value = self.output_dir.value
        if value is None or str(value) in ("", "."):
            raise ValueError("choose an output folder")
        return Path(value)

    # -- validation ------------------------------------------------------------------------
    def validation_error(self) -> str:
        """Why Start is refused ("" when the job can start)."""
        try:
            config = self.form.config()
        except ConfigError as err:
            return str(err)
        try:
            self._input()
            out_dir = self._out_dir()
        except ValueError as err:
            return str(err)
        if out_dir.exists() and not out_dir.is_dir():
            return f"{out_dir}: output is not a folder"
        layer = self._selected_layer()
        particles = layer.metadata.get(META_PARTICLES) if layer is not None else None
        if particles is not None and len(particles):
            try:
                config.resolve(particles.box, float(particles.pixel_size_A[0]))
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
            has_ckpt = (self._out_dir() / "checkpoint.pt").is_file()
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
        config = self.form.config()
        description, factory = self._input()
        out_dir = self._out_dir()
        self._run_counter += 1
        run = JobRun(self._run_counter)
        self._run = run
        self.last_out_dir = out_dir
        if self.plots is None:
            self.plots = ClassHistoryPlot()
            self.viewer.window.add_dock_widget(self.plots, name=PLOTS_NAME, area="bottom")
        if not resume:
            self.plots.clear()
        total = config.n_online_em_iterations + config.n_final_full_iterations
        self._progress = progress(total=total, desc="2D classification")
        worker = create_worker(
            _run_job,
            run,
            factory,
            config,
            out_dir,
            resume,
            bool(self.overwrite.value) and not resume,
            _ignore_errors=True,
        )
        worker.yielded.connect(lambda snap, rid=run.run_id: self._on_snapshot(rid, snap))
        worker.errored.connect(lambda err, rid=run.run_id: self._on_error(rid, err))
        worker.finished.connect(lambda rid=run.run_id: self._on_finished(rid))
        self._worker = worker
        verb = "Resuming" if resume else "Starting"
        self.status_label.setText(f"{verb} on {description} → {out_dir} …")
        self._revalidate()
        worker.start()
        return run

    def stop(self) -> None:
        """Stop after the current iteration (the checkpoint keeps what was done)."""
        run = self._run
        if run is None or not self.running:
            return
        run.request_stop()
        # drop this run's late yields: what is shown stays as it is now
        self._run = None
        self.status_label.setText("Stopping after the current iteration …")

    def finish(self) -> None:
        """Streaming: finish the schedule on the particles seen and write the results."""
        if self._run is not None:
            self._run.request_finish()
            self.status_label.setText("Finishing: remaining online and final full iterations …")

    def _current(self, run_id: int) -> bool:
        return self._run is not None and self._run.run_id == run_id

    def _on_snapshot(self, run_id: int, snap) -> None:
        if not self._current(run_id):
            return
        self._run.snapshots.append(snap)
        # Drawing may process events (napari's progress bar does), which can deliver
        # the next snapshot inside this call: queue it so snapshots are drawn in order.
        self._pending.append(snap)
        if self._drawing:
            return
        self._drawing = True
        try:
            while self._pending:
                t0 = time.perf_counter()
                self._draw(self._pending.pop(0))
                self.draw_windows.append((t0, time.perf_counter()))
        finally:
            self._drawing = False

    def _draw(self, snap) -> None:
        if snap.phase != "waiting" and snap.iteration > 0:
            self.live.update(snap)
            if self.plots is not None:
                self.plots.add(snap)
        text = f"Iteration {snap.iteration}/{snap.n_iterations_planned} ({snap.phase})"
        if self.streaming:
            text += "\n" + stream_status(snap)
        if snap.message:
            text += f"\n{snap.message}"
        self.status_label.setText(text)
        if self._progress is not None and snap.iteration > self._progress.n:
            self._progress.total = max(snap.n_iterations_planned, snap.iteration)
            self._progress.update(snap.iteration - self._progress.n)

    def _on_error(self, run_id: int, err: Exception) -> None:
        if run_id != self._run_counter:
            return
        show_error(f"2D classification failed: {err}")
        self.status_label.setText(f"Failed: {err}")
        self._run = None

    def _on_finished(self, run_id: int) -> None:
        if run_id != self._run_counter:
            return
        was_current = self._run is not None
        self._worker = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if was_current:
            n = len(self._run.snapshots)
            self.status_label.setText(f"Done: {n} iterations. Results in {self.last_out_dir}")
            show_info(f"2D classification done: results in {self.last_out_dir}")
        elif not self.status_label.text().startswith("Failed"):
            self.status_label.setText(
                f"Stopped. Resume continues from {self.last_out_dir}/checkpoint.pt"
            )
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
        if self._run is not None:
            self._run.request_stop()
        super().closeEvent(event)


class StreamingClass2DJobWidget(Class2DJobWidget):
    """The "Streaming 2D Classification" dock widget."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer, streaming=True)


def _read(path):
    from napari_class2d.io.readers import read_particles

    return read_particles(path)
