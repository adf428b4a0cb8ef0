"""The run layer: one job specification, one particle source, one runner under every front end.

Qt-free. The commands (:mod:`napari_class2d.cli`) and the widgets
(:mod:`napari_class2d._qt`) build a :class:`JobSpec` from the same dataclasses
and consume :meth:`JobRunner.run`; see ``docs/architecture.md``.
"""

from napari_class2d.run.runner import JobRunner, RunError, RunUpdate
from napari_class2d.run.source import open_source
from napari_class2d.run.spec import JobSpec, SourceOptions, StreamOptions
from napari_class2d.run.status import format_status

__all__ = [
    "JobRunner",
    "JobSpec",
    "RunError",
    "RunUpdate",
    "SourceOptions",
    "StreamOptions",
    "format_status",
    "open_source",
]
