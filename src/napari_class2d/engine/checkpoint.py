"""Checkpoints as data: tensors plus a versioned JSON document, never pickled objects.

A checkpoint file is what ``torch.save`` writes for ``{"json": TEXT, "tensors":
{NAME: tensor}}``: it loads with ``torch.load(path, weights_only=True)``, which
builds nothing but tensors and plain containers, so a checkpoint received with
someone else's result folder cannot run code on *Resume*, and renaming a class
in this package does not break the checkpoints of stopped jobs. ``TEXT`` is a
JSON object with :data:`FORMAT` and :data:`VERSION`; numpy arrays and tensors
are stored among the tensors under the names the JSON gives them.

The file is written whole into memory, then through
:func:`~napari_class2d.io.writers.atomic_write` (a temporary file, fsync,
rename): the previous checkpoint stays intact until the new one is complete,
and a full disk is reported as such.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import torch

from napari_class2d import __version__
from napari_class2d.io.writers import atomic_write

FORMAT = "napari-class2d checkpoint"
#: version 1 was a pickle (napari-class2d 0.1.0 before checkpoints became data)
VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint that this version of napari-class2d cannot resume from."""


def save(path: str | Path, document: dict, arrays: dict[str, np.ndarray | torch.Tensor]) -> Path:
    """Write ``document`` (JSON-able) and ``arrays`` to ``path`` atomically.

    Raises
    ------
    DiskFullError
        No space for the checkpoint; the previous one is left as it was.
    """
    tensors = {}
    for name, value in arrays.items():
        t = value.detach().cpu() if torch.is_tensor(value) else torch.from_numpy(np.asarray(value))
        tensors[name] = t.contiguous()
    text = json.dumps({"format": FORMAT, "version": VERSION, "written_by": __version__} | document)
    buffer = io.BytesIO()
    torch.save({"json": text, "tensors": tensors}, buffer)
    data = buffer.getvalue()
    return atomic_write(
        path, lambda tmp: tmp.write_bytes(data), overwrite=True, size_hint=len(data)
    )


def load(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON document and the tensors of the checkpoint at ``path``.

    Raises
    ------
    FileNotFoundError
        No checkpoint there.
    CheckpointError
        Not a checkpoint, one from another version (older ones were pickles and
        are never unpickled), or a damaged file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, f"{path}: no checkpoint to resume from", str(path))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} was written by an older napari-class2d (a pickled checkpoint, which is "
            "not loaded because unpickling can run code); start the job again (overwrite)"
        ) from None
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("json"), str):
        raise CheckpointError(f"{path} is not a napari-class2d checkpoint")
    try:
        document = json.loads(raw["json"])
    except ValueError as err:
        raise CheckpointError(f"{path}: damaged checkpoint ({err})") from None
    if document.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a napari-class2d checkpoint")
    if document.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is a checkpoint of version {document.get('version')} (written by "
            f"napari-class2d {document.get('written_by', '?')}); this napari-class2d "
            f"({__version__}) resumes version {VERSION} only: start the job again (overwrite)"
        )
    return document, dict(raw.get("tensors") or {})


def split_state(state: dict, prefix: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A state dict (tensors, arrays and plain scalars) as JSON values and named tensors.

    Returns ``({"scalars": {...}, "arrays": {key: kind}}, {prefix/key: tensor})``;
    :func:`join_state` puts them back together.

    Raises
    ------
    TypeError
        A value that is neither a tensor, a numpy array nor an int/float/bool/str/None
        (the message names the key).
    """
    scalars, kinds, tensors = {}, {}, {}
    for key, value in state.items():
        if torch.is_tensor(value):
            kinds[key] = "tensor"
            tensors[f"{prefix}/{key}"] = value
        elif isinstance(value, np.ndarray):
            kinds[key] = "numpy"
            tensors[f"{prefix}/{key}"] = value
        elif isinstance(value, np.generic):
            scalars[key] = value.item()
        elif value is None or isinstance(value, bool | int | float | str):
            scalars[key] = value
        else:
            raise TypeError(
                f"{prefix}: {key!r} is a {type(value).__name__}; a checkpoint holds tensors, "
                "arrays and plain numbers only"
            )
    return {"scalars": scalars, "arrays": kinds}, tensors


def join_state(described: dict, tensors: dict[str, torch.Tensor], prefix: str) -> dict:
    """The state dict that :func:`split_state` split (numpy arrays back as numpy)."""
    out = dict(described.get("scalars", {}))
    for key, kind in described.get("arrays", {}).items():
        name = f"{prefix}/{key}"
        if name not in tensors:
            raise CheckpointError(f"damaged checkpoint: {name} is missing")
        t = tensors[name]
        out[key] = t.numpy() if kind == "numpy" else t
    return out
