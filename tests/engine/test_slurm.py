"""The cohort workflow scaled out through Pydra's SLURM worker, on a real SLURM cluster.

Every workflow node runs as its own ``sbatch`` job (Pydra writes one batch script per job under
``<cache_root>/slurm_scripts/``, submits it, polls ``squeue`` and reads the job's state from ``sacct``).

Needs a cluster with accounting (``sacct``): ``bash tests/slurm/start_cluster.sh`` starts a single-node one
on this machine (Debian, root). Marked ``slurm``, so the default ``python -m pytest`` leaves it out; run it with
``python -m pytest -m slurm``. Without a cluster it is skipped with the reason, unless ``HDAR_REQUIRE_SLURM=1``
(set by ``.ci/run``, which started one): then a missing cluster fails the test instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest

os.environ.setdefault("NO_ET", "1")  # Pydra: no telemetry look-ups (sbatch passes the environment on to the jobs)

pytest.importorskip("pydra")

from conftest import make_brain_phantom, unregistered_dice  # noqa: E402
from pydra.engine.submitter import Submitter  # noqa: E402

from hdar_pipeline.core.images import save_image  # noqa: E402
from hdar_pipeline.core.synthetic import make_subject  # noqa: E402
from hdar_pipeline.engine import init_cohort_wf  # noqa: E402

pytestmark = pytest.mark.slurm

USABLE_NODE_STATES = {"idle", "mix", "mixed", "alloc", "allocated", "comp", "completing"}


def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def slurm_problem() -> str | None:
    """Why Pydra's SLURM worker cannot run here (``None`` when it can): the client commands, a node, accounting."""
    for tool in ("sbatch", "squeue", "sacct", "sinfo"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (no SLURM client; start one with: bash tests/slurm/start_cluster.sh)"
    try:
        info = _run("sinfo", "-h", "-o", "%t", timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s (no slurmctld?)"
    if info.returncode != 0:
        return f"sinfo does not answer: {(info.stderr or info.stdout).strip()[:300]}"
    states = {s.rstrip("*~#!%$@^-") for s in info.stdout.split()}
    if not states & USABLE_NODE_STATES:
        return f"no node is up (sinfo node states: {sorted(states) or 'none'})"
    try:
        acct = _run("sacct", "-n", "-X", "-S", "now", "-o", "JobID", timeout=20)
    except subprocess.TimeoutExpired:
        return "sacct did not answer within 20 s (no slurmdbd?)"
    if acct.returncode != 0:
        return f"sacct does not work (Pydra's SLURM worker needs job accounting): {acct.stderr.strip()[:300]}"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    problem = slurm_problem()
    if problem:
        if os.environ.get("HDAR_REQUIRE_SLURM") == "1":
            pytest.fail(f"HDAR_REQUIRE_SLURM=1 but no usable SLURM cluster: {problem}", pytrace=False)
        pytest.skip(problem)


UNREGISTERED: dict[str, float] = {}  # the cohort's subjects' Dice against the atlas labels, unregistered


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory):
    """A 2-subject cohort (one corrupt T1w), demons, run with worker="slurm"; returns (outputs, cache, seconds)."""
    d = tmp_path_factory.mktemp("slurm_cohort")
    atlas = make_brain_phantom((32, 32, 32), 3.0)
    atlas_t1w = save_image(atlas.image, d / "atlas_T1w.nii.gz")
    atlas_dseg = save_image(atlas.labels, d / "atlas_dseg.nii.gz")
    s = make_subject(atlas.image, atlas.labels, seed=10, magnitude_mm=9.0, smoothness_mm=15.0)
    t1w = [save_image(s.image, d / "sub-01_T1w.nii.gz"), d / "sub-02_T1w.nii.gz"]
    t1w[1].write_bytes(b"\x1f\x8b truncated gzip, not an image")
    labels = [save_image(s.labels, d / "sub-01_dseg.nii.gz"), None]
    UNREGISTERED["sub-01"] = unregistered_dice(atlas_dseg, labels[0])

    wf = init_cohort_wf(methods=["demons"], threads=1, seed=1, distances=False)(
        atlas=atlas_t1w, atlas_labels=atlas_dseg, subjects=["01", "02"], t1w=t1w, labels=labels)
    cache = d / "cache"
    start = time.perf_counter()
    with Submitter(worker="slurm", cache_root=cache, poll_delay=1) as sub:
        result = sub(wf)
    elapsed = time.perf_counter() - start
    print(f"cohort workflow through SLURM: {elapsed:.1f} s")
    assert not result.errored, result
    return result.outputs, cache, elapsed


def test_cohort_rows_and_status_through_slurm(slurm_run):
    outputs, _, _ = slurm_run
    group = pd.read_csv(outputs.group_csv.fspath, sep="\t")  # group.tsv
    assert list(group["participant_id"]) == ["sub-01", "sub-02"] and (group["method"] == "demons").all()
    ok, bad = group.iloc[0], group.iloc[1]
    assert ok["status"] == "ok" and bool(ok["evaluated"]) and UNREGISTERED["sub-01"] + 0.015 < ok["mean_dice"] <= 1
    assert bad["status"] == "error" and bad["failed_step"] == "register"
    assert "sub-02_T1w.nii.gz" in bad["error"] and "cannot be read" in bad["error"]
    assert outputs.n_failed == 1 and len(outputs.records) == 2


def test_every_node_ran_as_a_slurm_job(slurm_run):
    """The work went through SLURM: Pydra's batch scripts (this interpreter), the jobs' output files, and
    sacct's record of each job (COMPLETED, exit 0, named after its workflow node)."""
    _, cache, _ = slurm_run
    scripts = sorted((cache / "slurm_scripts").glob("*/batchscript_*.sh"))
    assert scripts, f"no SLURM batch scripts under {cache}"
    for script in scripts:
        text = script.read_text()
        assert sys.executable in text and "load_and_run" in text, text

    outs = sorted((cache / "slurm_scripts").glob("*/slurm-*.out"))
    job_ids = sorted({re.fullmatch(r"slurm-(\d+)\.out", p.name).group(1) for p in outs})
    assert len(job_ids) == len(scripts), (job_ids, scripts)

    # sacct reads slurmdbd, which slurmctld feeds asynchronously: a record can lag a few seconds behind
    # (its name still "allocation" just after slurmdbd started), so ask again until it is complete.
    deadline = time.monotonic() + 60
    while True:
        acct = _run("sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", "JobID,JobName,State,ExitCode",
                    timeout=30)
        assert acct.returncode == 0, acct.stderr
        rows = [line.split("|") for line in acct.stdout.splitlines() if line.strip()]
        nodes = [r[1].split(".")[0] for r in rows]  # Pydra names a job "<node>.<uid>"
        # register and evaluate once per subject, collect once; all COMPLETED with exit code 0
        if (sorted(r[0] for r in rows) == job_ids and all(r[2:] == ["COMPLETED", "0:0"] for r in rows)
                and sorted(nodes) == ["collect", "evaluate", "evaluate", "register", "register"]):
            break
        assert time.monotonic() < deadline, f"sacct for jobs {job_ids}:\n{acct.stdout}"
        time.sleep(2)


def test_bids_app_participant_level_through_slurm(slurm_cluster, tmp_path):
    """``hdar-pipeline ... participant --worker slurm`` on the phantom BIDS dataset: derivatives and the
    failed subject's row, every step submitted as a SLURM job."""
    from test_bids_app import MARGIN, app_args, before_dice, make_bids_dataset

    from hdar_pipeline.apps.bids_app_cli import bids_app_main

    bids_dir, labels_dir = make_bids_dataset(tmp_path)
    ds = {"bids": bids_dir, "labels": labels_dir}
    out, work = tmp_path / "out", tmp_path / "work"
    args = app_args(ds, out, work, "participant", "--participant-label", "02", "04", "--worker", "slurm",
                    "--slurm-args=--time=00:10:00")
    assert bids_app_main(args) == 3  # sub-04 fails alone
    ok = json.loads((out / "sub-02" / "anat" / "sub-02_space-sub01_desc-demons_metrics.json").read_text())
    bad = json.loads((out / "sub-04" / "anat" / "sub-04_space-sub01_desc-demons_metrics.json").read_text())
    assert ok["status"] == "ok" and ok["metrics"]["mean_dice"] > before_dice(labels_dir, "02") + MARGIN
    assert bad["status"] == "error" and "sub-04_T1w.nii.gz" in bad["error"]
    assert (out / "sub-02" / "anat" / "sub-02_space-sub01_desc-demons_T1w.nii.gz").is_file()
    scripts = list((work / "pydra").rglob("*.sh"))
    assert len(scripts) >= 4, scripts  # register x2, evaluate x2 (+ collect) went through sbatch
    assert bids_app_main(app_args(ds, out, work, "group")) == 0


# ------------------------------------------------------------------------------------------ under faults


def _fault_argv(root, bids_dir, labels_dir) -> list:
    from test_faults import argv

    return [*argv(root, bids_dir, labels_dir, 2), "--worker", "slurm", "--slurm-args=--time=00:10:00"]


def _slurm_job_of(pid: int) -> str:
    """The SLURM job id a process runs in (its ``SLURM_JOB_ID``)."""
    env = dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)
    return env["SLURM_JOB_ID"]


def cancel_slurm_job(pid: int) -> None:
    """``scancel --signal=KILL --full`` the SLURM job that process ``pid`` runs in, as SLURM itself does past
    ``--time`` or ``--mem`` (a ``kill`` for test_faults' Killer)."""
    done = _run("scancel", "--signal=KILL", "--full", _slurm_job_of(pid))
    if done.returncode != 0:
        raise RuntimeError(f"scancel failed: {done.stderr}")


def test_a_registration_killed_inside_its_slurm_job_fails_that_subject_only_and_a_rerun_finishes_it(
        slurm_cluster, tmp_path, capsys):
    """Issue 14 under SLURM: sub-03's registration process is killed (SIGKILL, as the out-of-memory killer
    does) inside its sbatch job. The other subjects finish, sub-03's row says it was killed, and a rerun on the
    same work dir finishes it."""
    from test_bids_app import MARGIN, before_dice, make_bids_dataset
    from test_faults import Killer, statuses
    from test_input_guard import run_cli

    from hdar_pipeline.apps.bids_app_cli import bids_app_main

    bids_dir, labels_dir = make_bids_dataset(tmp_path)
    with Killer(tmp_path / "work", "sub-03", once=True) as killer:
        code, err = run_cli(bids_app_main, _fault_argv(tmp_path, bids_dir, labels_dir), capsys)
    assert killer.killed, "nothing was killed: the test did not test anything"
    assert code == 3 and "Traceback" not in err, err  # 3: failed subjects (sub-04's T1w is corrupt, on purpose)
    rec = statuses(tmp_path / "out")
    assert set(rec) == {"sub-02", "sub-03", "sub-04"}, rec  # every subject has its row
    assert rec["sub-02"]["status"] == "ok"
    assert rec["sub-02"]["metrics"]["mean_dice"] > before_dice(labels_dir, "02") + MARGIN
    assert rec["sub-03"]["status"] == "error" and rec["sub-03"]["failed_step"] == "register", rec["sub-03"]
    assert "killed by SIGKILL" in rec["sub-03"]["error"], rec["sub-03"]["error"]
    assert rec["sub-04"]["status"] == "error" and "cannot be read" in rec["sub-04"]["error"]

    code, err = run_cli(bids_app_main, _fault_argv(tmp_path, bids_dir, labels_dir), capsys)
    assert code == 3 and "Traceback" not in err, err
    again = statuses(tmp_path / "out")
    assert again["sub-02"]["metrics"]["mean_dice"] == rec["sub-02"]["metrics"]["mean_dice"]  # from the cache
    assert again["sub-03"]["status"] == "ok", again["sub-03"]
    assert again["sub-03"]["metrics"]["mean_dice"] > before_dice(labels_dir, "03") + MARGIN
    assert again["sub-04"]["status"] == "error"


def test_a_slurm_job_cancelled_once_is_requeued_and_the_cohort_completes(slurm_cluster, tmp_path, capsys):
    """sub-03's registration job cancelled once by SLURM (a preemption, a node lost): requeued, and every
    subject finishes in the same run."""
    from test_bids_app import MARGIN, before_dice, make_bids_dataset
    from test_faults import Killer, statuses
    from test_input_guard import run_cli

    from hdar_pipeline.apps.bids_app_cli import bids_app_main

    bids_dir, labels_dir = make_bids_dataset(tmp_path)
    with Killer(tmp_path / "work", "sub-03", once=True, kill=cancel_slurm_job) as canceller:
        code, err = run_cli(bids_app_main, _fault_argv(tmp_path, bids_dir, labels_dir), capsys)
    assert canceller.killed, "nothing was cancelled: the test did not test anything"
    assert code == 3 and "Traceback" not in err, err  # sub-04's T1w is corrupt, on purpose
    rec = statuses(tmp_path / "out")
    assert rec["sub-02"]["status"] == rec["sub-03"]["status"] == "ok", rec
    assert rec["sub-03"]["metrics"]["mean_dice"] > before_dice(labels_dir, "03") + MARGIN


def test_a_slurm_job_cancelled_every_time_fails_that_subject_after_one_requeue(slurm_cluster, tmp_path, capsys):
    """sub-03's registration job cancelled at every try (a job that always runs past ``--time`` or ``--mem``):
    requeued once, then recorded as failed, naming the state; the run ends instead of requeueing forever, the
    others finish, and a rerun without the fault finishes sub-03."""
    from test_bids_app import MARGIN, before_dice, make_bids_dataset
    from test_faults import Killer, statuses
    from test_input_guard import run_cli

    from hdar_pipeline.apps.bids_app_cli import bids_app_main

    bids_dir, labels_dir = make_bids_dataset(tmp_path)
    start = time.monotonic()
    with Killer(tmp_path / "work", "sub-03", once=False, kill=cancel_slurm_job) as canceller:
        code, err = run_cli(bids_app_main, _fault_argv(tmp_path, bids_dir, labels_dir), capsys)
    assert len(canceller.killed) == 2, canceller.killed  # the first try and one requeue
    assert code == 3 and "Traceback" not in err, err
    rec = statuses(tmp_path / "out")
    assert set(rec) == {"sub-02", "sub-03", "sub-04"}, rec
    assert rec["sub-02"]["status"] == "ok"
    assert rec["sub-02"]["metrics"]["mean_dice"] > before_dice(labels_dir, "02") + MARGIN
    assert rec["sub-03"]["status"] == "error" and "did not finish" in rec["sub-03"]["error"], rec["sub-03"]
    assert "ended CANCELLED 2 time(s)" in rec["sub-03"]["error"], rec["sub-03"]["error"]
    assert "ended CANCELLED" in err, err
    print(f"a job cancelled at every try: the run ended after {time.monotonic() - start:.0f} s")

    code, err = run_cli(bids_app_main, _fault_argv(tmp_path, bids_dir, labels_dir), capsys)
    assert code == 3 and "Traceback" not in err, err
    again = statuses(tmp_path / "out")
    assert again["sub-03"]["status"] == "ok", again["sub-03"]
    assert again["sub-03"]["metrics"]["mean_dice"] > before_dice(labels_dir, "03") + MARGIN
