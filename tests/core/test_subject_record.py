"""The per-subject record (hdar_pipeline.core.subject_record): the typed contract between the pipeline steps, the
workflows, BIDS writing and the reports."""

import json

import pytest

from hdar_pipeline.core.subject_record import RecordError, SubjectRecord, as_record


def test_a_record_round_trips_through_its_json_file(tmp_path):
    rec = SubjectRecord("01", "pre", "hdar", "accurate", t1w="/data/sub-01_T1w.nii.gz", runtime_s=4.5,
                        metrics={"mean_dice": 0.73}, stage_wall_s={"register": 5.0}, evaluated=True)
    written = rec.write(tmp_path / "deep" / "register_record.json")
    assert written.record_file == str((tmp_path / "deep" / "register_record.json").resolve())
    data = json.loads((tmp_path / "deep" / "register_record.json").read_text())
    # identity and status always; the rest only where set, in the record's field order
    assert list(data)[:7] == ["subject", "session", "method", "preset", "status", "error", "failed_step"]
    assert "warped" not in data and data["metrics"] == {"mean_dice": 0.73}
    back = SubjectRecord.read(written.record_file)
    assert back == rec and back.record_file == written.record_file
    assert as_record(data) == rec and as_record(written.record_file) == rec and as_record(back) is back
    assert back.key == ("01", "pre", "hdar") and back.ok


def test_a_failure_keeps_the_inputs_and_says_where_and_why():
    rec = SubjectRecord("02", t1w="/data/sub-02_T1w.nii.gz").failed("preprocess", "ImageError: x: bad",
                                                                     traceback="tb")
    assert not rec.ok and rec.status == "error" and rec.failed_step == "preprocess" and rec.error.endswith("bad")
    assert rec.t1w == "/data/sub-02_T1w.nii.gz" and rec.traceback == "tb"
    with pytest.raises(TypeError):
        rec.updated(no_such_field=1)


def test_a_file_that_is_no_record_of_this_version_is_refused_with_its_name(tmp_path):
    other = tmp_path / "register_record.json"
    other.write_text(json.dumps({"subject": "01", "status": "ok", "dice": 0.7}))
    with pytest.raises(RecordError, match=r"register_record\.json.*unknown field\(s\) dice"):
        SubjectRecord.read(other)
    other.write_text("[1, 2]")
    with pytest.raises(RecordError, match="not a JSON object"):
        SubjectRecord.read(other)
    with pytest.raises(RecordError, match="cannot read"):
        SubjectRecord.read(tmp_path / "missing.json")


def test_stop_on_first_crash_is_an_input_of_every_per_subject_task():
    """The BIDS App's --stop-on-first-crash reaches the jobs as a task input (in Pydra's cache key), never through an
    environment variable."""
    pytest.importorskip("pydra")
    import inspect

    from hdar_pipeline.engine import pydra_tasks
    from hdar_pipeline.pipeline import subject_steps

    for task in (pydra_tasks.PreprocessSubject, pydra_tasks.RegisterSubject, pydra_tasks.EvaluateSubject):
        assert inspect.signature(task).parameters["stop_on_first_crash"].default is False
    for fn in (subject_steps.preprocess_subject, subject_steps.register_subject, subject_steps.evaluate_subject):
        assert inspect.signature(fn).parameters["stop_on_first_crash"].default is False
    assert "environ" not in inspect.getsource(subject_steps)


def test_the_steps_raise_only_when_asked(tmp_path):
    from hdar_pipeline.pipeline.subject_steps import register_subject

    rec = register_subject("03", None, tmp_path / "atlas.nii.gz", tmp_path, method="affine", isolate=False)
    assert rec.failed_step == "register" and "no T1w image" in rec.error
    with pytest.raises(ValueError, match="no T1w image"):
        register_subject("03", None, tmp_path / "atlas.nii.gz", tmp_path, method="affine", isolate=False,
                         stop_on_first_crash=True)
