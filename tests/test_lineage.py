"""Class lineage: classes followed by their particles over iterations and streaming updates."""

from __future__ import annotations

import numpy as np
import pytest

from napari_class2d.engine.config import Class2DConfig
from napari_class2d.engine.job import Class2DJob
from napari_class2d.engine.lineage import (
    LINEAGE_FILE,
    ClassLineage,
    class_history,
    class_summary,
    flags_from_document,
    read_lineage,
    stability,
)
from synthetic import make_particles
from test_engine_job import ListSource


def _labels(*sizes: int) -> np.ndarray:
    """Particles 0.. in classes 0, 1, 2 ... with the given sizes, in order."""
    return np.concatenate([np.full(n, k) for k, n in enumerate(sizes)]).astype(np.int64)


def test_stable_class_emptied_into_another_is_flagged_as_merged():
    lin = ClassLineage(3)
    labels = _labels(40, 40, 20)
    for it in range(1, 6):
        lin.update(it, "online", labels, np.array([20.0, 22.0, 24.0]))
    assert lin.lineages[2]["stable_since"] == 2 and lin.lineages[2]["stable_size"] == 20
    # class 3 (index 2) loses its particles to class 1 (index 0) over two updates
    labels = labels.copy()
    labels[80:90] = 0
    lin.update(6, "full", labels)
    assert lin.class_flags()[2] == ""  # half left: not yet emptied
    labels[90:97] = 0
    events = lin.update(7, "full", labels)
    assert [e["kind"] for e in events] == ["merged"] and events[0]["into"] == 1
    flags = lin.class_flags()
    assert flags[2] == "emptied it 7 → 1" and flags[0] == flags[1] == ""
    assert lin.lineage_ids().tolist() == [0, 1, 2]  # no class changed identity
    hist = class_history(lin.to_dict(), 3)
    assert hist["count"].tolist() == [20] * 5 + [10, 3]
    assert hist["lost_to"][-1] == {1: 7} and hist["gained_from"][-1] == {}
    # it grows back: recovered, the flag goes
    labels[80:89] = 2
    assert [e["kind"] for e in lin.update(8, "full", labels)] == ["recovered"]
    assert lin.class_flags()[2] == ""
    assert lin.lineage_ids().tolist() == [0, 1, 2]


def test_refilled_class_is_a_split_not_the_same_class():
    """The engine re-seeds an emptied class with half of another: that is a new lineage
    split from the donor, and the emptied class's own lineage ends (flagged if stable)."""
    lin = ClassLineage(3)
    labels = _labels(60, 30, 30)
    for it in range(1, 5):
        lin.update(it, "online", labels)
    labels = labels.copy()
    labels[60:90] = 2  # class 2 empties into class 3
    lin.update(5, "online", labels)
    labels[:30] = 1  # and is re-seeded with half of class 1
    events = lin.update(6, "online", labels)
    split = [e for e in events if e["kind"] == "split"]
    assert split == [
        {
            "kind": "split",
            "class": 2,
            "from": 1,
            "n": 30,
            "lineage": 3,
            "ended_lineage": 1,
            "iteration": 6,
        }
    ]
    assert lin.lineage_ids().tolist() == [0, 3, 2]
    doc = lin.to_dict()
    summary = class_summary(doc)
    assert summary[1]["origin"] == "split" and summary[1]["split_from"] == 1
    assert summary[1]["emptied_before"] == [(5, 3)]  # the stable class 2 went into class 3
    assert flags_from_document(doc)[1] == "emptied it 5 → 3, refilled from 1 (it 6)"
    assert flags_from_document(doc, warnings_only=True)[0] == ""
    assert summary[0]["lineage"] == 0 and summary[0]["origin"] == "start"


def test_new_particles_of_a_stream_are_counted_as_new():
    lin = ClassLineage(2)
    lin.update(1, "full", _labels(10, 10))
    lin.update(2, "full", np.concatenate([_labels(10, 10), [1, 1, 0]]))
    h = lin.history[-1]
    assert h["new"] == [1, 2] and h["stayed"] == [10, 10] and h["counts"] == [11, 12]
    assert stability(lin.to_dict()).tolist() == [1.0, 1.0]


def test_record_round_trips_through_json(tmp_path):
    lin = ClassLineage(2)
    lin.update(1, "online", _labels(5, 5))
    lin.write(tmp_path / LINEAGE_FILE)
    doc = read_lineage(tmp_path)
    back = ClassLineage.from_dict(doc, _labels(5, 5))
    assert back.to_dict() == lin.to_dict()
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a napari-class2d class lineage"):
        read_lineage(tmp_path / "x.json")


SMALL_STREAM = dict(
    n_classes=3,
    max_res_A=10.0,
    n_online_em_iterations=4,
    batch_size_per_class=20,
    n_final_full_iterations=1,
    particle_diameter_A=120.0,
    annealing_start_iteration=1,
    n_annealing_iterations=2,
    full_iteration_every_n_new=60,
)


def _empty_class(job: Class2DJob, k: int) -> None:
    """Deliberately empty class ``k``: its statistics, reference and prior set to zero,
    through the model's state (what a checkpoint holds)."""
    state = job.model.state_dict()
    state["num"][:, k] = 0
    state["den"][:, k] = 0
    state["references"][k] = 0
    state["prior"][k] = 1e-12
    job.model.load_state_dict(state)


def test_streaming_classes_keep_their_numbers_and_an_emptied_class_is_flagged(tmp_path):
    ps, views, *_ = make_particles(840, box=32, pixel_size_A=5.0, n_views=3, snr=0.5, seed=3)
    # the online phase (4 x 60 particles) is done after 240; then a full update every 60
    chunks = [ps.subset(np.arange(i, i + 60)) for i in range(0, 840, 60)]
    job = Class2DJob(
        ListSource(chunks), Class2DConfig(**SMALL_STREAM), out_dir=tmp_path, poll_seconds=0.0
    )
    updates, emptied = [], None
    for snap in job.run():
        if snap.phase == "waiting" and job.source.taken == len(chunks):
            job.request_finish()
        if snap.phase != "full":
            continue
        updates.append((snap, job.assignments.best_class.copy()))
        if len(updates) == 4:
            # the most populated stable class is emptied before the next update
            summary = class_summary(job.lineage.to_dict())
            stable = [s["class"] - 1 for s in summary if s["stable_since"] is not None]
            emptied = max(stable, key=lambda c: snap.class_counts_hard[c])
            _empty_class(job, emptied)
    assert len(updates) >= 6 and emptied is not None
    settled = updates[1:4]  # the first full update still takes over from the online phase
    # class numbers stay put over the streaming updates: same lineage, same particles, view
    for (a, la), (b, lb) in zip(settled, settled[1:], strict=False):
        np.testing.assert_array_equal(a.class_lineage_id, b.class_lineage_id)
        n = len(la)
        for c in np.unique(la):
            assert np.mean(lb[:n][la == c] == c) >= 0.7, c
            view = np.bincount(views[:n][la == c]).argmax()
            assert np.bincount(views[: len(lb)][lb == c]).argmax() == view, c
    # the emptied class is flagged, in the snapshot and in the written record
    after = updates[4][0]
    assert after.class_counts_hard[emptied] == 0
    assert after.class_flags[emptied].startswith(f"emptied it {after.iteration}")
    others = [f for c, f in enumerate(updates[-1][0].class_flags) if c != emptied]
    assert not any("emptied" in f for f in others)
    doc = read_lineage(tmp_path / LINEAGE_FILE)
    assert flags_from_document(doc)[emptied].startswith("emptied")
    summary = class_summary(doc)[emptied]
    assert summary["emptied"] == after.iteration
    assert summary["lineage"] == updates[3][0].class_lineage_id[emptied]  # the same class
    if summary["merged_into"] is not None:  # where its particles went
        into = summary["merged_into"] - 1
        moved = (updates[3][1] == emptied) & (updates[4][1][: len(updates[3][1])] == into)
        assert moved.sum() >= 0.5 * (updates[3][1] == emptied).sum()


def test_lineage_survives_stop_and_resume(tmp_path):
    """The record is kept in the checkpoint: a stopped and resumed job writes the same
    lineage as one that ran through."""
    ps, *_ = make_particles(300, box=32, pixel_size_A=5.0, n_views=3, snr=0.5, seed=5)
    cfg = Class2DConfig(**(SMALL_STREAM | {"n_online_em_iterations": 4}))
    Class2DJob(ps, cfg, out_dir=tmp_path / "a").run_to_end()
    job = Class2DJob(ps, cfg, out_dir=tmp_path / "b")
    it = job.run()
    next(it), next(it)
    job.request_stop()
    assert list(it) == []
    Class2DJob(ps, cfg, out_dir=tmp_path / "b", resume=True).run_to_end()
    a, b = read_lineage(tmp_path / "a"), read_lineage(tmp_path / "b")
    assert [h["iteration"] for h in b["history"]] == [1, 2, 3, 4, 5]
    assert a == b
