"""What an HPC user reads of a BIDS App run: progress per stage (on a fake Pydra cache), the log file and the
saved command line (issue 15, deliverable 4)."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("NO_ET", "1")
pytest.importorskip("pydra")
pytest.importorskip("bids")

from hdar_pipeline.apps.bids_app import (  # noqa: E402
    AppOptions,
    ProgressWatcher,
    _StageCount,
    save_command,
    setup_logging,
)

T1W, ATLAS = "/data/sub-{}_T1w.nii.gz", "/data/atlas.nii.gz"


def write_record(cache: Path, folder: str, name: str, *, finished: bool = True, mtime: float | None = None,
                 **fields) -> Path:
    """A job folder of a fake Pydra cache with its record (and ``_result.pklz`` when Pydra finished it)."""
    job = cache / folder
    job.mkdir(parents=True, exist_ok=True)
    path = job / f"{name}_record.json"
    subject = fields.get("subject", "")
    path.write_text(json.dumps({"session": "", "status": "ok", "t1w": T1W.format(subject), "atlas": ATLAS,
                                **fields}))
    if finished:
        (job / "_result.pklz").write_bytes(b"")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def jobs_for(expected, presets):
    return {(s, ses, m): {"t1w": T1W.format(s), "atlas": ATLAS, "preset": presets.get(m), "seed": None}
            for s, ses, m in expected}


def test_progress_counts_stages_cached_results_and_writes_one_line_each(tmp_path):
    expected = {(s, "", m) for s in ("02", "03") for m in ("syn", "hdar")}
    jobs = jobs_for(expected, {"hdar": "accurate", "syn": "fast"})
    old = time.time() - 7200
    # an earlier run with this work dir: sub-02 preprocessed and registered with hdar (cached, done at once);
    # sub-03's preprocessing never finished (no _result.pklz: it runs again); sub-02 syn with another preset
    write_record(tmp_path, "prep-a", "preprocess", subject="02", mtime=old)
    prep03 = write_record(tmp_path, "prep-b", "preprocess", subject="03", finished=False, mtime=old)
    write_record(tmp_path, "reg-a", "register", subject="02", method="hdar", preset="accurate", mtime=old)
    write_record(tmp_path, "reg-old", "register", subject="02", method="syn", preset="quality", mtime=old)
    write_record(tmp_path, "reg-x", "register", subject="99", method="syn", mtime=old)  # not this run's
    out = io.StringIO()
    watcher = ProgressWatcher(tmp_path, expected, preprocess=True, jobs=jobs, stream=out, live=False,
                              interval_s=3600)
    assert watcher.done["preprocess"] == {("02", "", "")}
    assert watcher.done["register"] == {("02", "", "hdar")} and not watcher.done["evaluate"]
    watcher.start = time.time() - 10 * 3600  # a run that started long ago: the time left must not come from it
    t0 = time.time() - 1000
    with watcher:
        write_record(tmp_path, "prep-b", "preprocess", subject="03", stage_wall_s={"preprocess": 95.0}, mtime=t0)
        assert prep03.exists() and watcher.poll() == 0
        assert watcher.done["preprocess"] == {("02", "", ""), ("03", "", "")}
        write_record(tmp_path, "reg-b", "register", subject="03", method="syn", preset="fast",
                     stage_wall_s={"register": 8.1}, mtime=t0 + 100)
        watcher.poll()
        write_record(tmp_path, "reg-c", "register", subject="02", method="syn", preset="fast", mtime=t0 + 400)
        write_record(tmp_path, "reg-d", "register", subject="03", method="hdar", status="error",
                     failed_step="register", mtime=t0 + 700)
        assert watcher.poll() == 0
        write_record(tmp_path, "eval-a", "evaluate", subject="03", method="hdar", status="error",
                     failed_step="register", mtime=t0 + 701)
        assert watcher.poll() == 1
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and out.getvalue().endswith("\n")
    assert lines[0] == ("resumed from the work dir: preprocess 1/2 cached; register 1/4 cached; "
                        "evaluate 0/4 cached")
    assert lines[1] == "[2/2 preprocess] sub-03 ok (95.0 s)"
    assert lines[2] == "[2/4 register] sub-03 syn ok (8.1 s)"  # one completion in this run: no estimate
    # 300 s between this run's two completions, one left: 5 min (not 10 h x 2 from the start of the run)
    assert lines[3] == "[3/4 register] sub-02 syn ok; about 5 min left in this stage"
    assert lines[4] == "[4/4 register] sub-03 hdar failed at register"
    assert lines[5] == "[1/4 evaluate] sub-03 hdar failed at register"
    assert lines[6].startswith("progress: preprocess 2/2 (1 cached); register 4/4 (1 cached, 1 failed); "
                               "evaluate 1/4 (1 failed) after ")
    assert len(lines) == 7
    assert watcher.stages["register"].cached == {("02", "", "hdar")}


def test_progress_without_preprocessing_and_without_a_job_description(tmp_path):
    """--no-preprocess: no preprocess stage; without ``jobs`` every finished record at the start is cached."""
    expected = {("02", "", "demons")}
    write_record(tmp_path, "reg", "register", subject="02", method="demons")
    write_record(tmp_path, "eval", "evaluate", subject="02", method="demons")
    out = io.StringIO()
    with ProgressWatcher(tmp_path, expected, stream=out, live=False, interval_s=3600) as watcher:
        assert list(watcher.stages) == ["register", "evaluate"]
        assert watcher.poll() == 1
    assert out.getvalue().splitlines() == [
        "resumed from the work dir: register 1/1 cached; evaluate 1/1 cached",
        out.getvalue().splitlines()[-1]]
    assert out.getvalue().splitlines()[-1].startswith("progress: register 1/1 (1 cached); evaluate 1/1 (1 cached)")


def test_progress_hidden_goes_to_the_log_only(tmp_path, caplog):
    write_record(tmp_path, "reg", "register", subject="02", method="demons")
    out = io.StringIO()
    watcher = ProgressWatcher(tmp_path, {("02", "", "demons")}, show=False, stream=out, live=False)
    with caplog.at_level(logging.INFO, logger="hdar_pipeline.app"):
        write_record(tmp_path, "reg2", "register", subject="02", method="demons")  # already cached: not again
        write_record(tmp_path, "eval", "evaluate", subject="02", method="demons")
        watcher.poll()
    assert out.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == ["[1/1 evaluate] sub-02 demons ok"]


def test_progress_live_bar_on_a_terminal(tmp_path):
    out = io.StringIO()
    with ProgressWatcher(tmp_path, {("02", "", "demons")}, stream=out, live=True, interval_s=3600) as watcher:
        write_record(tmp_path, "reg", "register", subject="02", method="demons")
        watcher.poll()
        assert watcher._progress.tasks[0].completed == 1 and watcher._progress.tasks[1].completed == 0
    assert "register" in out.getvalue() and "[1/1 register]" not in out.getvalue()


@pytest.mark.parametrize("times, done, left", [
    ([], 0, None),                     # nothing finished in this run
    ([100.0], 1, None),                # one completion: no rate yet
    ([100.0, 100.3, 100.5], 3, None),  # a burst of parallel jobs ending together: no rate
    ([100.0, 160.0, 220.0], 3, 7 * 60.0),
    ([100.0, 160.0], 10, 0.0),         # the stage is done
])
def test_time_left_is_per_stage_from_this_runs_completions(times, done, left):
    stage = _StageCount("register", "register_record.json", {(str(i), "", "syn") for i in range(10)})
    stage.done.update(sorted(stage.expected)[:done])
    stage.times.extend(times)
    assert stage.time_left() == left


@pytest.fixture
def app_logging():
    """Undo :func:`setup_logging`'s handlers and levels after the test."""
    root, saved = logging.getLogger(), {n: logging.getLogger(n).level for n in ("", "pydra", "nibabel")}
    yield
    for h in list(root.handlers):
        if getattr(h, "_hdar_app", False):
            root.removeHandler(h)
            h.close()
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def test_log_file_starts_with_the_command_and_keeps_third_party_debug_out(tmp_path, app_logging):
    argv = [str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--participant-label", "01 02", "-vv"]
    path = setup_logging(tmp_path / "out", "participant", 2, argv=argv)
    logging.getLogger("hdar_pipeline.app").debug("APP-DEBUG")
    logging.getLogger("pydra.engine.submitter").debug("PYDRA-DEBUG")  # -vv: pydra logs DEBUG (to the console)
    logging.getLogger("pydra.engine.submitter").info("PYDRA-INFO")
    logging.getLogger("nibabel.global").info("NIBABEL-INFO")
    logging.getLogger("urllib3.connectionpool").debug("URLLIB-DEBUG")
    logging.getLogger("somelibrary").warning("LIBRARY-WARNING")
    logging.getLogger().info("ROOT-INFO")
    for h in logging.getLogger().handlers:
        h.flush()
    text = path.read_text()
    assert path.parent == tmp_path / "out" / "logs"
    assert text.splitlines()[0] == (f"# command: hdar-pipeline {tmp_path / 'bids'} {tmp_path / 'out'} participant "
                                    "--participant-label '01 02' -vv")
    assert "APP-DEBUG" in text and "LIBRARY-WARNING" in text
    for noise in ("PYDRA-DEBUG", "PYDRA-INFO", "NIBABEL-INFO", "URLLIB-DEBUG", "ROOT-INFO"):
        assert noise not in text, noise


def test_command_json_holds_argv_and_the_resolved_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opts = AppOptions(bids_dir=Path("bids"), output_dir=tmp_path / "out", analysis_level="participant",
                      participant_label=["01"], labels_dir=Path("labels"), methods=["demons"], seed=1)
    logfile = tmp_path / "out" / "logs" / "hdar-pipeline_participant_20250101-120000.log"
    logfile.parent.mkdir(parents=True)
    argv = ["bids", str(tmp_path / "out"), "participant", "--participant-label", "01", "--seed", "1"]
    path = save_command(logfile, opts, argv)
    assert path == logfile.parent / "hdar-pipeline_participant_20250101-120000_command.json"
    saved = json.loads(path.read_text())
    assert saved["argv"] == argv
    assert saved["command"] == f"hdar-pipeline bids {tmp_path / 'out'} participant --participant-label 01 --seed 1"
    options = saved["options"]
    assert options["bids_dir"] == str(tmp_path / "bids") and options["labels_dir"] == str(tmp_path / "labels")
    assert options["work_dir"] == str(tmp_path / "work") and options["methods"] == ["demons"]
    assert options["seed"] == 1 and options["atlas"] is None and options["participant_label"] == ["01"]
    assert set(options) >= {"hdar_preset", "syn_preset", "worker", "nprocs", "preprocess"}
    from hdar_pipeline import __version__

    assert saved["version"] == __version__ and saved["host"] and saved["time"][:2] == "20"
    assert saved["log"] == logfile.name


def test_a_cached_result_whose_upstream_runs_again_waits(tmp_path):
    """sub-02's preprocessing runs again (its killed job's folder was cleared): its cached registration is not
    done at the start; it counts once, when its new record comes. sub-03's registration (its preprocessing
    cached) is done at once; its evaluation, whose registration is deferred, counts at the end."""
    expected = {("02", "", "demons"), ("03", "", "demons")}
    old = time.time() - 7200
    write_record(tmp_path, "reg-02", "register", subject="02", method="demons", mtime=old)
    write_record(tmp_path, "prep-03", "preprocess", subject="03", mtime=old)
    write_record(tmp_path, "reg-03", "register", subject="03", method="demons", mtime=old)
    write_record(tmp_path, "eval-02", "evaluate", subject="02", method="demons", mtime=old)
    out = io.StringIO()
    with ProgressWatcher(tmp_path, expected, preprocess=True, stream=out, live=False, interval_s=3600) as watcher:
        assert watcher.done["register"] == {("03", "", "demons")} and not watcher.done["evaluate"]
        write_record(tmp_path, "prep-02", "preprocess", subject="02")
        write_record(tmp_path, "reg-02b", "register", subject="02", method="demons")
        watcher.poll()
        assert watcher.done["register"] == set(expected) and watcher.stages["register"].cached == {("03", "", "demons")}
        assert not watcher.done["evaluate"]
    assert watcher.done["evaluate"] == {("02", "", "demons")}  # no new record came: Pydra used the cached one
    lines = out.getvalue().splitlines()
    assert [line for line in lines if line.startswith("[")] == ["[2/2 preprocess] sub-02 ok",
                                                                 "[2/2 register] sub-02 demons ok"]
    assert lines[-1].startswith("progress: preprocess 2/2 (1 cached); register 2/2 (1 cached); "
                                "evaluate 1/2 (1 cached)")
