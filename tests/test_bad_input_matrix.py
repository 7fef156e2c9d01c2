"""Issue 14: every command x every kind of bad input, refused before the work.

Commands: ``hdar register`` (FIXED, MOVING, ``--moving-labels``, ``--fixed-mask``), ``hdar evaluate``
(REFERENCE_LABELS, LABELS, ``--mask``), ``hdar stats`` (TABLES) and the ``hdar-pipeline`` BIDS App
(``--atlas``, ``--atlas-labels``), plus the output argument of each. Each case fails if the command exits
0, prints a traceback or more than one line, does not name the bad file, runs a registration, or changes
a byte of any input.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hdar_pipeline.apps.bids_app_cli import bids_app_main
from hdar_pipeline.apps.cli import main
from hdar_pipeline.core.images import new_image, save_image

from test_input_guard import assert_one_line_refusal, digest, run_cli, zero_pixdim_copy
from test_synthetic import ball_phantom

IMAGE_KINDS = ["missing", "folder", "truncated gzip", "empty file", "not an image", "4-D", "NaN", "all zero",
               "zero pixdim"]
LABEL_KINDS = IMAGE_KINDS + ["float labels", "negative labels", "another grid"]


def make_bad(kind: str, good: Path, folder: Path) -> Path:
    """A bad version of the image ``good`` (same name pattern, in ``folder``)."""
    path = folder / f"bad_{kind.replace(' ', '_').replace('-', '')}_{good.name}"
    img = nib.load(str(good))
    data = np.asarray(img.dataobj)
    if kind == "missing":
        return path
    if kind == "folder":
        path.mkdir()
        return path
    if kind == "truncated gzip":
        path.write_bytes(good.read_bytes()[:200])
    elif kind == "empty file":
        path.write_bytes(b"")
    elif kind == "not an image":
        path.write_bytes(gzip.compress(b"subject,dice\n01,0.7\n"))
    elif kind == "4-D":
        nib.save(nib.Nifti1Image(np.stack([data] * 3, -1), img.affine), str(path))
    elif kind == "NaN":
        bad = data.astype(np.float32)
        bad[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(bad, img.affine), str(path))
    elif kind == "all zero":
        nib.save(nib.Nifti1Image(np.zeros_like(data), img.affine), str(path))
    elif kind == "zero pixdim":
        zero_pixdim_copy(good, path)
    elif kind == "float labels":
        nib.save(nib.Nifti1Image(data.astype(np.float32) + 0.4, img.affine), str(path))
    elif kind == "negative labels":
        nib.save(nib.Nifti1Image(-data.astype(np.int16), img.affine), str(path))
    elif kind == "another grid":
        nib.save(nib.Nifti1Image(data[:-3], img.affine), str(path))
    else:  # pragma: no cover
        raise ValueError(kind)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("matrix")
    image, labels = ball_phantom()
    moving = new_image(np.roll(np.asarray(image.dataobj), 2, axis=0), image)
    return {"fixed": save_image(image, folder / "fixed.nii.gz"),
            "moving": save_image(moving, folder / "moving.nii.gz"),
            "labels": save_image(labels, folder / "labels_dseg.nii.gz"),
            "mask": save_image(new_image((np.asarray(labels.dataobj) > 0).astype(np.uint8), labels),
                               folder / "mask.nii.gz")}


@pytest.fixture()
def no_registration(monkeypatch):
    import hdar_pipeline.methods as methods

    def forbidden(*args, **kwargs):
        raise AssertionError("a registration ran before the refusal")

    monkeypatch.setattr(methods, "register_pair", forbidden)


def register_argv(f, out, **slot):
    argv = ["register", slot.get("FIXED", f["fixed"]), slot.get("MOVING", f["moving"]), "-o", out,
            "--method", "demons", "--no-affine", "--moving-labels", slot.get("--moving-labels", f["labels"]),
            "--fixed-mask", slot.get("--fixed-mask", f["mask"])]
    return argv


def evaluate_argv(f, out, **slot):
    return ["evaluate", slot.get("REFERENCE_LABELS", f["labels"]), slot.get("LABELS", f["labels"]), "-o", out,
            "--mask", slot.get("--mask", f["mask"]), "--no-figures"]


CASES = (
    [("register", s, k) for s in ("FIXED", "MOVING") for k in IMAGE_KINDS]
    + [("register", s, k) for s in ("--moving-labels", "--fixed-mask") for k in LABEL_KINDS]
    + [("evaluate", "REFERENCE_LABELS", k) for k in LABEL_KINDS]
    + [("evaluate", s, k) for s in ("LABELS", "--mask") for k in LABEL_KINDS if k != "all zero"]
)


@pytest.mark.parametrize("command, slot, kind", CASES, ids=[f"{c}-{s}-{k}" for c, s, k in CASES])
def test_bad_input_is_refused_before_the_work(files, tmp_path, capsys, no_registration, command, slot, kind):
    good = files["fixed"] if slot in ("FIXED", "MOVING") else files["mask"] if "mask" in slot else files["labels"]
    bad = make_bad(kind, good, tmp_path)
    before = digest(*files.values(), tmp_path)
    out = tmp_path / "out"
    argv = (register_argv if command == "register" else evaluate_argv)(files, out if command == "register"
                                                                       else out / "eval.csv", **{slot: bad})
    code, err = run_cli(main, argv, capsys)
    assert_one_line_refusal(code, err, bad.name)
    assert digest(*files.values(), tmp_path) == before
    assert not out.exists() or not any(out.iterdir())


OUTPUT_KINDS = ["an existing file", "under a file", "over an input", "read-only system folder"]


def bad_output(kind: str, folder: Path, command: str, f) -> tuple[Path, str]:
    """(-o value, text the refusal must name)."""
    if kind == "an existing file":
        if command == "evaluate":  # -o names the CSV: rewriting an earlier output is fine, a folder is not
            p = folder / "existing.csv"
            p.mkdir()
            (p / "keep.txt").write_text("keep")
            return p, p.name
        p = folder / "existing.txt"
        p.write_text("keep")
        return p, p.name
    if kind == "under a file":
        (folder / "blocker").write_text("x")
        return folder / "blocker" / "out", "blocker"
    if kind == "read-only system folder":
        return Path("/sys/hdar-pipeline-matrix"), "/sys/hdar-pipeline-matrix"
    # over an input: the output names of each command, where an input already lies
    if command == "register":
        return f["moving"].parent, "warped_labels.nii.gz"  # --moving-labels is given as out/warped_labels...
    if command == "evaluate":
        return f["labels"].parent / "labels_dseg.csv", "labels_dseg"
    return f["labels"].parent, "summary.csv"


@pytest.mark.parametrize("command", ["register", "evaluate", "stats"])
@pytest.mark.parametrize("kind", OUTPUT_KINDS)
def test_bad_output_is_refused_before_the_work(files, tmp_path, capsys, no_registration, command, kind):
    inputs = dict(files)
    if kind == "over an input":
        # an input exactly where the command writes: register's warped_labels.nii.gz, evaluate's
        # <OUT>_summary.csv, stats' summary.csv
        (tmp_path / "in").mkdir()
        inputs = {k: save_image(nib.load(str(v)), tmp_path / "in" / v.name) for k, v in files.items()}
        if command == "register":
            inputs["labels"] = save_image(nib.load(str(files["labels"])), tmp_path / "in" / "warped_labels.nii.gz")
    table = tmp_path / "in" / "summary.csv" if kind == "over an input" else tmp_path / "t.csv"
    table.parent.mkdir(exist_ok=True)
    table.write_text("subject,method,label,dice\n01,a,1,0.5\n01,b,1,0.6\n02,a,1,0.4\n02,b,1,0.7\n")
    if command == "evaluate" and kind == "over an input":
        (tmp_path / "in" / "labels_dseg_summary.csv").write_text("an input table\n")
        extra = ["--label-table", str(tmp_path / "in" / "labels_dseg_summary.csv")]
    else:
        extra = []
    out, needle = bad_output(kind, tmp_path, command, inputs)
    before = digest(tmp_path)
    if command == "register":
        argv = register_argv(inputs, out)
    elif command == "evaluate":
        argv = [*evaluate_argv(inputs, out), *extra]
    else:
        argv = ["stats", table, "-o", out, "--no-figures"]
    code, err = run_cli(main, argv, capsys)
    assert_one_line_refusal(code, err, needle)
    assert digest(tmp_path) == before


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    pytest.importorskip("pydra")
    pytest.importorskip("bids")
    from test_bids_app import make_bids_dataset

    root = tmp_path_factory.mktemp("matrix_app")
    bids_dir, labels_dir = make_bids_dataset(root)
    atlas = root / "atlas"
    atlas.mkdir()
    image = bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    lab = labels_dir / "sub-01" / "anat" / "sub-01_dseg.nii.gz"
    return {"bids": bids_dir, "labels": labels_dir, "atlas": save_image(nib.load(str(image)), atlas / "atlas_T1w.nii.gz"),
            "atlas_labels": save_image(nib.load(str(lab)), atlas / "atlas_dseg.nii.gz")}


APP_CASES = [("--atlas", k) for k in IMAGE_KINDS] + [("--atlas-labels", k) for k in LABEL_KINDS]


@pytest.mark.parametrize("slot, kind", APP_CASES, ids=[f"{s}-{k}" for s, k in APP_CASES])
def test_app_bad_atlas_is_refused_before_the_work(ds, tmp_path, capsys, slot, kind):
    good = ds["atlas"] if slot == "--atlas" else ds["atlas_labels"]
    bad = make_bad(kind, good, tmp_path)
    args = {"--atlas": ds["atlas"], "--atlas-labels": ds["atlas_labels"], slot: bad}
    before = digest(ds["bids"], ds["labels"], ds["atlas"].parent, tmp_path)
    argv = [ds["bids"], tmp_path / "out", "participant", "--atlas", args["--atlas"], "--atlas-labels",
            args["--atlas-labels"], "--labels-dir", ds["labels"], "--methods", "demons", "--work-dir",
            tmp_path / "work", "--no-progress", "--skip-bids-validation", "--no-preprocess"]
    code, err = run_cli(bids_app_main, argv, capsys)
    assert_one_line_refusal(code, err, bad.name)
    assert digest(ds["bids"], ds["labels"], ds["atlas"].parent, tmp_path) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize("kind", ["an existing file", "under a file", "read-only system folder", "the BIDS dataset",
                                  "the labels dataset", "where the atlas lies"])
@pytest.mark.parametrize("which", ["OUTPUT_DIR", "--work-dir"])
def test_app_bad_output_is_refused_before_the_work(ds, tmp_path, capsys, kind, which):
    if kind == "the BIDS dataset":
        target, needle = ds["bids"], "BIDS_DIR"
    elif kind == "the labels dataset":
        target, needle = ds["labels"] / "x", "--labels-dir"
    elif kind == "where the atlas lies":
        # the atlas inside OUTPUT_DIR where the app writes, or anywhere in the work folder (it owns it all)
        target, needle = tmp_path / "target", "--atlas"
    else:
        target, needle = bad_output(kind, tmp_path, "app", ds)
    atlas = ds["atlas"]
    if kind == "where the atlas lies":
        where = target / "sub-99" / "anat" if which == "OUTPUT_DIR" else target / "cache"
        atlas = save_image(nib.load(str(ds["atlas"])), where / "atlas_T1w.nii.gz")
    out, work = (target, tmp_path / "work") if which == "OUTPUT_DIR" else (tmp_path / "out2", target)
    before = digest(ds["bids"], ds["labels"], ds["atlas"].parent, tmp_path)
    argv = [ds["bids"], out, "participant", "--atlas", atlas, "--labels-dir", ds["labels"], "--methods", "demons",
            "--work-dir", work, "--no-progress", "--skip-bids-validation", "--no-preprocess"]
    code, err = run_cli(bids_app_main, argv, capsys)
    assert_one_line_refusal(code, err, which, needle)
    assert digest(ds["bids"], ds["labels"], ds["atlas"].parent, tmp_path) == before


def test_the_matrix_covers_every_kind():
    """Every bad-input kind is tried on every slot that takes that kind of file."""
    assert len(CASES) == 2 * len(IMAGE_KINDS) + 3 * len(LABEL_KINDS) + 2 * (len(LABEL_KINDS) - 1)
    assert os.path.exists("/sys")  # the read-only-folder cases rely on it


@pytest.mark.parametrize("kind", ["garbage .h5", "garbage .mat", "empty .h5", "missing .h5", "an image as .h5"])
def test_evaluate_bad_transform_is_one_line(files, tmp_path, capsys, kind):
    """ITK's multi-line reader errors reach the user as one line that names the file."""
    bad = tmp_path / ("bad" + kind.split()[-1])
    if kind.startswith("garbage"):
        bad.write_bytes(b"not a transform\n\nat all\n")
    elif kind.startswith("empty"):
        bad.write_bytes(b"")
    elif kind.startswith("an image"):
        bad.write_bytes(files["fixed"].read_bytes())
    before = digest(*files.values(), tmp_path)
    out = tmp_path / "out" / "eval.csv"
    code, err = run_cli(main, [*evaluate_argv(files, out), "--transform", bad], capsys)
    assert_one_line_refusal(code, err, bad.name)
    assert digest(*files.values(), tmp_path) == before
    assert not out.exists()
