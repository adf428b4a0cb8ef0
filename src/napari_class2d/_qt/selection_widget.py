"""The "Class Selection" dock widget: a clickable gallery of class averages.

Click a class to toggle keep (green border) / reject (red border, dimmed);
sort by particle count, resolution or ECA; keep everything above or below a
threshold; invert; export the kept particles. All logic is in
:mod:`napari_class2d.selection`; this widget only shows and forwards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
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
SORT_KEYS = {
    "class number": "class",
    "particles": "count",
    "resolution": "resolution",
    "ECA": "eca",
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
    """One class: thumbnail, caption, keep/reject border. Click toggles."""

    toggled = Signal(int)

    def __init__(self, class_number: int, pixmap: QPixmap | None, caption: str):
        super().__init__()
        self.class_number = class_number
        self.kept = True
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
        layout.addWidget(self.image)
        layout.addWidget(self.caption)
        self.setToolTip(caption.replace("\n", ", ") + "\nclick: keep / reject")
        self.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)
        self.set_kept(True)

    def set_kept(self, kept: bool) -> None:
        self.kept = bool(kept)
        color = KEEP_COLOR if self.kept else REJECT_COLOR
        self.setObjectName("tile")
        self.setStyleSheet(f"#tile {{ border: 3px solid {color}; border-radius: 3px; }}")
        self.image.setEnabled(self.kept)  # rejected classes are drawn dimmed
        self.caption.setEnabled(self.kept)

    def mousePressEvent(self, event):  # noqa: N802 - Qt API
        self.toggled.emit(self.class_number)
        super().mousePressEvent(event)


class ClassSelectionWidget(QWidget):
    """Gallery of a result's classes with keep/reject state and Export."""

    def __init__(self, napari_viewer=None, thumb_size: int = 88):
        super().__init__()
        self.viewer = napari_viewer
        self.thumb_size = thumb_size
        self.result: ClassificationResult | None = None
        self.kept: np.ndarray = np.zeros(0, dtype=bool)
        self.tiles: dict[int, ClassTile] = {}

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
        it = f" (iteration {res.iteration})" if res.iteration is not None else ""
        self.source_label.setText(f"{res.data_star}{it}")
        self._rebuild_grid()
        return res

    # -- gallery ---------------------------------------------------------------------------
    def _caption(self, k: int) -> str:
        res = self.result
        r = res.class_resolution_A[k - 1]
        e = res.class_eca[k - 1]
        text = f"{k} · n={int(res.class_counts[k - 1]):,}"
        text += f"\n{r:.1f} Å" if np.isfinite(r) else "\n– Å"
        if np.isfinite(e):
            text += f" · ECA {e:.2f}"
        return text

    def order(self) -> np.ndarray:
        """1-based class numbers in the gallery's current order."""
        if self.result is None:
            return np.zeros(0, dtype=np.int64)
        return sort_classes(self.result, SORT_KEYS[self.sort_by.currentText()])

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
            tile = ClassTile(k, pix, self._caption(k))
            tile.set_kept(self.kept[k - 1])
            tile.toggled.connect(self.toggle)
            self.grid.addWidget(tile, i // cols, i % cols)
            self.tiles[k] = tile
        self._update_summary()

    # -- selection -------------------------------------------------------------------------
    def kept_classes(self) -> np.ndarray:
        """1-based numbers of the kept classes."""
        return np.nonzero(self.kept)[0] + 1

    def set_kept(self, classes, kept: bool = True, exclusive: bool = False) -> None:
        """Mark ``classes`` (1-based) kept (or rejected); ``exclusive``: others the opposite."""
        idx = np.asarray(list(classes), dtype=np.int64) - 1
        if exclusive:
            self.kept[:] = not kept
        self.kept[idx] = kept
        self._refresh_tiles()

    def toggle(self, class_number: int) -> None:
        self.kept[class_number - 1] = not self.kept[class_number - 1]
        self._refresh_tiles()

    def set_kept_all(self, kept: bool) -> None:
        self.kept[:] = kept
        self._refresh_tiles()

    def invert(self) -> None:
        self.kept = ~self.kept
        self._refresh_tiles()

    def keep_by_threshold(self, side: str) -> None:
        """Keep exactly the classes whose metric is ``>=`` (above) or ``<=`` (below) the value."""
        if self.result is None:
            return
        metric = METRICS[self.metric.currentText()]
        chosen = classes_by_threshold(self.result, metric, self.threshold.value(), side)
        self.set_kept(chosen, True, exclusive=True)

    def _refresh_tiles(self):
        for k, tile in self.tiles.items():
            tile.set_kept(self.kept[k - 1])
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
