"""Issue 14, under faults: a BIDS App run where one subject's registration worker is killed (SIGKILL, as the
out-of-memory killer does) still writes the others, records that subject as failed with the reason, and a
rerun with the same work dir finishes it.

The kill happens inside the cf worker's process (the worker pool is forked from this process, so the
patched ``register_pair`` runs there): the process dies mid-registration, as it would under the OOM killer.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NO_ET", "1")
pytest.importorskip("pydra")
pytest.importorskip("bids")

from hdar_pipeline.cli import bids_app_main  # noqa: E402
from hdar_pipeline.images import load_image, normalize_intensity  # noqa: E402

from test_bids_app import make_bids_dataset  # noqa: E402
from test_input_guard import run_cli  # noqa: E402


def install_killer(monkeypatch, victim: Path, flag: Path, *, once: bool) -> None:
    """SIGKILL the process that registers ``victim`` (every time, or only the first time)."""
    import hdar_pipeline.methods as methods

    original = methods.register_pair
    target = float(np.asarray(normalize_intensity(load_image(victim)).dataobj).sum())

    def register_pair(fixed, moving, method, **kwargs):
        if abs(float(np.asarray(moving.dataobj).sum()) - target) < 1e-3 and not (once and flag.exists()):
            flag.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return original(fixed, moving, method, **kwargs)

    monkeypatch.setattr(methods, "register_pair", register_pair)


def statuses(out: Path) -> dict[str, dict]:
    return {p.name.split("_")[0]: json.loads(p.read_text())
            for p in sorted(out.glob("sub-*/anat/*_desc-demons_metrics.json"))}


def argv(root: Path, bids_dir: Path, labels_dir: Path, nprocs: int) -> list:
    return [bids_dir, root / "out", "participant", "--atlas-participant", "01", "--labels-dir", labels_dir,
            "--methods", "demons", "--work-dir", root / "work", "--nprocs", str(nprocs), "--omp-nthreads", "1",
            "--no-preprocess", "--no-progress", "--skip-bids-validation"]


def test_a_killed_worker_is_run_again_and_the_cohort_completes(tmp_path, monkeypatch, capsys):
    """A one-off kill (a worker lost once): the run resubmits the unfinished jobs and every subject finishes."""
    bids_dir, labels_dir = make_bids_dataset(tmp_path)
    flag = tmp_path / "killed"
    install_killer(monkeypatch, bids_dir / "sub-03" / "anat" / "sub-03_T1w.nii.gz", flag, once=True)
    code, err = run_cli(bids_app_main, argv(tmp_path, bids_dir, labels_dir, 2), capsys)
    assert flag.exists(), "the worker was not killed: the test did not test anything"
    assert code == 3 and "Traceback" not in err  # 3: sub-04's T1w is corrupt, on purpose
    rec = statuses(tmp_path / "out")
    assert rec["sub-02"]["status"] == rec["sub-03"]["status"] == "ok"
    assert rec["sub-03"]["metrics"]["mean_dice"] > 0.5
    assert rec["sub-04"]["status"] == "error" and "cannot be read" in rec["sub-04"]["error"]


def test_a_subject_that_kills_its_worker_every_time_is_recorded_and_a_rerun_finishes_it(tmp_path, monkeypatch,
                                                                                        capsys):
    bids_dir, labels_dir = make_bids_dataset(tmp_path)
    flag = tmp_path / "killed"
    install_killer(monkeypatch, bids_dir / "sub-03" / "anat" / "sub-03_T1w.nii.gz", flag, once=False)
    code, err = run_cli(bids_app_main, argv(tmp_path, bids_dir, labels_dir, 1), capsys)
    assert flag.exists()
    assert code == 3 and "Traceback" not in err
    rec = statuses(tmp_path / "out")
    assert set(rec) == {"sub-02", "sub-03", "sub-04"}  # every subject has its row, none is lost
    assert rec["sub-03"]["status"] == "error" and "worker process died" in rec["sub-03"]["error"]
    for r in rec.values():  # the others: finished, or failed with a reason (never silently missing)
        assert r["status"] == "ok" or r["error"]
    # the fault goes away (memory freed): the rerun with the same work dir finishes sub-03
    monkeypatch.undo()
    code, err = run_cli(bids_app_main, argv(tmp_path, bids_dir, labels_dir, 2), capsys)
    assert code == 3 and "Traceback" not in err
    rec = statuses(tmp_path / "out")
    assert rec["sub-02"]["status"] == rec["sub-03"]["status"] == "ok"
    assert rec["sub-04"]["status"] == "error"


def test_two_runs_never_share_a_work_dir(tmp_path, capsys):
    import fcntl

    bids_dir, labels_dir = make_bids_dataset(tmp_path)
    (tmp_path / "work" / "pydra").mkdir(parents=True)
    with open(tmp_path / "work" / "pydra" / ".hdar-pipeline.lock", "w") as held:  # another run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = run_cli(bids_app_main, argv(tmp_path, bids_dir, labels_dir, 1), capsys)
    assert code == 2 and "Traceback" not in err
    assert "in use by another hdar-pipeline run" in err.strip().splitlines()[-1]
    assert not list((tmp_path / "out").glob("sub-*"))
