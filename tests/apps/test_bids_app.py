"""The ``hdar-pipeline`` BIDS App on a small phantom BIDS dataset (participant and group levels).

The dataset: sub-01 (the atlas participant), sub-02 and sub-03 (deformed copies with labels) and
sub-04 whose T1w is corrupt; a labels derivatives dataset with each subject's dseg.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("NO_ET", "1")
pytest.importorskip("pydra")
pytest.importorskip("bids")

from conftest import make_brain_phantom, unregistered_dice, write_json  # noqa: E402

from hdar_pipeline.bids_io.inputs import BIDSError, check_label, find_bids_subjects  # noqa: E402
from hdar_pipeline.bids_io.outputs import derivative_path
from hdar_pipeline.apps.bids_app_cli import bids_app_main  # noqa: E402
from hdar_pipeline.core.images import save_image  # noqa: E402
from hdar_pipeline.core.synthetic import make_subject  # noqa: E402

SPACE = "sub01"
# Demons must beat the unregistered labels by this much on every phantom subject
MARGIN = 0.02


def make_bids_dataset(root: Path, *, magnitude_mm: float = 14.0) -> tuple[Path, Path]:
    """A 4-subject phantom BIDS dataset and its labels derivatives; returns (bids_dir, labels_dir).

    ``magnitude_mm``: how far the subjects' deformations move them from the atlas participant."""
    bids_dir, labels_dir = root / "rawdata", root / "labels"
    write_json(bids_dir / "dataset_description.json", {"Name": "phantoms", "BIDSVersion": "1.9.0"})
    (bids_dir / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\nsub-03\nsub-04\n")
    (bids_dir / "README").write_text("Phantom dataset for the hdar-pipeline tests.\n")
    write_json(labels_dir / "dataset_description.json",
                {"Name": "labels", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                 "GeneratedBy": [{"Name": "manual"}]})
    (labels_dir / "dseg.tsv").write_text("index\tname\n1\touter\n2\tmiddle\n3\tinner\n4\tventricles\n")
    atlas = make_brain_phantom((32, 32, 32), 3.0)
    for i, sub in enumerate(("01", "02", "03")):
        if sub == "01":
            image, labels = atlas.image, atlas.labels
        else:
            # 14 mm: far enough from the atlas that a registration has a clear margin to gain over none
            # (at 8 mm sub-02 was within 0.002 Dice of the atlas labels unregistered)
            s = make_subject(atlas.image, atlas.labels, seed=20 + i, magnitude_mm=magnitude_mm, smoothness_mm=15.0)
            image, labels = s.image, s.labels
        save_image(image, bids_dir / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz")
        save_image(labels, labels_dir / f"sub-{sub}" / "anat" / f"sub-{sub}_dseg.nii.gz")
    bad = bids_dir / "sub-04" / "anat" / "sub-04_T1w.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x1f\x8b truncated gzip, not an image")
    return bids_dir, labels_dir


def before_dice(labels_dir: Path, sub: str) -> float:
    """The subject's labels against the atlas participant's, unregistered (same phantom grid)."""
    return unregistered_dice(labels_dir / "sub-01" / "anat" / "sub-01_dseg.nii.gz",
                             labels_dir / f"sub-{sub}" / "anat" / f"sub-{sub}_dseg.nii.gz")


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def app_args(ds, out: Path, work: Path, *extra: str) -> list[str]:
    return [str(ds["bids"]), str(out), *extra, "--atlas-participant", "01", "--labels-dir", str(ds["labels"]),
            "--methods", "demons", "--work-dir", str(work), "--nprocs", "2", "--omp-nthreads", "1", "--seed", "1",
            "--no-preprocess", "--no-progress"]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("bidsapp")
    bids_dir, labels_dir = make_bids_dataset(root)
    return {"root": root, "bids": bids_dir, "labels": labels_dir, "before": tree_digest(bids_dir)}


@pytest.fixture(scope="module")
def participant_run(ds):
    out, work = ds["root"] / "derivatives", ds["root"] / "work"
    start = time.perf_counter()
    code = bids_app_main(app_args(ds, out, work, "participant"))
    return {"code": code, "out": out, "work": work, "seconds": time.perf_counter() - start}


@pytest.fixture(scope="module")
def group_run(ds, participant_run):
    code = bids_app_main(app_args(ds, participant_run["out"], participant_run["work"], "group"))
    return {"code": code, "group": participant_run["out"] / "group"}


def test_participant_level_writes_bids_derivatives(ds, participant_run):
    out = participant_run["out"]
    assert participant_run["code"] == 3  # finished, with one failed subject
    for sub in ("02", "03"):
        t1w = derivative_path(out, sub, space=SPACE, desc="demons", suffix="T1w", extension=".nii.gz")
        xfm = derivative_path(out, sub, from_="T1w", to=SPACE, mode="image", desc="demons", suffix="xfm",
                              extension=".h5")
        dseg = derivative_path(out, sub, space=SPACE, desc="demons", suffix="dseg", extension=".nii.gz")
        assert t1w.name == f"sub-{sub}_space-{SPACE}_desc-demons_T1w.nii.gz"
        assert xfm.name == f"sub-{sub}_from-T1w_to-{SPACE}_mode-image_desc-demons_xfm.h5"
        for path in (t1w, xfm, dseg):
            assert path.is_file(), path
            sidecar = json.loads(path.with_name(path.name.split(".")[0] + ".json").read_text())
            assert sidecar["Method"] == "demons" and sidecar["Seed"] == 1
            assert sidecar["RuntimeSeconds"] > 0 and sidecar["PeakMemoryMB"] > 0
            assert "SimpleITK" in sidecar["Versions"]
        assert nib.load(t1w).shape == (32, 32, 32)
        metrics = json.loads(derivative_path(out, sub, space=SPACE, desc="demons", suffix="metrics",
                                             extension=".json").read_text())
        assert metrics["status"] == "ok"
        assert metrics["metrics"]["mean_dice"] > before_dice(ds["labels"], sub) + MARGIN, sub
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "hdar-pipeline" and desc["GeneratedBy"][0]["Version"]
    # no machine path as CodeURL (the package has no public URL in its metadata yet: the field is left out)
    assert "file:" not in desc["GeneratedBy"][0].get("CodeURL", "")
    assert desc["DatasetLinks"]["raw"] == ds["bids"].resolve().as_uri()
    assert desc["DatasetLinks"]["labels"] == ds["labels"].resolve().as_uri()
    assert (out / ".bidsignore").read_text().splitlines()[0] == "logs/"
    # the atlas every subject was registered to, inside the derivatives, named by the sidecars
    side = json.loads(derivative_path(out, "02", space=SPACE, desc="demons", suffix="T1w",
                                      extension=".json").read_text())
    assert side["SpatialReference"] == f"bids::tpl-{SPACE}/tpl-{SPACE}_T1w.nii.gz"
    assert (out / f"tpl-{SPACE}" / f"tpl-{SPACE}_T1w.nii.gz").is_file()
    assert side["Sources"] == ["bids:raw:sub-02/anat/sub-02_T1w.nii.gz"]
    # the failed subject: a metrics record with its error, no images
    bad = json.loads(derivative_path(out, "04", space=SPACE, desc="demons", suffix="metrics",
                                     extension=".json").read_text())
    assert bad["status"] == "error" and "sub-04_T1w.nii.gz" in bad["error"]
    assert not derivative_path(out, "04", space=SPACE, desc="demons", suffix="T1w", extension=".nii.gz").exists()
    # the atlas participant is not registered to itself
    assert not (out / "sub-01").exists()


def test_derivatives_are_valid_bids(participant_run):
    import bids

    layout = bids.BIDSLayout(participant_run["out"], validate=False, is_derivative=True)
    files = layout.get(suffix="T1w", desc="demons", extension=".nii.gz")
    assert sorted(f.entities["subject"] for f in files) == ["02", "03"]
    assert all(f.entities["space"] == SPACE for f in files)


def test_warped_labels_agree_with_the_atlas_labels(ds, participant_run):
    out = participant_run["out"]
    atlas = np.asarray(nib.load(ds["labels"] / "sub-01" / "anat" / "sub-01_dseg.nii.gz").dataobj)
    for sub in ("02", "03"):
        warped = np.asarray(nib.load(derivative_path(out, sub, space=SPACE, desc="demons", suffix="dseg",
                                                     extension=".nii.gz")).dataobj)
        native = np.asarray(nib.load(ds["labels"] / f"sub-{sub}" / "anat" / f"sub-{sub}_dseg.nii.gz").dataobj)
        inter = np.logical_and(atlas > 0, warped > 0).sum()
        before = 2 * np.logical_and(atlas > 0, native > 0).sum() / ((atlas > 0).sum() + (native > 0).sum())
        after = 2 * inter / ((atlas > 0).sum() + (warped > 0).sum())
        assert after > before


def test_reports_log_and_methods(participant_run):
    out = participant_run["out"]
    for sub in ("02", "03", "04"):
        html = (out / f"sub-{sub}.html").read_text()
        assert "demons" in html
    assert "error" in (out / "sub-04.html").read_text().lower()
    figures = sorted(p.name for p in (out / "sub-02" / "figures").iterdir())
    assert figures == [f"sub-02_space-{SPACE}_desc-demons_flicker.svg", f"sub-02_space-{SPACE}_desc-demons_jacobian.svg"]
    report = (out / "sub-02.html").read_text()
    assert report.count('<table class="metrics">') == 1
    assert '<object class="svg-reportlet"' in report and "Device (as run)</th><td class=\"num\">cpu" in report
    # the command line of the run and its methods text, in the report
    assert "hdar-pipeline " in report and " participant " in report and "--methods demons" in report
    assert "Vercauteren" in report and ">CITATION.bib</a>" in report
    # --no-preprocess: no brain mask and no affine-only image to show, and the report says so
    assert "brain-mask" not in report and "no before/after figure" in report
    sub04 = (out / "sub-04.html").read_text()
    assert 'class="error"' in sub04 and "sub-04_T1w.nii.gz" in sub04
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "Demons" in citation or "demons" in citation
    assert "Vercauteren" in citation and "Huang" not in citation  # only what ran is cited
    bib = (out / "logs" / "CITATION.bib").read_text()
    assert "@article{vercauteren2009," in bib and "huang2021" not in bib
    logs = list((out / "logs").glob("hdar-pipeline_participant_*.log"))
    assert logs and "sub-04" in logs[0].read_text()
    # the command line heads the log, and with the resolved options is saved beside it
    assert logs[0].read_text().startswith("# command: hdar-pipeline ")
    command = json.loads(logs[0].with_name(logs[0].stem + "_command.json").read_text())
    assert command["argv"][2] == "participant" and command["options"]["methods"] == ["demons"]
    assert command["options"]["work_dir"] == str(participant_run["work"].resolve())


def test_input_dataset_untouched(ds, participant_run, group_run):
    assert tree_digest(ds["bids"]) == ds["before"]


def test_group_level_pools_every_subject(ds, group_run):
    assert group_run["code"] == 0
    group = pd.read_csv(group_run["group"] / "group.tsv", sep="\t")  # BIDS TSV: ids read back as strings
    assert sorted(group["participant_id"]) == ["sub-02", "sub-03", "sub-04"]
    status = dict(zip(group["participant_id"], group["status"]))
    assert status == {"sub-02": "ok", "sub-03": "ok", "sub-04": "error"}
    assert "sub-04_T1w.nii.gz" in group.loc[group["participant_id"] == "sub-04", "error"].iloc[0]
    assert group["qc_failed"].tolist() == [False, False, True]
    for sub, dice in group.loc[group["status"] == "ok", ["participant_id", "mean_dice"]].itertuples(index=False):
        assert dice > before_dice(ds["labels"], sub[4:]) + MARGIN, sub
    labels = pd.read_csv(group_run["group"] / "group_labels.tsv", sep="\t")
    assert labels["label"].dtype == np.int64 and set(labels["label"]) == {1, 2, 3, 4}
    assert set(labels["participant_id"]) == {"sub-02", "sub-03"} and labels["name"].notna().all()
    assert (group_run["group"] / "summary.tsv").is_file() and (group_run["group"] / "group.html").is_file()


def test_rerun_with_the_same_work_dir_is_cached(ds, participant_run):
    out = participant_run["out"]
    before = tree_digest(out / "sub-02")
    start = time.perf_counter()
    code = bids_app_main(app_args(ds, out, participant_run["work"], "participant"))
    seconds = time.perf_counter() - start
    assert code == 3
    assert tree_digest(out / "sub-02") == before
    # the resumed run counts the cached results as done (sub-04's failure included), and says so in its log
    log = max((out / "logs").glob("hdar-pipeline_participant_*.log"), key=lambda p: p.stat().st_mtime).read_text()
    assert "resumed from the work dir: register 3/3 cached; evaluate 3/3 cached" in log
    assert "progress: register 3/3 (3 cached, 1 failed); evaluate 3/3 (3 cached, 1 failed)" in log
    assert seconds < participant_run["seconds"] / 2, (seconds, participant_run["seconds"])


def test_reports_only(ds, participant_run):
    html = participant_run["out"] / "sub-02.html"
    html.unlink()
    code = bids_app_main(app_args(ds, participant_run["out"], participant_run["work"], "participant",
                                  "--reports-only"))
    assert code == 0 and html.is_file()


@pytest.mark.parametrize("label", ["../01", "01/anat", "sub-0 1", ""])
def test_bad_participant_labels_are_refused(ds, tmp_path, label, capsys):
    code = bids_app_main(app_args(ds, tmp_path / "out", tmp_path / "work", "participant",
                                  "--participant-label", label))
    assert code == 2
    assert "invalid participant label" in capsys.readouterr().err


def test_unknown_participant_and_output_inside_input(ds, tmp_path, capsys):
    assert bids_app_main(app_args(ds, tmp_path / "out", tmp_path / "work", "participant",
                                  "--participant-label", "99")) == 2
    assert "sub-99 not found" in capsys.readouterr().err
    assert bids_app_main(app_args(ds, ds["bids"] / "derivatives" / "x", tmp_path / "work", "participant")) == 2
    assert "inside the input dataset" in capsys.readouterr().err
    assert not (ds["bids"] / "derivatives").exists()


def test_bids_filter_file(ds, tmp_path):
    good = tmp_path / "filter.json"
    good.write_text(json.dumps({"t1w": {"acquisition": "nothing"}}))
    from hdar_pipeline.bids_io.inputs import load_bids_filter

    cohort = find_bids_subjects(ds["bids"], bids_filter=load_bids_filter(good))
    assert all(e.t1w is None for e in cohort)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"bold": {}}))
    with pytest.raises(BIDSError, match="bad.json"):
        load_bids_filter(bad)


def test_find_bids_subjects_finds_images_and_labels(ds):
    cohort = find_bids_subjects(ds["bids"], labels_dir=ds["labels"], exclude=["01"])
    assert [e.id for e in cohort] == ["02", "03", "04"]
    assert all(e.t1w is not None for e in cohort)
    assert [e.labels is not None for e in cohort] == [True, True, False]


def test_check_label():
    assert check_label("sub-01") == "01" and check_label("ABC7") == "ABC7"
    assert check_label("ses-pre", "session") == "pre"
    for bad in ("../x", "a_b", "a-b", ""):
        with pytest.raises(BIDSError):
            check_label(bad)


def test_stop_on_first_crash(ds, participant_run, tmp_path):
    env = dict(os.environ)
    for work in (tmp_path / "work", participant_run["work"]):  # a fresh run, and a failure cached earlier
        code = bids_app_main(app_args(ds, tmp_path / "out", work, "participant", "--participant-label", "04",
                                      "--stop-on-first-crash"))
        assert dict(os.environ) == env  # the flag reaches the jobs as a task input, not through the environment
        assert code == 1
        assert not (tmp_path / "out" / "sub-04").exists()


def test_one_subject_gets_every_core_in_one_job(ds, tmp_path):
    """Without --nprocs the App runs no more processes than it has jobs: one subject x one method is one job
    with every usable core (before: as many one-thread processes as cores, all but one idle)."""
    from hdar_pipeline.core.runtime import usable_cpus

    args = app_args(ds, tmp_path / "out", tmp_path / "work", "participant", "--participant-label", "02")
    for option in ("--nprocs", "--omp-nthreads"):  # the option and its value
        del args[args.index(option):args.index(option) + 2]
    assert bids_app_main(args) == 0
    run = json.loads((tmp_path / "out" / "logs" / "participant_timings.json").read_text())
    assert run["nprocs"] == 1 and run["threads_per_job"] == usable_cpus() and run["subjects"] == 1
    assert set(run["seconds"]) == {"workflow", "derivatives", "reports", "citation"}
    metrics = json.loads(derivative_path(tmp_path / "out", "02", space=SPACE, desc="demons", suffix="metrics",
                                         extension=".json").read_text())
    assert set(metrics["timing_s"]["steps"]) == {"register", "evaluate"}  # --no-preprocess
    assert {"read", "register", "write"} <= set(metrics["timing_s"]["register"])


def test_reports_are_drawn_one_at_a_time_when_the_process_pool_breaks(ds, participant_run, monkeypatch, caplog):
    """A pool that cannot run (a spawned process that cannot import the caller's __main__, killed workers) must not
    cost the reports: they are drawn in this process instead, every one of them."""
    import concurrent.futures
    from concurrent.futures.process import BrokenProcessPool

    from hdar_pipeline.apps import bids_app

    class Broken:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, *a, **k):
            raise BrokenProcessPool("a process in the pool was terminated abruptly")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Broken)
    out = participant_run["out"]
    for html in out.glob("sub-*.html"):
        html.unlink()
    opts = bids_app.AppOptions(bids_dir=ds["bids"], output_dir=out, analysis_level="participant",
                               atlas_participant="01", labels_dir=ds["labels"], work_dir=participant_run["work"],
                               preprocess=False, skip_bids_validation=True)
    written = bids_app.write_reports(out, bids_app.resolve_atlas(opts), opts, jobs=2)
    assert sorted(p.name for p in written) == ["sub-02.html", "sub-03.html", "sub-04.html"]
    assert all(p.is_file() for p in written) and "one at a time" in caplog.text
