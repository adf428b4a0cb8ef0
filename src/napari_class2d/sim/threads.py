"""Temporarily set torch's intra-op thread count.

On the 2-core CPU machines this project is developed on, element-wise torch
operations on ~1 M-element tensors run 5-10x slower with 2 OpenMP threads than
with 1 (FFT and GEMM gain little from the second thread), so the simulator and
the scorer run single-threaded by default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (``None``: leave torch's setting)."""
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)
