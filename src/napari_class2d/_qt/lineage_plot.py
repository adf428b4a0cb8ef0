"""A dock widget plotting one class's lineage: its size and resolution over the updates,
the particles it took from and gave to other classes, and its events (split, exchanged,
emptied or merged). Reads the record of :mod:`napari_class2d.engine.lineage`."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from qtpy.QtWidgets import QHBoxLayout, QLabel, QSpinBox, QVBoxLayout, QWidget

from napari_class2d.engine.lineage import class_history, flags_from_document

EVENT_STYLE = {
    "split": ("^", "tab:blue", "split from {from}"),
    "exchanged": ("d", "tab:purple", "exchanged with {with}"),
    "emptied": ("x", "tab:red", "emptied"),
    "merged": ("X", "tab:red", "merged into {into}"),
    "recovered": ("o", "tab:green", "recovered"),
    "stable": ("s", "tab:gray", "stable"),
}


class ClassLineagePlot(QWidget):
    """Size (with particles gained and lost) and resolution of one class per update."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.document: dict | None = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        row.addWidget(QLabel("class"))
        self.class_box = QSpinBox()
        self.class_box.setRange(1, 1)
        self.class_box.valueChanged.connect(self._draw)
        row.addWidget(self.class_box)
        self.flag_label = QLabel("")
        self.flag_label.setStyleSheet("color: orange;")
        row.addWidget(self.flag_label, 1)
        layout.addLayout(row)
        self.figure = Figure(figsize=(8, 2.6), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.ax_count, self.ax_res = self.figure.subplots(1, 2)
        layout.addWidget(self.canvas)
        self.setMinimumHeight(240)
        self._draw()

    def set_record(self, document: dict | None, class_number: int | None = None) -> None:
        """Show ``document`` (a lineage record), at ``class_number`` when given."""
        self.document = document
        k = int(document["n_classes"]) if document is not None else 1
        self.class_box.blockSignals(True)
        self.class_box.setRange(1, max(k, 1))
        if class_number is not None:
            self.class_box.setValue(int(class_number))
        self.class_box.blockSignals(False)
        self._draw()

    def show_class(self, class_number: int) -> None:
        self.class_box.setValue(int(class_number))
        self._draw()

    def _draw(self, *_) -> None:
        ax1, ax2 = self.ax_count, self.ax_res
        ax1.clear()
        ax2.clear()
        ax1.set_ylabel("particles")
        ax2.set_ylabel("resolution (Å)")
        for ax in (ax1, ax2):
            ax.set_xlabel("iteration")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        doc = self.document
        if doc is None or not doc["history"]:
            self.flag_label.setText("no lineage record (results of this version's jobs have one)")
            self.canvas.draw_idle()
            return
        k = self.class_box.value()
        h = class_history(doc, k)
        x = h["iteration"]
        ax1.bar(x, h["gained"], color="tab:green", alpha=0.4, label="taken from others")
        ax1.bar(x, -h["lost"], color="tab:red", alpha=0.4, label="given to others")
        ax1.plot(x, h["count"], color="black", linewidth=1.5, label="size")
        ax1.axhline(0, color="gray", linewidth=0.5)
        seen = set()
        for it, events in zip(x, h["events"], strict=True):
            for e in events:
                marker, color, text = EVENT_STYLE.get(e["kind"], ("*", "black", e["kind"]))
                label = e["kind"] if e["kind"] not in seen else None
                seen.add(e["kind"])
                y = h["count"][list(x).index(it)]
                ax1.plot([it], [y], marker=marker, color=color, markersize=9, label=label)
                names = {n: e.get(n) for n in ("from", "with", "into")}
                ax1.annotate(
                    text.format(**names),
                    (it, y),
                    textcoords="offset points",
                    xytext=(4, 6),
                    fontsize=7,
                    color=color,
                )
        ax1.legend(loc="upper left", fontsize="x-small")
        ax1.set_title(f"class {k}", fontsize=9)
        res = h["resolution_A"]
        if np.isfinite(res).any():
            ax2.plot(x, res, color="black")
            ax2.invert_yaxis()
        self.flag_label.setText(flags_from_document(doc)[k - 1])
        self.canvas.draw_idle()
