"""npe2 widget entry points (thin: the widgets live in :mod:`napari_class2d._qt`).

napari passes the viewer to a widget class whose ``__init__`` takes ``napari_viewer``.
"""

from __future__ import annotations

from napari_class2d._qt.job_widget import Class2DJobWidget, StreamingClass2DJobWidget
from napari_class2d._qt.selection_widget import ClassSelectionWidget

__all__ = ["Class2DJobWidget", "ClassSelectionWidget", "StreamingClass2DJobWidget"]
