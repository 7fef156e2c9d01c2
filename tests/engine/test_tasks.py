"""Pydra tasks (hdar_pipeline.engine.pydra_tasks) and the per-subject library wrappers (hdar_pipeline.pipeline.subject_steps) on a tiny phantom."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("NO_ET", "1")  # Pydra: no telemetry look-ups

pytest.importorskip("pydra")

from conftest import make_brain_phantom, mean_dice  # noqa: E402
from pydra.engine.submitter import Submitter  # noqa: E402

from hdar_pipeline.core.subject_record import SubjectRecord  # noqa: E402
from hdar_pipeline.pipeline import subject_steps as cohort  # noqa: E402
from hdar_pipeline.core.images import Grid, save_image  # noqa: E402
from hdar_pipeline.core.synthetic import make_subject  # noqa: E402
from hdar_pipeline.engine.pydra_tasks import (  # noqa: E402
    ApplyTransform,
    CollectRecords,
    Evaluate,
    EvaluateSubject,
    GroupStatistics,
    Preprocess,
    Register,
    RegisterSubject,
    SubjectReport,
)


def run(task, cache_root):
    """Run one task in this process (the debug worker) and return its outputs; fail on a task error."""
    with Submitter(worker="debug", cache_root=cache_root) as sub:
        result = sub(task)
    assert not result.errored, result
    return result.outputs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 32^3 (3 mm) atlas with labels, one deformed subject and a corrupt T1w, as files."""
    d = tmp_path_factory.mktemp("phantom")
    atlas = make_brain_phantom((32, 32, 32), 3.0)
    subject = make_subject(atlas.image, atlas.labels, seed=1, magnitude_mm=9.0, smoothness_mm=15.0)
    files = {"atlas": save_image(atlas.image, d / "atlas_T1w.nii.gz"),
             "atlas_labels": save_image(atlas.labels, d / "atlas_dseg.nii.gz"),
             "t1w": save_image(subject.image, d / "sub-01_T1w.nii.gz"),
             "labels": save_image(subject.labels, d / "sub-01_dseg.nii.gz"),
             "bad": d / "sub-02_T1w.nii.gz", "cache": d / "cache"}
    files["bad"].write_bytes(b"this is not a NIfTI file")
    return files


@pytest.fixture(scope="module")
def registered(data):
    """Register's outputs (SyN fast, one thread) for the phantom subject."""
    task = Register(fixed=data["atlas"], moving=data["t1w"], moving_labels=data["labels"], method="syn", seed=1,
                    threads=1)
    return run(task, data["cache"])


def test_register_task_writes_record_images_and_transform_into_its_cache_dir(data, registered):
    out_dir = registered.record.fspath.parent
    assert out_dir.parent == data["cache"]  # the task's own output directory
    for f in (registered.warped, registered.warped_labels, registered.transform):
        assert f.fspath.parent == out_dir and f.fspath.exists()
    assert registered.transform.fspath.suffix == ".h5"
    record = json.loads(registered.record.fspath.read_text())
    assert record["method"] == "syn" and record["seed"] == 1 and record["runtime_s"] > 0
    warped = nib.load(registered.warped_labels.fspath)
    assert Grid.of(warped).same_as(Grid.of(nib.load(data["atlas"])))
    before = np.asarray(nib.load(data["labels"]).dataobj)
    after = np.asarray(warped.dataobj)
    assert set(np.unique(after)) <= set(np.unique(before)) and after.any()  # nearest neighbour: no new values


def test_register_task_without_labels_has_no_warped_labels(data):
    out = run(Register(fixed=data["atlas"], moving=data["t1w"], method="affine", seed=1, threads=1), data["cache"])
    assert out.warped_labels is None and out.transform.fspath.exists()


def test_apply_transform_task_reproduces_the_registration_labels(data, registered):
    out = run(ApplyTransform(reference=data["atlas"], moving=data["labels"], transform=registered.transform,
                             interpolation="nearest"), data["cache"])
    again = np.asarray(nib.load(out.warped.fspath).dataobj)
    assert np.array_equal(again, np.asarray(nib.load(registered.warped_labels.fspath).dataobj))


def test_task_inputs_are_hashed_by_content(tmp_path, data, registered):
    """Same path, new content: a new cache entry, not the old result (files are File, not str)."""
    moving = tmp_path / "labels.nii.gz"
    save_image(nib.load(data["labels"]), moving)
    first = run(ApplyTransform(reference=data["atlas"], moving=moving, transform=registered.transform,
                               interpolation="nearest"), data["cache"])
    img = nib.load(data["labels"])
    save_image(nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.int32) * 7, img.affine), moving)
    second = run(ApplyTransform(reference=data["atlas"], moving=moving, transform=registered.transform,
                                interpolation="nearest"), data["cache"])
    assert second.warped.fspath != first.warped.fspath
    assert set(np.unique(np.asarray(nib.load(second.warped.fspath).dataobj))) == {0, 7}


def test_evaluate_task_tables(data, registered):
    out = run(Evaluate(reference_labels=data["atlas_labels"], labels=registered.warped_labels,
                       transform=registered.transform, subject="01", method="syn"), data["cache"])
    labels = pd.read_csv(out.labels_csv.fspath, dtype={"subject": str})
    assert sorted(labels["label"]) == [1, 2, 3, 4]
    assert set(labels["subject"]) == {"01"} and set(labels["method"]) == {"syn"}
    summary = pd.read_csv(out.summary_csv.fspath)
    ref = np.asarray(nib.load(data["atlas_labels"]).dataobj)
    warped = np.asarray(nib.load(registered.warped_labels.fspath).dataobj)
    assert len(summary) == 1 and summary["mean_dice"].iloc[0] == pytest.approx(mean_dice(ref, warped))
    assert summary["folded_percent"].iloc[0] == 0
    assert out.jacobian_csv.fspath.exists()


def test_preprocess_task_puts_the_subject_on_the_atlas_grid(data):
    out = run(Preprocess(t1w=data["t1w"], atlas=data["atlas"], labels=data["labels"], skull_stripped="yes",
                         seed=1, threads=1), data["cache"])
    atlas_grid = Grid.of(nib.load(data["atlas"]))
    image = nib.load(out.preproc.fspath)
    assert Grid.of(image).same_as(atlas_grid)
    values = np.asarray(image.dataobj)
    assert values.min() >= 0 and values.max() <= 1 and values.max() > 0.5
    assert Grid.of(nib.load(out.preproc_labels.fspath)).same_as(atlas_grid)
    assert out.to_atlas.fspath.suffix == ".h5"
    record = json.loads(out.record.fspath.read_text())
    assert any("N4" in step for step in record["steps"])


def test_group_statistics_task(tmp_path, data):
    rng = np.random.default_rng(0)
    rows = [dict(subject=f"{s:02d}", method=m, label=lab, dice=0.7 + 0.05 * (m == "syn") + 0.01 * rng.random(),
                 runtime_s=1.0)
            for s in range(1, 6) for m in ("syn", "demons") for lab in (1, 2)]
    table = tmp_path / "tidy.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    out = run(GroupStatistics(tables=table, reference="syn", figures=False), data["cache"])
    names = {f.fspath.name for f in out.files}
    assert {"summary.tsv", "paired.tsv", "subjects.tsv", "notes.txt"} <= names
    summary = pd.read_csv(out.stats_dir.fspath / "summary.tsv", sep="\t")
    assert set(summary["method"]) == {"syn", "demons"}


def test_cohort_tasks_turn_a_bad_subject_into_an_error_row(data):
    good = run(RegisterSubject(subject="01", t1w=data["t1w"], labels=data["labels"], atlas=data["atlas"],
                               method="affine", seed=1, threads=1), data["cache"])
    bad = run(RegisterSubject(subject="02", t1w=data["bad"], atlas=data["atlas"], method="affine", seed=1,
                              threads=1), data["cache"])  # the task itself does not fail
    bad_record = json.loads(bad.record.fspath.read_text())
    assert bad_record["status"] == "error" and bad_record["failed_step"] == "register"
    assert str(data["bad"].name) in bad_record["error"] and "cannot be read" in bad_record["error"]
    assert bad.warped is None and bad.transform is None

    records = []
    for reg in (good, bad):
        ev = run(EvaluateSubject(record=reg.record, atlas_labels=data["atlas_labels"],
                                 warped_labels=reg.warped_labels, transform=reg.transform), data["cache"])
        records.append(ev.record)
    out = run(CollectRecords(records=records), data["cache"])
    assert out.n_failed == 1
    group = pd.read_csv(out.group_csv.fspath, sep="\t")  # group.tsv: participant_id read back as a string
    assert list(group["participant_id"]) == ["sub-01", "sub-02"] and list(group["status"]) == ["ok", "error"]
    assert list(group["qc_failed"]) == [False, True]
    ref = np.asarray(nib.load(data["atlas_labels"]).dataobj)
    warped = np.asarray(nib.load(good.warped_labels.fspath).dataobj)
    assert group.loc[0, "mean_dice"] == pytest.approx(mean_dice(ref, warped)) and group.loc[0, "evaluated"]
    assert np.isnan(group.loc[1, "mean_dice"]) and "cannot be read" in group.loc[1, "error"]
    labels = pd.read_csv(out.labels_csv.fspath, sep="\t")
    assert (labels["participant_id"] == "sub-01").sum() == 4 and (labels["participant_id"] == "sub-02").sum() == 0
    assert labels["label"].dtype == np.int64


def test_register_subject_reports_a_missing_t1w_without_raising(tmp_path, data):
    record = cohort.register_subject("03", None, data["atlas"], tmp_path, method="syn")
    assert record.status == "error" and "no T1w" in record.error
    assert json.loads((tmp_path / "register_record.json").read_text())["status"] == "error"


def test_evaluate_subject_without_atlas_labels_is_ok_and_unevaluated(tmp_path, data, registered):
    reg = {"subject": "01", "session": "", "method": "syn", "status": "ok", "error": "",
           "warped_labels": str(registered.warped_labels.fspath), "transform": str(registered.transform.fspath)}
    record = cohort.evaluate_subject(reg, tmp_path)
    assert record.ok and record.evaluated is False and record.metrics is None
    assert "metrics" not in json.loads(Path(record.record_file).read_text())


def test_subject_report_task_shows_every_method(data):
    good = run(RegisterSubject(subject="01", t1w=data["t1w"], labels=data["labels"], atlas=data["atlas"],
                               method="affine", seed=1, threads=1), data["cache"])
    failed = SubjectRecord("01", method="demons").failed("register", "ImageError: x.nii.gz: <broken>").write(
        data["cache"].parent / "failed_record.json")
    out = run(SubjectReport(records=[good.record, failed.record_file], atlas=data["atlas"],
                            atlas_labels=data["atlas_labels"], atlas_name="phantom"), data["cache"])
    html = out.report.fspath.read_text()
    assert "affine" in html and "demons" in html and "&lt;broken&gt;" in html and "<broken>" not in html
    svgs = sorted(p.name for p in out.figures.fspath.glob("*.svg"))
    assert svgs == ["sub-01_space-phantom_desc-affine_flicker.svg", "sub-01_space-phantom_desc-affine_jacobian.svg"]
    assert "at the <strong>register</strong> step" in html
    with pytest.raises(ValueError, match="one subject"):
        cohort.report_subject([good.record.fspath, failed.updated(subject="02")], data["cache"].parent / "x.html",
                              atlas=data["atlas"])
