"""Layers that show a running job: class averages, a labelled gallery and the mask.

Every layer is created once and then updated in place from each
:class:`~napari_class2d.engine.snapshot.IterationSnapshot`.

Layout (data pixels): the gallery of all classes, tiled with their labels
"k: n=123, 12.3 Å" and the mask circles, sits at the origin; the stack of
class averages ``(K, D', D')`` (browse with the slider) sits to its left with
the two mask circles over it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

AVERAGES = "class averages"
GALLERY = "class gallery"
LABELS = "class labels"
MASK = "mask"
GALLERY_MASK = "gallery mask"

#: empty pixels between gallery tiles
GAP = 2


def gallery_shape(n_classes: int) -> tuple[int, int]:
    """(rows, columns) of the gallery grid: about square, wider than tall."""
    cols = max(1, math.ceil(math.sqrt(n_classes)))
    return math.ceil(n_classes / cols), cols


def tile_origins(n_classes: int, box: int) -> np.ndarray:
    """Top-left (row, col) pixel of each class's tile, ``(K, 2)``."""
    _, cols = gallery_shape(n_classes)
    k = np.arange(n_classes)
    return np.stack([(k // cols) * (box + GAP), (k % cols) * (box + GAP)], axis=1).astype(float)


def tile_gallery(averages: np.ndarray) -> np.ndarray:
    """Tile ``(K, D, D)`` averages into one image, each normalised to its own range.

    Each class is scaled to zero mean and unit standard deviation so weak and
    strong classes are both visible; gaps are set to the image minimum.
    """
    k, d, _ = averages.shape
    rows, cols = gallery_shape(k)
    flat = averages.reshape(k, -1).astype(np.float32)
    mean = flat.mean(axis=1)[:, None, None]
    std = flat.std(axis=1)[:, None, None]
    norm = (averages - mean) / np.where(std > 0, std, 1.0)
    fill = float(norm.min()) if norm.size else 0.0
    out = np.full((rows * (d + GAP) - GAP, cols * (d + GAP) - GAP), fill, dtype=np.float32)
    for i, (r, c) in enumerate(tile_origins(k, d).astype(int)):  # K tiles, not particles
        out[r : r + d, c : c + d] = norm[i]
    return out


def class_labels(
    counts: np.ndarray, resolution_A: np.ndarray, flags: tuple[str, ...] = ()
) -> list[str]:
    """Tile captions ``"k: n=123, 12.3 Å"`` (1-based class numbers), with the class's
    lineage warning on a second line (``"⚠ emptied it 16 → 12"``) when ``flags`` has one.

    The numbers are the engine's class slots, which never move: a class keeps its
    number over the iterations and streaming updates (its lineage says when its
    content was replaced, see :mod:`napari_class2d.engine.lineage`)."""
    out = []
    for k, (n, res) in enumerate(zip(counts, resolution_A, strict=True), start=1):
        res_txt = f"{res:.1f} Å" if np.isfinite(res) else "– Å"
        text = f"{k}: n={int(round(float(n)))}, {res_txt}"
        flag = flags[k - 1] if k - 1 < len(flags) else ""
        if flag:
            text += "\n⚠ " + flag.split("; ")[0]
        out.append(text)
    return out


def circle(center: tuple[float, float], radius: float) -> np.ndarray:
    """A napari ellipse (4 bounding-box corners) for a circle, ``(4, 2)``."""
    cy, cx = center
    r = radius
    return np.array([[cy - r, cx - r], [cy - r, cx + r], [cy + r, cx + r], [cy + r, cx - r]])


def mask_radii_px(snapshot) -> tuple[float, float]:
    """Inner and outer mask radius in pixels of the class averages."""
    px = float(snapshot.pixel_size_A)
    return (
        0.5 * float(snapshot.mask_inner_diameter_A) / px,
        0.5 * float(snapshot.mask_outer_diameter_A) / px,
    )


class LiveLayers:
    """Creates and updates the job's layers in a napari viewer."""

    def __init__(self, viewer):
        self.viewer = viewer
        self.n_updates = 0

    def _layer(self, name):
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def update(self, snapshot) -> None:
        """Show ``snapshot``'s averages, counts, resolutions and mask."""
        avg = np.asarray(snapshot.class_averages, dtype=np.float32)
        if avg.ndim != 3 or avg.shape[0] == 0:
            return
        k, d, _ = avg.shape
        stack_offset = (0.0, -(d + 4 * GAP) - 0.0)
        center = ((d - 1) / 2.0, (d - 1) / 2.0)
        r_in, r_out = mask_radii_px(snapshot)

        layer = self._layer(AVERAGES)
        if layer is None or layer.data.shape != avg.shape:
            if layer is not None:
                self.viewer.layers.remove(layer)
            self.viewer.add_image(avg, name=AVERAGES, translate=(0.0, *stack_offset))
            # show class 1 (the slider may sit on a particle index beyond K)
            self.viewer.dims.set_current_step(0, 0)
        else:
            layer.data = avg
            layer.reset_contrast_limits()

        gallery = tile_gallery(avg)
        layer = self._layer(GALLERY)
        if layer is None or layer.data.shape != gallery.shape:
            if layer is not None:
                self.viewer.layers.remove(layer)
            self.viewer.add_image(gallery, name=GALLERY)
        else:
            layer.data = gallery
            layer.reset_contrast_limits()

        origins = tile_origins(k, d)
        self._set_shapes(
            GALLERY_MASK,
            [circle(tuple(o + center), r) for o in origins for r in (r_in, r_out)],
            translate=(0.0, 0.0),
            width=0.3,
        )
        self._set_shapes(
            MASK,
            [circle(center, r_in), circle(center, r_out)],
            translate=stack_offset,
            width=0.5,
        )

        labels = class_labels(
            snapshot.class_counts_hard,
            snapshot.class_resolution_A,
            getattr(snapshot, "class_flags", ()),
        )
        points = origins + np.array([1.0, 1.0])
        features = pd.DataFrame({"label": labels})
        layer = self._layer(LABELS)
        if layer is None or len(layer.data) != k:
            if layer is not None:
                self.viewer.layers.remove(layer)
            self.viewer.add_points(
                points,
                name=LABELS,
                features=features,
                size=0.1,
                face_color="transparent",
                border_width=0,
                text={
                    "string": "{label}",
                    "anchor": "upper_left",
                    "size": 8,
                    "color": "yellow",
                },
            )
        else:
            layer.features = features
            layer.refresh_text()
        self.n_updates += 1

    def _set_shapes(self, name, shapes, translate, width) -> None:
        layer = self._layer(name)
        if layer is not None and layer.nshapes == len(shapes):
            current = np.stack([np.asarray(d) for d in layer.data]) if len(shapes) else None
            if current is not None and np.allclose(current, np.stack(shapes)):
                return  # unchanged mask: skip re-triangulating the shapes
            layer.data = shapes
            return
        if layer is not None:
            self.viewer.layers.remove(layer)
        colors = ["cyan", "magenta"] * (len(shapes) // 2)
        self.viewer.add_shapes(
            shapes,
            shape_type="ellipse",
            name=name,
            edge_color=colors,
            face_color="transparent",
            edge_width=width,
            translate=translate,
            opacity=0.8,
        )
