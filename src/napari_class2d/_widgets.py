"""npe2 widget entry points (thin: the widgets live in :mod:`napari_class2d._qt`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import napari


def make_job_widget(napari_viewer: napari.viewer.Viewer):
    """The batch "2D Classification" dock widget."""
    from napari_class2d._qt.job_widget import Class2DJobWidget

    return Class2DJobWidget(napari_viewer, streaming=False)


def make_streaming_widget(napari_viewer: napari.viewer.Viewer):
    """The "Streaming 2D Classification" dock widget."""
    from napari_class2d._qt.job_widget import Class2DJobWidget

    return Class2DJobWidget(napari_viewer, streaming=True)


def make_selection_widget(napari_viewer: napari.viewer.Viewer):
    """The "Class Selection" dock widget."""
    from napari_class2d._qt.selection_widget import ClassSelectionWidget

    return ClassSelectionWidget(napari_viewer)
