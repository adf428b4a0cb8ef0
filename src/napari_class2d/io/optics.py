"""RELION optics tables: build one for any particle set, prune, merge.

An optics group is a set of particles sharing pixel size, image size, voltage,
spherical aberration and amplitude contrast (RELION 3.1+ ``data_optics``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from napari_class2d.io.particles import ParticleSet

#: per-particle CTF fields that live in the optics table in RELION 3.1+
OPTICS_CTF_COLUMNS = {
    "rlnVoltage": "voltage_kV",
    "rlnSphericalAberration": "cs_mm",
    "rlnAmplitudeContrast": "amplitude_contrast",
}


def optics_table_for(particles: ParticleSet) -> tuple[pd.DataFrame, np.ndarray]:
    """A RELION 3.1 optics table covering exactly the groups the particles use.

    Parameters
    ----------
    particles
        Any particle set. When it carries an optics table (RELION 3.1+ input),
        that table is kept, pruned to the groups still used, and completed with
        ``rlnImagePixelSize``/``rlnImageSize``/``rlnImageDimensionality`` if
        missing. Otherwise one group is made per distinct (optics group, pixel
        size, voltage, Cs, amplitude contrast).

    Returns
    -------
    table
        One row per optics group, ``rlnOpticsGroup`` first.
    groups
        The optics group number of each particle, shape ``(N,)``.
    """
    n = particles.n_particles
    if particles.optics is not None and "rlnOpticsGroup" in particles.optics.columns:
        groups = np.asarray(particles.optics_group, dtype=np.int64)
        used = np.unique(groups)
        table = particles.optics[particles.optics["rlnOpticsGroup"].isin(used)].copy()
        if "rlnImagePixelSize" not in table.columns:
            apix = pd.Series(particles.pixel_size_A, index=groups)
            table["rlnImagePixelSize"] = (
                table["rlnOpticsGroup"].map(apix.groupby(level=0).first()).to_numpy()
            )
        if "rlnImageSize" not in table.columns:
            table["rlnImageSize"] = particles.box
        if "rlnImageDimensionality" not in table.columns:
            table["rlnImageDimensionality"] = 2
        return table.reset_index(drop=True), groups

    keys = {
        "group": np.asarray(particles.optics_group, dtype=np.int64),
        "rlnImagePixelSize": np.asarray(particles.pixel_size_A, dtype=np.float64),
    }
    if particles.ctf is not None:
        for column, field in OPTICS_CTF_COLUMNS.items():
            keys[column] = np.asarray(getattr(particles.ctf, field), dtype=np.float64)
    frame = pd.DataFrame(keys)
    combo = frame.groupby(list(keys), sort=False).ngroup().to_numpy()
    first = frame.drop_duplicates().reset_index(drop=True)
    if first["group"].is_unique:
        numbers = first["group"].to_numpy()  # original numbering still valid
    else:
        numbers = np.arange(1, len(first) + 1)
    groups = numbers[combo] if n else np.zeros(0, dtype=np.int64)
    table = pd.DataFrame(
        {
            "rlnOpticsGroup": numbers.astype(np.int64),
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in numbers],
            "rlnImagePixelSize": first["rlnImagePixelSize"].to_numpy(),
            "rlnImageSize": np.full(len(first), particles.box, dtype=np.int64),
            "rlnImageDimensionality": np.full(len(first), 2, dtype=np.int64),
        }
    )
    for column in OPTICS_CTF_COLUMNS:
        if column in first.columns:
            table[column] = first[column].to_numpy()
    return table, np.asarray(groups, dtype=np.int64)


def _same_optics(a: pd.Series, b: pd.Series) -> bool:
    """Whether two optics rows describe the same optics (names aside)."""
    shared = [c for c in a.index.intersection(b.index) if c != "rlnOpticsGroupName"]
    for c in shared:
        x, y = a[c], b[c]
        if isinstance(x, (int, float, np.number)) and isinstance(y, (int, float, np.number)):
            if not np.isclose(float(x), float(y), rtol=1e-6, atol=1e-9):
                return False
        elif str(x) != str(y):
            return False
    return True


def merge_optics(
    tables: list[pd.DataFrame], groups: list[np.ndarray]
) -> tuple[pd.DataFrame, list[np.ndarray], list[dict[int, int]]]:
    """Merge optics tables, renumbering a later group only when its number clashes.

    Parameters
    ----------
    tables
        One optics table per particle set (``rlnOpticsGroup`` column).
    groups
        The per-particle group numbers of each set.

    Returns
    -------
    table
        The merged table; a group whose number and optics agree across sets
        appears once.
    groups
        Per set, the group numbers after renumbering.
    renumbered
        Per set, ``{old: new}`` for the groups that moved.
    """
    merged: dict[int, pd.Series] = {}
    out_groups, maps = [], []
    next_free = max([int(t["rlnOpticsGroup"].max()) for t in tables if len(t)] + [0]) + 1
    for table, g in zip(tables, groups, strict=True):
        mapping: dict[int, int] = {}
        for _, row in table.iterrows():  # one row per optics group, never per particle
            number = int(row["rlnOpticsGroup"])
            if number in merged and not _same_optics(merged[number], row):
                new = next_free
                next_free += 1
                mapping[number] = new
                row = row.copy()
                row["rlnOpticsGroup"] = new
                if str(row.get("rlnOpticsGroupName", "")) == f"opticsGroup{number}":
                    row["rlnOpticsGroupName"] = f"opticsGroup{new}"
                merged[new] = row
            elif number not in merged:
                merged[number] = row
        g = np.asarray(g, dtype=np.int64)
        if mapping:
            lookup = pd.Series(mapping)
            g = pd.Series(g).map(lookup).fillna(pd.Series(g)).to_numpy(dtype=np.int64)
        out_groups.append(g)
        maps.append(mapping)
    table = pd.DataFrame(list(merged.values())).reset_index(drop=True)
    if len(table):
        table["rlnOpticsGroup"] = table["rlnOpticsGroup"].astype(np.int64)
        table = table.sort_values("rlnOpticsGroup", kind="stable").reset_index(drop=True)
        for c in ("rlnImageSize", "rlnImageDimensionality"):
            if c in table.columns and table[c].notna().all():
                table[c] = table[c].astype(np.int64)
    return table, out_groups, maps
