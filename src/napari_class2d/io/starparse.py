"""Parse STAR text (RELION 1.x-5 and other tools) into data blocks.

A data block is a ``loop_`` table (a :class:`pandas.DataFrame`, one column per
``_name``) or ``_name value`` pairs (a ``dict``). Loop bodies are handed to
pandas' C parser in one piece, so a million-row table parses in seconds; values
in double or single quotes may hold spaces (``"000001@my stack.mrcs"``, as
RELION writes them). Text in memory (the appended rows of a growing STAR file)
is parsed the same way as a file, without a scratch file.
"""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pandas as pd

from napari_class2d.io.errors import ParticleFileError

Block = pd.DataFrame | dict
#: text read as missing values (what starfile and this package write for them)
NA_VALUES = ["nan", "NaN", "<NA>"]

_DATA_LINE = re.compile(r"^[ \t]*data_", re.M)
_SINGLE_QUOTE = re.compile(r"(?:(?<=\s)|^)'|'(?=\s|$)", re.M)


def read_star_blocks(path: str | Path) -> dict[str, Block]:
    """All data blocks of a STAR file, by name (``data_optics`` -> ``"optics"``).

    Raises
    ------
    ParticleFileError
        Missing, unreadable or empty file, no data blocks, a malformed table
        (a repeated column, rows with more values than columns).
    """
    path = Path(path)
    if not path.is_file():
        raise ParticleFileError(path, "STAR file not found")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ParticleFileError(path, f"cannot read the STAR file: {err.strerror}") from None
    if not raw:
        raise ParticleFileError(path, "STAR file is empty (0 bytes); expected data blocks")
    return parse_star(raw, path)


def parse_star(text: str | bytes, path: str | Path | None = None) -> dict[str, Block]:
    """Data blocks of STAR ``text``; ``path`` only names the source in errors.

    Raises
    ------
    ParticleFileError
        No data blocks, a repeated column name in a loop, rows whose number of
        values differs from the loop's columns, an unparsable ``_name value`` line.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    blocks: dict[str, Block] = {}
    starts = [m.start() for m in _DATA_LINE.finditer(text)]
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        name, block = _parse_block(text[start:end], path)
        blocks[name] = block
    if not blocks:
        raise ParticleFileError(path, "STAR file holds no data blocks; expected a particle block")
    return blocks


def _parse_block(text: str, path) -> tuple[str, Block]:
    """One ``data_`` block: its name and table (``loop_``) or key-value pairs."""
    first_nl = text.find("\n")
    head = text if first_nl < 0 else text[:first_nl]
    name = head.strip()[5:].split()[0] if head.strip()[5:].strip() else ""
    pos = len(text) if first_nl < 0 else first_nl + 1
    pairs: dict = {}
    while pos < len(text):
        nl = text.find("\n", pos)
        line_end = len(text) if nl < 0 else nl
        line = text[pos:line_end].strip()
        next_pos = line_end + 1
        if line.startswith("loop_"):
            return name, _parse_loop(text, next_pos, name, path)
        if line.startswith("_"):
            key, value = _key_value(line, name, path)
            pairs[key] = value
        pos = next_pos
    return name, pairs


def _key_value(line: str, block: str, path) -> tuple[str, object]:
    try:
        parts = shlex.split(line, comments=True)
    except ValueError as err:
        raise ParticleFileError(path, f"data_{block}: cannot parse {line!r} ({err})") from None
    if len(parts) != 2:
        raise ParticleFileError(
            path, f"data_{block}: expected '_name value', got {line!r}", column=line.split()[0][1:]
        )
    return parts[0][1:], _numericise(parts[1])


def _numericise(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _parse_loop(text: str, pos: int, block: str, path) -> pd.DataFrame:
    """The table of a ``loop_`` whose column names start at ``pos``."""
    columns: list[str] = []
    first: dict[str, int] = {}
    while pos < len(text):
        nl = text.find("\n", pos)
        line_end = len(text) if nl < 0 else nl
        line = text[pos:line_end].strip()
        if line.startswith("_"):
            column = line.split()[0][1:]
            if column in first:
                raise ParticleFileError(
                    path,
                    f"column {column} appears twice in data_{block} (columns "
                    f"{first[column] + 1} and {len(columns) + 1}); each column of a table "
                    "must be named once",
                    column=column,
                )
            first[column] = len(columns)
            columns.append(column)
        elif line and not line.startswith("#"):
            break  # the first data line
        pos = line_end + 1
    body = text[pos:]
    if not body.strip():
        return pd.DataFrame({c: pd.Series(dtype=float) for c in columns})
    if "'" in body:  # single-quoted tokens: a quote that starts or ends a token
        body = _SINGLE_QUOTE.sub('"', body)
    try:
        table = pd.read_csv(
            io.StringIO(body),
            sep=r"\s+",
            header=None,
            comment="#",
            keep_default_na=False,
            na_values=NA_VALUES,
            engine="c",
        )
    except pd.errors.ParserError as err:
        raise ParticleFileError(
            path, f"data_{block}: the rows do not form a table ({str(err).strip()})"
        ) from None
    except pd.errors.EmptyDataError:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in columns})
    if table.shape[1] != len(columns):
        raise ParticleFileError(
            path,
            f"data_{block}: rows hold {table.shape[1]} values but the table names "
            f"{len(columns)} columns",
        )
    table.columns = columns
    for column in columns:
        values = table[column]
        if not pd.api.types.is_numeric_dtype(values.dtype):
            try:
                numeric = pd.to_numeric(values)
            except (ValueError, TypeError):
                continue
            if not numeric.isna().all():
                table[column] = numeric
    return table
