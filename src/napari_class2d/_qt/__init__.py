"""napari widgets (the only part of the package that imports Qt / napari)."""
