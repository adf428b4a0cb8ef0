"""Errors raised for bad particle input. Each names the file and what was expected."""

from __future__ import annotations

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
