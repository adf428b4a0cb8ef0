"""Qt-free 2D classification engine (PyTorch)."""
