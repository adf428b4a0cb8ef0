"""The "Class Selection" dock widget: a clickable gallery of class averages.

Click a class to toggle keep (green border) / reject (red border, dimmed);
*Auto-select* ranks the classes and keeps those above a threshold the user moves
(a class kept by the rare-view guard gets a blue border and "distinct view, few
particles"); the user's clicks always win over the ranking. Lineage warnings of the
job (a stable class that was emptied or merged, a split) are shown under the classes.
Double-click a class (or *Particles* with a class number) to open its particles,
aligned to the class and best first, and their positions on a micrograph; its lineage
is plotted in the *Class lineage* dock. Sort by particle count, resolution, ECA or
score; keep everything above or below a threshold; invert; export the kept particles.
All logic is in :mod:`napari_class2d.selection`, :mod:`napari_class2d.ranking` and
:mod:`napari_class2d.class_particles`; this widget only shows and forwards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFrame,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_class2d._qt.lineage_plot import ClassLineagePlot
from napari_class2d._qt.particles_view import ClassParticlesView
from napari_class2d.engine.lineage import flags_from_document
from napari_class2d.ranking import (
    DEFAULT_THRESHOLD,
    GUARD_MARK,
    AutoSelection,
    ClassFeatures,
    apply_user_choice,
    class_features,
    decide,
    score_classes,
)
from napari_class2d.selection import (
    ClassificationResult,
    classes_by_threshold,
    export_selection,
    load_result,
    sort_classes,
)

KEEP_COLOR = "#2ecc40"
REJECT_COLOR = "#ff4136"
GUARD_COLOR = "#0074d9"
FLAG_COLOR = "#ff851b"
LINEAGE_DOCK = "Class lineage"
SORT_KEYS = {
    "class number": "class",
    "particles": "count",
    "resolution": "resolution",
    "ECA": "eca",
    "score": "score",
}
METRICS = {"particles": "count", "resolution (Å)": "resolution", "ECA": "eca"}


def thumbnail(image: np.ndarray, size: int) -> QPixmap:
    """A grayscale pixmap of ``image`` scaled to ``size`` pixels (1-99 % contrast)."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    scaled = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    data = np.ascontiguousarray((scaled * 255).astype(np.uint8))
    h, w = data.shape
    qimg = QImage(data.data, w, h, w, QImage.Format.Format_Grayscale8).copy()
    return QPixmap.fromImage(qimg).scaled(
        size,
        size,
        Qt.AspectRatioMode.KeepAspectRatio,
        Qt.TransformationMode.SmoothTransformation,
    )


class ClassTile(QFrame):
    """One class: thumbnail, caption, keep/reject border, marks. Click toggles keep /
    reject; double-click opens the class's particles."""

    toggled = Signal(int)
    open_requested = Signal(int)

    def __init__(self, class_number: int, pixmap: QPixmap | None, caption: str, width: int):
        super().__init__()
        self.class_number = class_number
        self.kept = True
        self.guarded = False
        layout = QVBoxLayout(self)
        layout.setContentsMargins(3, 3, 3, 3)
        layout.setSpacing(1)
        self.image = QLabel()
        self.image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        if pixmap is not None:
            self.image.setPixmap(pixmap)
        self.caption = QLabel(caption)
        self.caption.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.caption.setStyleSheet("font-size: 9px;")
        self.mark = QLabel("")
        self.mark.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.mark.setWordWrap(True)
        self.mark.setFixedWidth(width)
        self.mark.setStyleSheet(f"font-size: 8px; color: {FLAG_COLOR};")
        self.mark.hide()
        layout.addWidget(self.image)
        layout.addWidget(self.caption)
        layout.addWidget(self.mark)
        self.set_details(caption, "", "")
        self.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)
        self.set_kept(True)

    def set_details(self, caption: str, mark: str, tooltip: str) -> None:
        """Caption, a short mark under it ("" for none) and the tooltip's details."""
        self.caption.setText(caption)
        self.mark.setText(mark)
        self.mark.setVisible(bool(mark))
        lines = [caption.replace("\n", ", ")] + ([tooltip] if tooltip else [])
        lines.append("click: keep / reject · double-click: its particles")
        self.setToolTip("\n".join(lines))

    def set_kept(self, kept: bool, guarded: bool = False) -> None:
        self.kept = bool(kept)
        self.guarded = bool(guarded and kept)
        color = GUARD_COLOR if self.guarded else (KEEP_COLOR if self.kept else REJECT_COLOR)
        self.setObjectName("tile")
        self.setStyleSheet(f"#tile {{ border: 3px solid {color}; border-radius: 3px; }}")
        self.image.setEnabled(self.kept)  # rejected classes are drawn dimmed
        self.caption.setEnabled(self.kept)

    def mousePressEvent(self, event):  # noqa: N802 - Qt API
        self.toggled.emit(self.class_number)
        super().mousePressEvent(event)

    def mouseDoubleClickEvent(self, event):  # noqa: N802 - Qt API
        # the double-click's first press toggled the class: toggle it back, then open
        self.toggled.emit(self.class_number)
        self.open_requested.emit(self.class_number)
        super().mouseDoubleClickEvent(event)


class ClassSelectionWidget(QWidget):
    """Gallery of a result's classes with keep/reject state and Export."""

    def __init__(self, napari_viewer=None, thumb_size: int = 88):
        super().__init__()
        self.viewer = napari_viewer
        self.thumb_size = thumb_size
        self.result: ClassificationResult | None = None
        self.kept: np.ndarray = np.zeros(0, dtype=bool)
        self.tiles: dict[int, ClassTile] = {}
        #: the ranking (None until Auto-select) and the user's choices on top of it
        self.features: ClassFeatures | None = None
        self.auto: AutoSelection | None = None
        self.user_choice: dict[int, bool] = {}
        self.particles_view = ClassParticlesView(napari_viewer) if napari_viewer else None
        self.lineage_plot: ClassLineagePlot | None = None
        self._worker = None

        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        self.open_button = QPushButton("Open result…")
        self.open_button.setToolTip("A result folder (run_data.star or RELION run_itNNN_*)")
        self.open_button.clicked.connect(self._browse_result)
        self.source_label = QLabel("No result loaded.")
        self.source_label.setWordWrap(True)
        row.addWidget(self.open_button)
        row.addWidget(self.source_label, 1)
        layout.addLayout(row)

        row = QHBoxLayout()
        row.addWidget(QLabel("sort by"))
        self.sort_by = QComboBox()
        self.sort_by.addItems(list(SORT_KEYS))
        self.sort_by.currentTextChanged.connect(self._rebuild_grid)
        row.addWidget(self.sort_by)
        row.addWidget(QLabel("columns"))
        self.columns = QSpinBox()
        self.columns.setRange(1, 20)
        self.columns.setValue(3)
        self.columns.valueChanged.connect(self._rebuild_grid)
        row.addWidget(self.columns)
        row.addStretch(1)
        layout.addLayout(row)

        row = QHBoxLayout()
        self.metric = QComboBox()
        self.metric.addItems(list(METRICS))
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0, 1e9)
        self.threshold.setDecimals(2)
        self.keep_above = QPushButton("keep ≥")
        self.keep_below = QPushButton("keep ≤")
        self.keep_above.clicked.connect(lambda: self.keep_by_threshold("above"))
        self.keep_below.clicked.connect(lambda: self.keep_by_threshold("below"))
        for w in (self.metric, self.threshold, self.keep_above, self.keep_below):
            row.addWidget(w)
        layout.addLayout(row)

        row = QHBoxLayout()
        for text, slot in (
            ("Keep all", lambda: self.set_kept_all(True)),
            ("Reject all", lambda: self.set_kept_all(False)),
            ("Invert", self.invert),
        ):
            b = QPushButton(text)
            b.clicked.connect(slot)
            row.addWidget(b)
        layout.addLayout(row)

        # -- ranking ---------------------------------------------------------------------
        box = QGroupBox("Automatic selection")
        auto = QVBoxLayout(box)
        row = QHBoxLayout()
        self.auto_button = QPushButton("Auto-select")
        self.auto_button.setToolTip(
            "Rank the classes (resolution, particle probability, noise texture, size) and "
            "keep those scoring at least the threshold; the rare-view guard keeps a distinct "
            "view however few particles it has. Your clicks win over the ranking."
        )
        self.auto_button.clicked.connect(lambda: self.auto_select(blocking=False))
        self.guard_box = QCheckBox("rare-view guard")
        self.guard_box.setChecked(True)
        self.guard_box.toggled.connect(self._apply_auto)
        self.reset_button = QPushButton("Forget my clicks")
        self.reset_button.setToolTip("Back to the ranking's choice")
        self.reset_button.clicked.connect(self.reset_user_choice)
        row.addWidget(self.auto_button)
        row.addWidget(self.guard_box)
        row.addWidget(self.reset_button)
        auto.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(QLabel("threshold"))
        self.auto_slider = QSlider(Qt.Orientation.Horizontal)
        self.auto_slider.setRange(0, 100)
        self.auto_slider.setValue(round(100 * DEFAULT_THRESHOLD))
        self.auto_slider.valueChanged.connect(lambda v: self.set_auto_threshold(v / 100.0))
        self.auto_threshold_label = QLabel(f"{DEFAULT_THRESHOLD:.2f}")
        row.addWidget(self.auto_slider, 1)
        row.addWidget(self.auto_threshold_label)
        auto.addLayout(row)
        self.auto_label = QLabel("Not ranked yet.")
        self.auto_label.setWordWrap(True)
        auto.addWidget(self.auto_label)
        layout.addWidget(box)

        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.grid_host = QWidget()
        self.grid = QGridLayout(self.grid_host)
        self.grid.setSpacing(4)
        self.grid.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.scroll.setWidget(self.grid_host)
        layout.addWidget(self.scroll, 1)

        self.summary = QLabel()
        layout.addWidget(self.summary)

        # -- a class's particles ------------------------------------------------------------
        box = QGroupBox("Particles of a class")
        parts = QVBoxLayout(box)
        row = QHBoxLayout()
        row.addWidget(QLabel("class"))
        self.particles_class = QSpinBox()
        self.particles_class.setRange(1, 1)
        row.addWidget(self.particles_class)
        row.addWidget(QLabel("low-pass Å"))
        self.lowpass = QDoubleSpinBox()
        self.lowpass.setRange(0, 1000)
        self.lowpass.setDecimals(1)
        self.lowpass.setSpecialValueText("off")
        self.lowpass.setToolTip("low-pass filter for viewing the particles (0: off)")
        self.lowpass.setValue(20.0)
        row.addWidget(self.lowpass)
        self.particles_button = QPushButton("Particles")
        self.particles_button.setToolTip(
            "Open the class's particles, aligned to it and best first (or double-click a class)"
        )
        self.particles_button.clicked.connect(
            lambda: self.open_particles(self.particles_class.value())
        )
        row.addWidget(self.particles_button)
        parts.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(QLabel("micrograph"))
        self.micrograph_choice = QComboBox()
        self.micrograph_choice.activated.connect(self.show_micrograph)
        row.addWidget(self.micrograph_choice, 1)
        self.micrograph_dir_button = QPushButton("Folder…")
        self.micrograph_dir_button.setToolTip(
            "Where the micrographs are, if not where the STAR file says"
        )
        self.micrograph_dir_button.clicked.connect(self._browse_micrographs)
        row.addWidget(self.micrograph_dir_button)
        parts.addLayout(row)
        self.particles_label = QLabel("")
        self.particles_label.setWordWrap(True)
        parts.addWidget(self.particles_label)
        layout.addWidget(box)
        self.micrograph_dir: Path | None = None
        row = QHBoxLayout()
        self.write_rejected = QCheckBox("also write rejected particles")
        self.write_classes = QCheckBox("also write kept class averages")
        self.write_classes.setChecked(True)
        row.addWidget(self.write_rejected)
        row.addWidget(self.write_classes)
        layout.addLayout(row)
        self.export_button = QPushButton("Export kept particles…")
        self.export_button.clicked.connect(self._browse_export)
        layout.addWidget(self.export_button)
        self._update_summary()

    # -- loading ---------------------------------------------------------------------------
    def _browse_result(self):
        path = QFileDialog.getExistingDirectory(self, "2D classification result folder")
        if path:
            self.load(path)

    def load(self, result: str | Path | ClassificationResult) -> ClassificationResult | None:
        """Show a result (folder, ``*_data.star`` or a loaded result); all classes kept."""
        try:
            res = result if isinstance(result, ClassificationResult) else load_result(result)
        except (OSError, ValueError) as err:
            show_error(f"Cannot open result: {err}")
            return None
        self.result = res
        self.kept = np.ones(res.n_classes, dtype=bool)
        self.features = None
        self.auto = None
        self.user_choice = {}
        self.auto_label.setText("Not ranked yet.")
        self.particles_class.setRange(1, max(res.n_classes, 1))
        it = f" (iteration {res.iteration})" if res.iteration is not None else ""
        lineage = " · class lineage recorded" if res.lineage is not None else ""
        self.source_label.setText(f"{res.data_star}{it}{lineage}")
        if self.lineage_plot is not None:
            self.lineage_plot.set_record(res.lineage)
        self._rebuild_grid()
        return res

    # -- gallery ---------------------------------------------------------------------------
    def _caption(self, k: int) -> str:
        res = self.result
        r = res.class_resolution_A[k - 1]
        e = res.class_eca[k - 1]
        text = f"{k} · n={int(res.class_counts[k - 1]):,}"
        text += f"\n{r:.1f} Å" if np.isfinite(r) else "\n– Å"
        if self.auto is not None:
            text += f" · s {self.auto.score[k - 1]:.2f}"
        elif np.isfinite(e):
            text += f" · ECA {e:.2f}"
        return text

    def _mark(self, k: int) -> tuple[str, str]:
        """The short mark under a class and the tooltip's details."""
        marks, details = [], []
        if self.auto is not None and self.auto.guarded[k - 1] and self.kept[k - 1]:
            marks.append(f"★ {GUARD_MARK}")
        if self.auto is not None:
            details.append(self.auto.reasons[k - 1])
            if self.user_choice.get(k) is not None:
                details.append(f"your choice: {'keep' if self.user_choice[k] else 'reject'}")
        warnings, flags = self._flags()
        if warnings and warnings[k - 1]:
            marks.append(f"⚠ {warnings[k - 1].split('; ')[0].split(', refilled')[0]}")
        if flags and flags[k - 1]:
            details.append(f"lineage: {flags[k - 1]}")
        return "\n".join(marks), "\n".join(details)

    def _flags(self) -> tuple[list[str], list[str]]:
        """The lineage's warnings (for the marks) and all it says (for the tooltips)."""
        if self.features is not None and self.features.lineage_flag:
            return self.features.lineage_warning, self.features.lineage_flag
        if self.result is not None and self.result.lineage is not None:
            cache = self.__dict__.setdefault("_record_flags", {})
            key = id(self.result)
            if key not in cache:
                doc = self.result.lineage
                cache[key] = (
                    flags_from_document(doc, warnings_only=True),
                    flags_from_document(doc),
                )
            return cache[key]
        return [], []

    def order(self) -> np.ndarray:
        """1-based class numbers in the gallery's current order."""
        if self.result is None:
            return np.zeros(0, dtype=np.int64)
        key = SORT_KEYS[self.sort_by.currentText()]
        if key == "score":
            if self.auto is None:
                return np.arange(1, self.result.n_classes + 1)
            return np.argsort(-self.auto.score, kind="stable") + 1
        return sort_classes(self.result, key)

    def _rebuild_grid(self, *_):
        while self.grid.count():
            item = self.grid.takeAt(0)
            if item.widget() is not None:
                # detach now: deferred deletion waits for the event loop to return
                item.widget().hide()
                item.widget().setParent(None)
                item.widget().deleteLater()
        self.tiles = {}
        if self.result is None:
            self._update_summary()
            return
        avg = self.result.class_averages
        cols = self.columns.value()
        for i, k in enumerate(self.order()):
            k = int(k)
            pix = (
                thumbnail(avg[k - 1], self.thumb_size)
                if avg is not None and k <= len(avg)
                else None
            )
            tile = ClassTile(k, pix, self._caption(k), self.thumb_size)
            tile.toggled.connect(self.toggle)
            tile.open_requested.connect(self.open_particles)
            self.grid.addWidget(tile, i // cols, i % cols)
            self.tiles[k] = tile
        self._refresh_tiles()

    # -- selection -------------------------------------------------------------------------
    def kept_classes(self) -> np.ndarray:
        """1-based numbers of the kept classes."""
        return np.nonzero(self.kept)[0] + 1

    def set_kept(self, classes, kept: bool = True, exclusive: bool = False) -> None:
        """Mark ``classes`` (1-based) kept (or rejected); ``exclusive``: others the opposite.
        The user's choice: it wins over the ranking."""
        idx = np.asarray(list(classes), dtype=np.int64) - 1
        if exclusive:
            self.kept[:] = not kept
        self.kept[idx] = kept
        self._remember(np.arange(len(self.kept)) if exclusive else idx)
        self._refresh_tiles()

    def toggle(self, class_number: int) -> None:
        self.kept[class_number - 1] = not self.kept[class_number - 1]
        self._remember([class_number - 1])
        self._refresh_tiles()

    def set_kept_all(self, kept: bool) -> None:
        self.kept[:] = kept
        self._remember(np.arange(len(self.kept)))
        self._refresh_tiles()

    def invert(self) -> None:
        self.kept = ~self.kept
        self._remember(np.arange(len(self.kept)))
        self._refresh_tiles()

    def _remember(self, indices) -> None:
        for i in indices:
            self.user_choice[int(i) + 1] = bool(self.kept[int(i)])

    # -- ranking ---------------------------------------------------------------------------
    def auto_select(self, blocking: bool = True) -> AutoSelection | None:
        """Rank the classes and keep those the ranking keeps (the user's clicks win).

        The features (a few seconds for 50 classes: the averages are compared with each
        other) are computed once per result; ``blocking=False`` computes them in a
        worker thread and applies the ranking when they are there.
        """
        if self.result is None:
            return None
        if self.features is None:
            if not blocking:
                self.auto_button.setEnabled(False)
                self.auto_label.setText("Ranking the classes …")
                result = self.result
                worker = create_worker(class_features, result, _ignore_errors=True)
                worker.returned.connect(lambda f, r=result: self._features_ready(r, f))
                worker.errored.connect(self._features_failed)
                self._worker = worker
                worker.start()
                return None
            self.features = class_features(self.result)
        return self._apply_auto()

    def _features_ready(self, result, features) -> None:
        self._worker = None
        self.auto_button.setEnabled(True)
        if result is not self.result:
            return  # another result was loaded meanwhile
        self.features = features
        self._apply_auto()

    def _features_failed(self, err) -> None:
        self._worker = None
        self.auto_button.setEnabled(True)
        show_error(f"Cannot rank the classes: {err}")
        self.auto_label.setText(f"Failed: {err}")

    def set_auto_threshold(self, threshold: float) -> None:
        """Move the ranking's threshold; the kept classes follow at once."""
        value = round(100 * float(threshold))
        if self.auto_slider.value() != value:
            self.auto_slider.blockSignals(True)
            self.auto_slider.setValue(value)
            self.auto_slider.blockSignals(False)
        self.auto_threshold_label.setText(f"{threshold:.2f}")
        if self.features is not None:
            self._apply_auto()

    @property
    def auto_threshold(self) -> float:
        return self.auto_slider.value() / 100.0

    def reset_user_choice(self) -> None:
        """Forget the user's clicks: back to the ranking's choice."""
        self.user_choice = {}
        if self.features is not None:
            self._apply_auto()

    def _apply_auto(self, *_) -> AutoSelection | None:
        f = self.features
        if f is None:
            return None
        score = score_classes(f)
        quality = score_classes(f, with_count=False)
        self.auto = decide(
            f, score, quality, self.auto_threshold, f.similarity_matrix, self.guard_box.isChecked()
        )
        self.kept = apply_user_choice(self.auto, self.user_choice)
        n_guard = int((self.auto.guarded & self.kept).sum())
        n_user = sum(bool(self.auto.keep[k - 1]) != v for k, v in self.user_choice.items())
        self.auto_label.setText(
            f"Ranking keeps {int(self.auto.keep.sum())} of {len(f.count)} classes at "
            f"{self.auto_threshold:.2f}, {n_guard} of them by the rare-view guard "
            f"({GUARD_MARK}); your clicks change {n_user}."
        )
        if SORT_KEYS[self.sort_by.currentText()] == "score":
            self._rebuild_grid()
        else:
            self._refresh_tiles()
        return self.auto

    # -- a class's particles -----------------------------------------------------------------
    def open_particles(self, class_number: int):
        """Show class ``class_number``'s particles (aligned, best first, a page at a time)
        in the viewer, list its micrographs and plot its lineage."""
        if self.result is None or self.particles_view is None:
            return None
        self.particles_class.setValue(int(class_number))
        lowpass = self.lowpass.value() or None
        try:
            cp = self.particles_view.show(
                self.result, int(class_number), lowpass, micrograph_dir=self.micrograph_dir
            )
        except (OSError, ValueError) as err:
            show_error(f"Cannot open the particles of class {class_number}: {err}")
            return None
        self._fill_micrographs()
        pages = cp.n_pages()
        self.particles_label.setText(
            f"Class {class_number}: {len(cp):,} particles, best first, aligned to the class; "
            f"{pages} page{'s' if pages > 1 else ''} (napari's slider)."
        )
        self._show_lineage(int(class_number))
        return cp

    def _fill_micrographs(self) -> None:
        self.micrograph_choice.clear()
        table = self.particles_view.micrograph_table if self.particles_view else None
        if table is None or not len(table):
            self.micrograph_choice.addItem("(no micrograph names in the particle file)")
            self.micrograph_choice.setEnabled(False)
            return
        self.micrograph_choice.setEnabled(True)
        for name, n, path in table.itertuples(index=False):
            found = "" if path is not None else " – not found"
            self.micrograph_choice.addItem(f"{name} ({n}){found}")

    def show_micrograph(self, index: int = 0) -> bool:
        """Show micrograph ``index`` of the class with its particles marked."""
        if self.particles_view is None:
            return False
        shown = self.particles_view.show_micrograph(int(index))
        if not shown:
            show_warning("That micrograph was not found: choose its folder (Folder…)")
        return shown

    def _browse_micrographs(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of the micrographs")
        if path:
            self.set_micrograph_dir(path)

    def set_micrograph_dir(self, path) -> None:
        """Look for micrographs (by file name) in ``path`` too."""
        self.micrograph_dir = Path(path)
        cp = self.particles_view.current if self.particles_view else None
        if cp is not None:
            self.particles_view.micrograph_table = cp.micrographs(self.micrograph_dir)
            self._fill_micrographs()

    def _show_lineage(self, class_number: int) -> None:
        if self.viewer is None or self.result is None or self.result.lineage is None:
            return
        if self.lineage_plot is None:
            self.lineage_plot = ClassLineagePlot()
            self.viewer.window.add_dock_widget(self.lineage_plot, name=LINEAGE_DOCK, area="bottom")
        self.lineage_plot.set_record(self.result.lineage, class_number)

    def keep_by_threshold(self, side: str) -> None:
        """Keep exactly the classes whose metric is ``>=`` (above) or ``<=`` (below) the value."""
        if self.result is None:
            return
        metric = METRICS[self.metric.currentText()]
        chosen = classes_by_threshold(self.result, metric, self.threshold.value(), side)
        self.set_kept(chosen, True, exclusive=True)

    def _refresh_tiles(self):
        guarded = self.auto.guarded if self.auto is not None else None
        for k, tile in self.tiles.items():
            mark, details = self._mark(k)
            tile.set_details(self._caption(k), mark, details)
            tile.set_kept(self.kept[k - 1], guarded is not None and bool(guarded[k - 1]))
        self._update_summary()

    def _update_summary(self):
        res = self.result
        if res is None:
            self.summary.setText("No result loaded.")
            self.export_button.setEnabled(False)
            return
        keep = self.kept_classes()
        n = res.n_particles_in(keep)
        pct = 100.0 * n / max(res.n_particles, 1)
        self.summary.setText(
            f"Kept {len(keep)} of {res.n_classes} classes: "
            f"{n:,} of {res.n_particles:,} particles ({pct:.0f} %)"
        )
        self.export_button.setEnabled(len(keep) > 0)

    # -- export ----------------------------------------------------------------------------
    def _browse_export(self):
        if self.result is None:
            return
        start = str(self.result.data_star.with_name("selected_particles.star"))
        path, _ = QFileDialog.getSaveFileName(self, "Export kept particles", start, "*.star")
        if path:
            # the dialog has already asked before replacing an existing file
            self.export(path, overwrite=True)

    def export(self, out_star: str | Path, overwrite: bool = False) -> int | None:
        """Write the kept particles (and, per the check boxes, rejected ones / averages).

        Returns the number of particles written, or ``None`` on error (shown to the user).
        """
        if self.result is None:
            return None
        out_star = Path(out_star)
        stem = out_star.with_suffix("")
        rejected = Path(f"{stem}_rejected.star") if self.write_rejected.isChecked() else None
        classes = Path(f"{stem}_classes.mrcs") if self.write_classes.isChecked() else None
        try:
            n = export_selection(
                self.result,
                self.kept_classes(),
                out_star,
                rejected_out=rejected,
                classes_out=classes,
                overwrite=overwrite,
            )
        except (OSError, ValueError) as err:
            show_error(f"Export failed: {err}")
            return None
        show_info(f"Wrote {n:,} particles to {out_star}")
        text = self.summary.text() + f"\nExported {n:,} particles → {out_star}"
        empty = self.result.empty_classes(self.kept_classes())
        if len(empty):
            warning = f"class(es) {', '.join(map(str, empty))} kept but hold no particles"
            show_warning(warning)
            text += f"\nWarning: {warning}"
        self.summary.setText(text)
        return n
