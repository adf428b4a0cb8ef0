"""Class lineage: which class is which from one iteration (or streaming update) to the next.

The engine keeps a class in its slot (class 7 stays class 7) and never re-sorts classes,
but the *content* of a slot can change: during the online phase an emptied class is
re-seeded with half of another class (a split), and a class that held a view can lose
its particles to others (emptied, or merged into one class). :class:`ClassLineage`
follows the particles: after every update it compares each particle's class with its
class after the previous update, and records per class its size, resolution, the
particles it kept, took from other classes or gave to them, and the events that follow
from that:

- **split**: a class whose particles now come mostly from one other class (more than
  :data:`REFILL_SOURCE_FRACTION` of them) while fewer than :data:`REFILL_OWN_FRACTION`
  are its own: the slot starts a new lineage, split from that class (how the engine's
  re-seeding of an emptied class shows). Its previous lineage ends there.
- **exchanged**: two (or more) classes each refilled from the other: they swapped their
  particles, each keeps its number and lineage. It happens when two classes hold the same
  view and each half set sits in another of them: each half is aligned to the other
  half's averages, so the halves change places every update.
- **stable**: a lineage that held at least :data:`MIN_STABLE_COUNT` particles and kept
  at least :data:`STABLE_RETENTION` of them for :data:`STABLE_UPDATES` updates in a row;
  its *stable size* is the largest median size over such a run.
- **emptied**: a stable lineage that falls below :data:`EMPTIED_FRACTION` of its stable
  size (or ends in a split); **merged into** the class that took at least
  :data:`MERGE_FRACTION` of the particles it lost since it was last at 80 % of its stable
  size, when one did (the "rare view that vanishes by the end" failure).
  A lineage that grows back to half its stable size is **recovered**.

Warnings (:func:`flags_from_document`) leave out what happened before the last update
that moved most particles to other classes (:func:`last_reshuffle`): during the online
phase the engine's classes re-form from scratch at least once.

The record is plain JSON (lists, dicts, numbers, strings): it goes into the job's
checkpoint and is written beside the results as ``run_lineage.json``
(:data:`LINEAGE_FILE`), where ``napari-class2d select``, the selection widget and other
tools read it (:func:`read_lineage`). Class numbers in the file are 1-based, as
``rlnClassNumber``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from napari_class2d.io.writers import atomic_write

LINEAGE_FILE = "run_lineage.json"
FORMAT = "napari-class2d class lineage"
VERSION = 1

#: updates in a row a lineage must hold its particles to count as stable
STABLE_UPDATES = 3
#: a stable lineage holds at least this many particles ...
MIN_STABLE_COUNT = 10
#: ... and keeps at least this fraction of them from one update to the next
STABLE_RETENTION = 0.5
#: a stable lineage below this fraction of its stable size is emptied
EMPTIED_FRACTION = 0.2
#: an emptied lineage back at this fraction of its stable size has recovered
RECOVERED_FRACTION = 0.5
#: while at this fraction of its stable size a lineage is healthy (its losses are forgotten)
HEALTHY_FRACTION = 0.8
#: a class refilled from another: fewer than this fraction of its particles are its own ...
REFILL_OWN_FRACTION = 0.2
#: ... and more than this fraction come from one other class
REFILL_SOURCE_FRACTION = 0.5
#: an emptied lineage merged into the class that took at least this fraction of its losses
MERGE_FRACTION = 0.5
#: flows of fewer particles are counted in the totals but not listed
MIN_LISTED_FLOW = 2
#: an update that keeps fewer of the particles in their class reshuffles the classes:
#: warnings are about what happened after the last one (the classes had settled)
RESHUFFLE_KEPT = 0.5


def _new_lineage(lineage_id: int, slot: int, iteration: int, origin: str, **extra) -> dict:
    return {
        "id": lineage_id,
        "class": slot + 1,
        "born": iteration,
        "origin": origin,
        "split_from": extra.get("split_from"),
        "split_from_lineage": extra.get("split_from_lineage"),
        "ended": None,
        "streak": 0,
        "recent_counts": [],
        "stable_since": None,
        "last_stable": None,
        "stable_size": None,
        "peak_size": 0,
        "emptied": None,
        "merged_into": None,
        "decline_lost": {},
    }


class ClassLineage:
    """Follows classes by their particles over a job's updates (see the module docstring).

    Parameters
    ----------
    n_classes
        Number of classes K (slots).
    """

    def __init__(self, n_classes: int):
        self.n_classes = int(n_classes)
        self.labels = np.zeros(0, dtype=np.int64)
        self.lineages: list[dict] = [_new_lineage(k, k, 0, "start") for k in range(self.n_classes)]
        self.current = list(range(self.n_classes))  # lineage id of each slot
        self.history: list[dict] = []

    # -- updating ----------------------------------------------------------------------
    def update(
        self,
        iteration: int,
        phase: str,
        labels: np.ndarray,
        resolution_A: np.ndarray | None = None,
    ) -> list[dict]:
        """Record one update: ``labels`` is every particle's 0-based class now (-1: none).

        Particles beyond the previous update's count are new (a stream grew). Returns
        the events of this update (also kept in :attr:`history`).
        """
        k = self.n_classes
        now = np.asarray(labels, dtype=np.int64)
        prev = np.full(len(now), -1, dtype=np.int64)
        m = min(len(self.labels), len(now))
        prev[:m] = self.labels[:m]
        had = prev >= 0
        has = now >= 0
        counts = np.bincount(now[has], minlength=k)[:k]
        prev_counts = np.bincount(prev[had], minlength=k)[:k]
        both = had & has
        flow = np.bincount(prev[both] * k + now[both], minlength=k * k)[: k * k].reshape(k, k)
        stayed = np.diag(flow).copy()
        moved = flow.copy()
        np.fill_diagonal(moved, 0)
        new = np.bincount(now[has & ~had], minlength=k)[:k]
        events: list[dict] = []

        # refilled slots: most of their particles come from one other class
        refilled: dict[int, int] = {}
        for slot in range(k):  # loop over classes (K), not particles
            members = int(stayed[slot] + moved[:, slot].sum())
            if members == 0 or counts[slot] == 0:
                continue
            source = int(np.argmax(moved[:, slot]))
            if (
                moved[source, slot] > REFILL_SOURCE_FRACTION * members
                and stayed[slot] < REFILL_OWN_FRACTION * members
            ):
                refilled[slot] = source
        # a refilled class whose source was refilled too exchanged particles with it (a
        # permutation: each keeps its number); otherwise it was split from the source
        partner: dict[int, int] = {}
        for slot, source in refilled.items():
            if source in refilled:
                partner[slot] = source
                if slot < source or refilled[source] != slot:
                    events.append(
                        {
                            "kind": "exchanged",
                            "class": slot + 1,
                            "with": source + 1,
                            "n": int(moved[source, slot]),
                        }
                    )
                continue
            old = self.lineages[self.current[slot]]
            self._end(old, iteration, moved[slot], events, slot)
            born = _new_lineage(
                len(self.lineages),
                slot,
                iteration,
                "split",
                split_from=source + 1,
                split_from_lineage=self.current[source],
            )
            self.lineages.append(born)
            self.current[slot] = born["id"]
            events.append(
                {
                    "kind": "split",
                    "class": slot + 1,
                    "from": source + 1,
                    "n": int(moved[source, slot]),
                    "lineage": born["id"],
                    "ended_lineage": old["id"],
                }
            )

        for slot in range(k):
            lin = self.lineages[self.current[slot]]
            if lin["born"] == iteration:
                continue  # born in this update: nothing to compare yet
            # an exchanged class kept its particles when they went to its partner
            kept = stayed[slot] + (moved[slot, partner[slot]] if slot in partner else 0)
            self._follow(lin, slot, iteration, counts, prev_counts, kept, moved, events)

        flows = [
            [int(a) + 1, int(b) + 1, int(flow[a, b])]
            for a, b in zip(*np.nonzero(moved >= MIN_LISTED_FLOW), strict=True)
        ]
        res = None
        if resolution_A is not None:
            res = [float(r) if np.isfinite(r) else None for r in np.asarray(resolution_A)]
        for e in events:
            e["iteration"] = iteration
        before = int(prev_counts.sum())
        self.history.append(
            {
                "iteration": int(iteration),
                "phase": phase,
                # the fraction of the particles that kept their class (None: first update)
                "kept": float(stayed.sum() / before) if before else None,
                "counts": counts.tolist(),
                "resolution_A": res,
                "stayed": stayed.tolist(),
                "new": new.tolist(),
                "gained": moved.sum(0).tolist(),
                "lost": moved.sum(1).tolist(),
                "flows": flows,
                "lineage": list(self.current),
                "events": events,
            }
        )
        self.labels = now.copy()
        return events

    def _follow(self, lin, slot, iteration, counts, prev_counts, kept, moved, events) -> None:
        n = int(counts[slot])
        before = int(prev_counts[slot])
        lin["peak_size"] = max(lin["peak_size"], n)
        kept = kept / before if before else 0.0
        if n >= MIN_STABLE_COUNT and before >= MIN_STABLE_COUNT and kept >= STABLE_RETENTION:
            lin["streak"] += 1
            lin["recent_counts"] = (lin["recent_counts"] + [n])[-STABLE_UPDATES:]
        else:
            lin["streak"] = 0
            lin["recent_counts"] = []
        if lin["streak"] >= STABLE_UPDATES:
            lin["last_stable"] = iteration
            level = float(np.median(lin["recent_counts"]))
            if lin["stable_since"] is None:
                lin["stable_since"] = iteration - STABLE_UPDATES + 1
                events.append({"kind": "stable", "class": slot + 1, "lineage": lin["id"]})
            if lin["emptied"] is None:
                lin["stable_size"] = max(lin["stable_size"] or 0.0, level)
        size = lin["stable_size"]
        if not size:
            return
        if n >= HEALTHY_FRACTION * size:
            lin["decline_lost"] = {}
        else:
            for j in np.nonzero(moved[slot])[0]:
                key = str(int(j) + 1)
                lin["decline_lost"][key] = lin["decline_lost"].get(key, 0) + int(moved[slot, j])
        if lin["emptied"] is None and n < EMPTIED_FRACTION * size:
            self._mark_emptied(lin, iteration, events, slot)
        elif lin["emptied"] is not None and n >= RECOVERED_FRACTION * size:
            lin["emptied"] = None
            lin["merged_into"] = None
            lin["decline_lost"] = {}
            events.append({"kind": "recovered", "class": slot + 1, "lineage": lin["id"]})

    def _end(self, lin, iteration, lost_now, events, slot) -> None:
        lin["ended"] = iteration
        if lin["stable_size"] and lin["emptied"] is None:
            for j in np.nonzero(lost_now)[0]:
                key = str(int(j) + 1)
                lin["decline_lost"][key] = lin["decline_lost"].get(key, 0) + int(lost_now[j])
            self._mark_emptied(lin, iteration, events, slot)

    def _mark_emptied(self, lin, iteration, events, slot) -> None:
        lin["emptied"] = iteration
        lost = lin["decline_lost"]
        total = sum(lost.values())
        into = None
        if total:
            top = max(lost, key=lost.get)
            if lost[top] >= MERGE_FRACTION * total and int(top) != slot + 1:
                into = int(top)
        lin["merged_into"] = into
        events.append(
            {
                "kind": "merged" if into else "emptied",
                "class": slot + 1,
                "into": into,
                "lineage": lin["id"],
                "stable_size": lin["stable_size"],
            }
        )

    # -- reading -----------------------------------------------------------------------
    def lineage_ids(self) -> np.ndarray:
        """``(K,)`` the lineage id each class holds now."""
        return np.asarray(self.current, dtype=np.int64)

    def class_flags(self, warnings_only: bool = True) -> list[str]:
        """Per class, a short warning ("" when none): see :func:`flags_from_document`."""
        return flags_from_document(self.to_dict(), warnings_only)

    def to_dict(self) -> dict:
        """The record as plain JSON values (what the checkpoint and the result file hold)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "n_classes": self.n_classes,
            "rule": {
                "stable_updates": STABLE_UPDATES,
                "min_stable_count": MIN_STABLE_COUNT,
                "stable_retention": STABLE_RETENTION,
                "emptied_fraction": EMPTIED_FRACTION,
                "recovered_fraction": RECOVERED_FRACTION,
                "refill_own_fraction": REFILL_OWN_FRACTION,
                "reshuffle_kept": RESHUFFLE_KEPT,
                "refill_source_fraction": REFILL_SOURCE_FRACTION,
                "merge_fraction": MERGE_FRACTION,
                "min_listed_flow": MIN_LISTED_FLOW,
            },
            "current": list(self.current),
            "lineages": self.lineages,
            "history": self.history,
        }

    @classmethod
    def from_dict(cls, document: dict, labels: np.ndarray) -> ClassLineage:
        """The record :meth:`to_dict` wrote; ``labels``: each particle's class at that time."""
        check_document(document)
        out = cls(int(document["n_classes"]))
        out.current = [int(i) for i in document["current"]]
        out.lineages = document["lineages"]
        out.history = document["history"]
        out.labels = np.asarray(labels, dtype=np.int64).copy()
        return out

    def write(self, path: str | Path, overwrite: bool = True) -> Path:
        """Write the record as JSON, atomically."""
        text = json.dumps(self.to_dict(), separators=(",", ":"))
        return atomic_write(
            path,
            lambda tmp: tmp.write_text(text),
            overwrite=overwrite,
            size_hint=len(text),
        )


# -- reading a written record ---------------------------------------------------------------
def check_document(document: dict) -> None:
    """Raise ``ValueError`` unless ``document`` is a lineage record this version reads."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError("not a napari-class2d class lineage record")
    if document.get("version") != VERSION:
        raise ValueError(
            f"class lineage record of version {document.get('version')}; "
            f"this napari-class2d reads version {VERSION}"
        )


def read_lineage(path: str | Path) -> dict:
    """The lineage record in ``path`` (a ``run_lineage.json`` or the folder holding it).

    Raises
    ------
    FileNotFoundError
        No record there.
    ValueError
        Not a lineage record, or one of another version.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LINEAGE_FILE
    document = json.loads(path.read_text())
    check_document(document)
    return document


def lineages_of_class(document: dict, class_number: int) -> list[dict]:
    """Every lineage that lived in class ``class_number`` (1-based), oldest first."""
    return [lin for lin in document["lineages"] if lin["class"] == class_number]


def class_history(document: dict, class_number: int) -> dict:
    """Per-update arrays of one class: ``iteration``, ``count``, ``resolution_A`` (nan:
    unknown), ``lineage``, ``stayed``, ``gained``, ``lost``, ``gained_from`` and
    ``lost_to`` (lists of ``{class: n}``, flows of at least :data:`MIN_LISTED_FLOW`)."""
    k = class_number - 1
    hist = document["history"]
    out = {
        "iteration": np.array([h["iteration"] for h in hist], dtype=np.int64),
        "count": np.array([h["counts"][k] for h in hist], dtype=np.int64),
        "resolution_A": np.array(
            [
                np.nan
                if h["resolution_A"] is None or h["resolution_A"][k] is None
                else h["resolution_A"][k]
                for h in hist
            ],
            dtype=np.float64,
        ),
        "lineage": np.array([h["lineage"][k] for h in hist], dtype=np.int64),
        "stayed": np.array([h["stayed"][k] for h in hist], dtype=np.int64),
        "gained": np.array([h["gained"][k] for h in hist], dtype=np.int64),
        "lost": np.array([h["lost"][k] for h in hist], dtype=np.int64),
        "gained_from": [{a: n for a, b, n in h["flows"] if b == class_number} for h in hist],
        "lost_to": [{b: n for a, b, n in h["flows"] if a == class_number} for h in hist],
        "events": [[e for e in h["events"] if e["class"] == class_number] for h in hist],
    }
    return out


def last_reshuffle(document: dict) -> int:
    """The last iteration whose update kept fewer than :data:`RESHUFFLE_KEPT` of the
    particles in their class (0 when none): the classes had not settled before it."""
    out, before = 0, 0
    for h in document["history"]:
        kept = h.get("kept")
        if kept is None and before:  # a record written before "kept" was kept
            kept = sum(h["stayed"]) / before
        if kept is not None and kept < RESHUFFLE_KEPT:
            out = int(h["iteration"])
        before = sum(h["counts"])
    return out


def flags_from_document(document: dict, warnings_only: bool = False) -> list[str]:
    """Per class (index k-1), a short text: "" when nothing to report, else e.g.
    ``"emptied it 16 → 12"`` (a stable class was emptied and its particles went mostly
    to class 12), ``"emptied it 16 → 12, refilled from 4 (it 17)"`` (the emptied class's
    number was then given to particles split from class 4), ``"swaps with 9"`` (the two
    classes exchanged their particles in most recent updates, :func:`exchange_partners`)
    or, unless ``warnings_only``, ``"split from 4 (it 3)"``.

    Emptied classes are reported when they had been stable for :data:`STABLE_UPDATES`
    updates after the last update that reshuffled the classes (:func:`last_reshuffle`):
    before it the classes had not settled.
    """
    k = int(document["n_classes"])
    out = [""] * k
    swaps = exchange_partners(document)
    settled = last_reshuffle(document)
    for slot in range(k):
        parts = []
        current = document["lineages"][document["current"][slot]]
        refill = (
            f", refilled from {current['split_from']} (it {current['born']})"
            if current["origin"] == "split"
            else ""
        )
        told = False
        emptied = [
            lin
            for lin in lineages_of_class(document, slot + 1)
            if lin["emptied"] is not None and _stable_after(lin, settled)
        ]
        for lin in emptied:
            where = f" → {lin['merged_into']}" if lin["merged_into"] else ""
            text = f"emptied it {lin['emptied']}{where}"
            if lin is emptied[-1] and lin["id"] != current["id"]:
                text += refill
                told = True
            parts.append(text)
        if swaps.get(slot + 1):
            parts.append("swaps with " + ", ".join(map(str, sorted(swaps[slot + 1]))))
        if not warnings_only and current["origin"] == "split" and not told:
            parts.append(f"split from {current['split_from']} (it {current['born']})")
        out[slot] = "; ".join(parts)
    return out


def _stable_after(lin: dict, iteration: int) -> bool:
    """The lineage was stable for :data:`STABLE_UPDATES` updates after ``iteration``."""
    last = lin.get("last_stable")
    if last is None:  # a record written before "last_stable" was kept
        return lin["emptied"] is not None and lin["emptied"] > iteration + STABLE_UPDATES
    return last >= iteration + STABLE_UPDATES


def exchange_partners(document: dict, last_updates: int = 4, min_times: int = 2) -> dict:
    """``{class: {classes}}``: classes that exchanged their particles with each other at
    least ``min_times`` in the last ``last_updates`` updates (1-based numbers)."""
    seen: dict[tuple[int, int], int] = {}
    for h in document["history"][-last_updates:]:
        for e in h["events"]:
            if e["kind"] == "exchanged":
                pair = tuple(sorted((e["class"], e["with"])))
                seen[pair] = seen.get(pair, 0) + 1
    out: dict[int, set] = {}
    for (a, b), n in seen.items():
        if n >= min_times:
            out.setdefault(a, set()).add(b)
            out.setdefault(b, set()).add(a)
    return out


def class_summary(document: dict) -> list[dict]:
    """Per class: its current lineage's ``lineage``, ``origin``, ``split_from``, ``born``,
    ``stable_since``, ``stable_size``, ``peak_size``, ``emptied``, ``merged_into`` (of
    its current lineage), and ``emptied_before`` (earlier lineages of the slot that were
    stable and emptied, as ``(iteration, merged_into)``)."""
    k = int(document["n_classes"])
    out = []
    for slot in range(k):
        lin = document["lineages"][document["current"][slot]]
        earlier = [
            (e["emptied"], e["merged_into"])
            for e in lineages_of_class(document, slot + 1)
            if e["id"] != lin["id"] and e["emptied"] is not None
        ]
        out.append(
            {
                "class": slot + 1,
                "lineage": lin["id"],
                "origin": lin["origin"],
                "split_from": lin["split_from"],
                "born": lin["born"],
                "stable_since": lin["stable_since"],
                "stable_size": lin["stable_size"],
                "peak_size": lin["peak_size"],
                "emptied": lin["emptied"],
                "merged_into": lin["merged_into"],
                "emptied_before": earlier,
            }
        )
    return out


def stability(document: dict, last_updates: int = 5) -> np.ndarray:
    """``(K,)`` the mean fraction of its particles each class kept over the last
    ``last_updates`` updates (1: nobody left; nan when the class was empty throughout)."""
    hist = document["history"][-last_updates:]
    k = int(document["n_classes"])
    kept = np.zeros(k)
    held = np.zeros(k)
    for prev, h in zip([None, *hist[:-1]], hist, strict=True):
        if prev is None:
            continue
        before = np.asarray(prev["counts"], dtype=float)
        kept += np.asarray(h["stayed"], dtype=float)
        held += before
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(held > 0, kept / held, np.nan)
