"""napari-class2d: cryo-EM 2D classification (batch and streaming) for napari."""

__version__ = "0.1.0"
