"""Errors raised for bad particle input and full disks. Each names the file or folder."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class ParticleFileError(ValueError):
    """A particle file (STAR, .cs, .mrcs) cannot be used as given.

    Parameters
    ----------
    path
        The file at fault.
    message
        What is wrong and what was expected.
    row
        0-based particle row (data line) in the file, when the problem is in one row.
    column
        The column (e.g. ``rlnImageName``) at fault, when there is one.
    """

    def __init__(
        self,
        path: str | Path | None,
        message: str,
        *,
        row: int | None = None,
        column: str | None = None,
    ):
        self.path = Path(path) if path is not None else None
        self.row = row
        self.column = column
        self.reason = message
        where = [str(self.path) if self.path is not None else "<in memory>"]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column}")
        super().__init__(f"{', '.join(where)}: {message}")


class DiskFullError(OSError):
    """No space left to write into a folder; the message says how much was needed.

    Parameters
    ----------
    folder
        The folder being written to.
    needed
        Bytes needed (``None`` when unknown).
    free
        Bytes free there when the write failed (``None``: measured now).
    what
        What was being written (e.g. ``"the particle cache"``).
    approximate
        ``needed`` is an estimate.
    """

    def __init__(
        self,
        folder: str | Path,
        needed: int | None = None,
        free: int | None = None,
        what: str = "",
        approximate: bool = False,
    ):
        self.folder = Path(folder)
        if free is None:
            free = free_bytes(self.folder)
        parts = []
        if needed is not None:
            about = "about " if approximate else ""
            parts.append(
                f"needed {about}{format_bytes(needed)}" + (f" for {what}" if what else "")
            )
        elif what:
            parts.append(f"writing {what}")
        if free is not None:
            parts.append(f"{format_bytes(free)} free")
        detail = f" ({', '.join(parts)})" if parts else ""
        self.message = f"no space left on {self.folder}{detail}"
        super().__init__(errno.ENOSPC, self.message, str(self.folder))

    def __str__(self) -> str:
        return self.message


def free_bytes(folder: str | Path) -> int | None:
    """Bytes free for writing in ``folder`` (or its nearest existing parent)."""
    folder = Path(os.path.abspath(folder))
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def format_bytes(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk (or the user's quota) is full."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
