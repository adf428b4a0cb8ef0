"""Layers that show one class's particles: aligned to the class, best first, a page at a
time; and where they sit on a micrograph. The logic is in
:mod:`napari_class2d.class_particles`; this only draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_class2d.class_particles import ClassParticles, read_micrograph
from napari_class2d.selection import ClassificationResult

PARTICLES = "class particles"
MICROGRAPH = "micrograph"
POSITIONS = "class particles on micrograph"
OTHERS = "other particles on micrograph"


class ClassParticlesView:
    """Creates and updates the class-particle layers in a napari viewer."""

    def __init__(self, viewer):
        self.viewer = viewer
        self.current: ClassParticles | None = None
        self.micrograph_table = None

    def _remove(self, name: str) -> None:
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)

    def show(
        self,
        result: ClassificationResult,
        class_number: int,
        lowpass_A: float | None = None,
        micrograph_dir: str | Path | None = None,
    ) -> ClassParticles:
        """Show class ``class_number``'s particles as pages (napari's slider turns them)."""
        cp = ClassParticles.of(result, class_number)
        self.current = cp
        for name in (PARTICLES, MICROGRAPH, POSITIONS, OTHERS):
            self._remove(name)
        if len(cp):
            pages = cp.pages(lowpass_A=lowpass_A)
            first = np.asarray(pages[0])
            lo, hi = np.percentile(first, [1, 99]) if first.size else (0.0, 1.0)
            layer = self.viewer.add_image(
                pages,
                name=PARTICLES,
                contrast_limits=(float(lo), float(hi if hi > lo else lo + 1)),
                metadata={"class": class_number, "rows": cp.rows},
            )
            layer.metadata["n_particles"] = len(cp)
            self.viewer.dims.set_current_step(0, 0)
            self.viewer.reset_view()
        self.micrograph_table = cp.micrographs(micrograph_dir)
        return cp

    def show_micrograph(self, which: int | str = 0) -> bool:
        """Show micrograph ``which`` (row of :meth:`ClassParticles.micrographs` or its name)
        with the class's particles marked; ``False`` when its file is not found."""
        cp, table = self.current, self.micrograph_table
        if cp is None or table is None or not len(table):
            return False
        if not isinstance(which, int):
            which = int(np.nonzero(table["micrograph"].to_numpy() == which)[0][0])
        name, path = table["micrograph"].iloc[which], table["path"].iloc[which]
        for layer in (MICROGRAPH, POSITIONS, OTHERS):
            self._remove(layer)
        if path is None:
            return False
        image = read_micrograph(path)
        lo, hi = np.percentile(image[:: max(1, image.shape[0] // 512)], [1, 99])
        self.viewer.add_image(
            image,
            name=MICROGRAPH,
            contrast_limits=(float(lo), float(hi if hi > lo else lo + 1)),
            metadata={"path": str(path), "micrograph": name},
        )
        box = cp.box * cp.pixel_size_A / cp.micrograph_pixel_size_A()
        others = cp.all_positions(name)
        if len(others):
            self.viewer.add_points(
                others,
                name=OTHERS,
                size=box,
                face_color="transparent",
                border_color="#b0b0b0",
                border_width=0.04,
                opacity=0.8,
            )
        yx, prob = cp.positions(name)
        self.viewer.add_points(
            yx,
            name=POSITIONS,
            size=box,
            face_color="transparent",
            border_color="lime",
            border_width=0.06,
            features={"probability": np.nan_to_num(prob, nan=0.0)},
            metadata={"class": cp.class_number, "micrograph": name},
        )
        self.viewer.reset_view()
        return True
