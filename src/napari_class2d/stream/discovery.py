"""Finding particle files: a folder searched recursively, or one STAR file that grows.

Only ``os.stat``/``os.scandir`` here: deciding what may hold something new
never opens a file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from napari_class2d.stream.records import FileRecord

#: particle-file suffixes taken from a watched folder by default
DEFAULT_SUFFIXES = (".star",)
#: name endings of files still being written by common tools (never taken)
TEMP_SUFFIXES = (".tmp", ".part", "~", ".swp", ".partial", ".crdownload")


def is_temp_name(name: str) -> bool:
    """Whether a file name looks like a file still being written (or an editor backup)."""
    return name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


class Discovery:
    """The particle files of a watched folder (or the one growing STAR file).

    Parameters
    ----------
    path
        A folder (searched recursively; hidden folders are skipped) or one STAR
        file, which need not exist yet.
    suffixes
        Particle-file name endings taken from a folder.
    exclude
        Files or folders never taken (e.g. the job's own output folder).

    Raises
    ------
    FileNotFoundError
        ``path`` is neither a folder nor a (future) STAR file in an existing folder.
    """

    def __init__(
        self,
        path: str | Path,
        suffixes: Iterable[str] = DEFAULT_SUFFIXES,
        exclude: Iterable[str | Path] = (),
    ):
        self.path = Path(os.path.abspath(path))
        if self.path.is_dir():
            self.single_file = False
        elif self.path.is_file() or self.path.suffix.lower() == ".star":
            self.single_file = True
            if not self.path.parent.is_dir():
                raise FileNotFoundError(
                    f"{self.path}: the folder {self.path.parent} does not exist; "
                    "expected a folder to watch or a STAR file (which may appear later)"
                )
        else:
            raise FileNotFoundError(
                f"{self.path}: no such folder; expected a folder to watch or a STAR file"
            )
        self.suffixes = tuple(s.lower() for s in suffixes)
        self.exclude = [os.path.abspath(p) for p in exclude]

    def abspath(self, name: str) -> str:
        """The file of a record name (relative to the watched folder)."""
        if self.single_file:
            return str(self.path)
        return os.path.join(self.path, *name.split("/"))

    def scan(self, records: dict[str, FileRecord]) -> list[FileRecord]:
        """Stat every candidate file (adding new ones to ``records``); return their
        records in taking order (name, then modification time).

        Raises
        ------
        OSError
            The watched folder cannot be listed.
        """
        found: list[tuple[str, str, os.stat_result]] = []
        if self.single_file:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                return []
            found.append((self.path.name, str(self.path), st))
        else:
            self._walk(str(self.path), "", found, set())
        out = []
        for name, path, st in found:
            rec = records.get(name)
            if rec is None:
                rec = records[name] = FileRecord(path=path, name=name)
            rec.size, rec.mtime_ns = st.st_size, st.st_mtime_ns
            out.append(rec)
        out.sort(key=lambda r: (r.name, r.mtime_ns))
        return out

    def _excluded(self, path: str) -> bool:
        return any(path == e or path.startswith(e + os.sep) for e in self.exclude)

    def _walk(self, folder: str, prefix: str, out: list, seen: set) -> None:
        try:
            key = os.stat(folder)
        except OSError:
            return
        if (key.st_dev, key.st_ino) in seen:  # symlink loop
            return
        seen.add((key.st_dev, key.st_ino))
        with os.scandir(folder) as it:
            entries = list(it)
        suffixes, exclude = self.suffixes, self.exclude
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    if not is_temp_name(name) and not (exclude and self._excluded(entry.path)):
                        self._walk(entry.path, prefix + name + "/", out, seen)
                    continue
                lower = name.lower()
                if (
                    lower.endswith(suffixes)
                    and not lower.endswith(TEMP_SUFFIXES)
                    and not (exclude and self._excluded(entry.path))
                    and entry.is_file()
                ):
                    out.append((prefix + name, entry.path, entry.stat()))
            except OSError:  # vanished between listing and stat
                continue
