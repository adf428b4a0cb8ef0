"""A dock widget plotting class distribution and per-class resolution over iterations."""

from __future__ import annotations

import warnings

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from qtpy.QtWidgets import QVBoxLayout, QWidget


class ClassHistoryPlot(QWidget):
    """Class distribution (stacked) and per-class resolution (Å) after each iteration."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.figure = Figure(figsize=(8, 2.6), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.ax_dist, self.ax_res = self.figure.subplots(1, 2)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.setMinimumHeight(220)
        self.clear()

    def clear(self) -> None:
        """Forget the history (a new job starts)."""
        self.iterations: list[int] = []
        self.distribution: list[np.ndarray] = []
        self.resolution: list[np.ndarray] = []
        self._draw()

    def add(self, snapshot) -> None:
        """Append one iteration's class distribution and resolutions and redraw."""
        if snapshot.class_averages.ndim != 3 or snapshot.n_classes == 0:
            return
        if self.distribution and len(self.distribution[-1]) != snapshot.n_classes:
            self.clear()
        self.iterations.append(int(snapshot.iteration))
        self.distribution.append(np.asarray(snapshot.class_distribution, dtype=float))
        self.resolution.append(np.asarray(snapshot.class_resolution_A, dtype=float))
        self._draw()

    def _draw(self) -> None:
        ax1, ax2 = self.ax_dist, self.ax_res
        ax1.clear()
        ax2.clear()
        ax1.set_ylabel("class distribution")
        ax2.set_ylabel("resolution (Å)")
        for ax in (ax1, ax2):
            ax.set_xlabel("iteration")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if self.iterations:
            x = np.asarray(self.iterations)
            dist = np.stack(self.distribution, axis=1)  # (K, iterations)
            ax1.stackplot(x, dist, linewidth=0.3, edgecolor="white")
            ax1.set_ylim(0, max(1.0, float(dist.sum(axis=0).max())))
            res = np.stack(self.resolution, axis=1)
            res = np.where(np.isfinite(res), res, np.nan)
            ax2.plot(x, res.T, linewidth=0.7, alpha=0.6)
            if np.isfinite(res).any():
                with warnings.catch_warnings():  # all-unknown iterations give nan, fine
                    warnings.simplefilter("ignore", RuntimeWarning)
                    median = np.nanmedian(res, axis=0)
                ax2.plot(x, median, color="black", linewidth=2, label="median")
                ax2.legend(loc="upper right", fontsize="small")
                ax2.invert_yaxis()  # finer resolution (smaller Å) up
        self.canvas.draw_idle()
