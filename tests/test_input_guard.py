"""Issue 14, cases 2-6: no input is ever written, every refusal comes before the work as one line (exit 2).

Each test reproduces a case as the issue writes it, through the command line a user types (``hdar ...``,
``hdar-pipeline ...``), and checks the exit code, that stderr is one line naming the argument or file and
the problem (no traceback), and that every input is byte-identical afterwards.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from hdar_pipeline.apps.bids_app_cli import bids_app_main
from hdar_pipeline.apps.cli import main
from hdar_pipeline.core.input_guard import InputError, InputGuard
from hdar_pipeline.core.images import ImageError, load_image, new_image, save_image
from hdar_pipeline.core.synthetic import make_subject

from test_synthetic import ball_phantom


def run_cli(entry, argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of one in-process command (argparse refusals raise SystemExit)."""
    try:
        code = entry([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_line_refusal(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def digest(*paths: Path) -> dict[str, str]:
    files = []
    for p in paths:
        files += sorted(q for q in Path(p).rglob("*") if q.is_file()) if Path(p).is_dir() else [Path(p)]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture()
def pair(tmp_path):
    image, labels = ball_phantom()
    subject = make_subject(image, labels, seed=1, magnitude_mm=6.0)
    return {"fixed": save_image(image, tmp_path / "fixed.nii.gz"),
            "moving": save_image(subject.image, tmp_path / "moving.nii.gz"),
            "labels": save_image(subject.labels, tmp_path / "moving_dseg.nii.gz"),
            "fixed_labels": save_image(labels, tmp_path / "fixed_dseg.nii.gz"), "dir": tmp_path}


@pytest.fixture()
def no_registration(monkeypatch):
    """Fails the test if a registration starts: every refusal here must come before the work."""
    import hdar_pipeline.methods as methods

    def forbidden(*args, **kwargs):
        raise AssertionError("a registration ran before the refusal")

    monkeypatch.setattr(methods, "register_pair", forbidden)


# ----------------------------------------------------------------------------- case 2: outputs over inputs


def test_register_output_over_its_moving_image_is_refused(pair, capsys, no_registration):
    """`hdar register FIXED chain/warped.nii.gz -o chain` used to replace the moving image (exit 0)."""
    chain = pair["dir"] / "chain"
    chain.mkdir()
    moving = save_image(nib.load(str(pair["moving"])), chain / "warped.nii.gz")
    before = digest(pair["fixed"], chain)
    code, err = run_cli(main, ["register", pair["fixed"], moving, "-o", chain, "--method", "demons"], capsys)
    assert_one_line_refusal(code, err, "-o/--output", "MOVING", "warped.nii.gz", "overwrite")
    assert digest(pair["fixed"], chain) == before
    assert sorted(p.name for p in chain.iterdir()) == ["warped.nii.gz"]


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_register_output_that_is_a_link_to_an_input_is_refused(pair, capsys, no_registration, link):
    """The same file under another name: out/transform.h5 a hard link to the fixed image, or
    out/warped_labels.nii.gz a symbolic link to the moving labels."""
    out = pair["dir"] / "out"
    out.mkdir()
    if link == "hard":
        os.link(pair["fixed"], out / "transform.h5")
        culprit = "FIXED"
    else:
        (out / "warped_labels.nii.gz").symlink_to(pair["labels"])
        culprit = "--moving-labels"
    before = digest(pair["dir"])
    code, err = run_cli(main, ["register", pair["fixed"], pair["moving"], "-o", out, "--method", "demons",
                               "--moving-labels", pair["labels"]], capsys)
    assert_one_line_refusal(code, err, "-o/--output", culprit)
    assert digest(pair["dir"]) == before


def test_registration_json_hashes_the_inputs_as_they_were(pair, capsys):
    """The input hashes are taken before anything is written, and name every input."""
    expected = {k: hashlib.sha256(pair[k].read_bytes()).hexdigest() for k in ("fixed", "moving", "labels")}
    out = pair["dir"] / "o"
    code, err = run_cli(main, ["register", pair["fixed"], pair["moving"], "-o", out, "--method", "demons",
                               "--no-affine", "--moving-labels", pair["labels"], "--threads", "1"], capsys)
    assert code == 0, err
    inputs = json.loads((out / "registration.json").read_text())["inputs"]
    assert inputs["fixed_sha256"] == expected["fixed"]
    assert inputs["moving_sha256"] == expected["moving"]
    assert inputs["moving_labels_sha256"] == expected["labels"]
    assert inputs["moving_sha256"] != hashlib.sha256((out / "warped.nii.gz").read_bytes()).hexdigest()


def test_evaluate_output_over_an_input_is_refused(pair, capsys):
    """`hdar evaluate REF LABELS -o REF_summary.csv`-style collisions: an output named like an input."""
    table = pair["dir"] / "labels_summary.csv"
    table.write_text("index,name\n1,a\n")
    before = digest(pair["dir"])
    code, err = run_cli(main, ["evaluate", pair["fixed_labels"], pair["labels"], "-o", pair["dir"] / "labels.csv",
                               "--label-table", table], capsys)
    assert_one_line_refusal(code, err, "-o/--output", "--label-table", "labels_summary.csv")
    assert digest(pair["dir"]) == before


def test_guard_verify_catches_a_changed_input(tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("a")
    guard = InputGuard({"FIXED": f})
    guard.verify()
    f.write_text("b")
    with pytest.raises(InputError, match="FIXED .*in.txt: changed while the run went on"):
        guard.verify()
    dataset = tmp_path / "ds"
    (dataset / "sub-01").mkdir(parents=True)
    guard = InputGuard(folders={"BIDS_DIR": dataset})
    guard.verify()
    (dataset / "sub-01" / "new.txt").write_text("x")
    with pytest.raises(InputError, match="BIDS_DIR .*ds: changed while the run went on"):
        guard.verify()


# ----------------------------------------------------------------------------- case 3: refusals before the work


def test_register_output_naming_an_existing_file(pair, capsys, no_registration):
    target = pair["dir"] / "notes.txt"
    target.write_text("keep me")
    code, err = run_cli(main, ["register", pair["fixed"], pair["moving"], "-o", target, "--method", "syn"], capsys)
    assert_one_line_refusal(code, err, "-o/--output", "notes.txt", "not a folder")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("where", ["under a file", "read-only system folder"])
def test_register_output_that_cannot_be_written(pair, capsys, no_registration, where):
    if where == "under a file":
        blocker = pair["dir"] / "blocker"
        blocker.write_text("x")
        out = blocker / "out"
    else:
        out = Path("/sys/hdar-pipeline-test-output")  # not writable, even for root
        assert not out.exists()
    code, err = run_cli(main, ["register", pair["fixed"], pair["moving"], "-o", out, "--method", "syn"], capsys)
    assert_one_line_refusal(code, err, "-o/--output", str(out), "cannot be written")
    assert not out.exists()


# ----------------------------------------------------------------------------- the BIDS App (cases 3, 4, 6)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    pytest.importorskip("pydra")
    pytest.importorskip("bids")
    from test_bids_app import make_bids_dataset

    root = tmp_path_factory.mktemp("guard_app")
    bids_dir, labels_dir = make_bids_dataset(root)
    return {"root": root, "bids": bids_dir, "labels": labels_dir}


def app(ds, out, work, *extra):
    return [ds["bids"], out, "participant", "--atlas-participant", "01", "--labels-dir", ds["labels"],
            "--methods", "demons", "--work-dir", work, "--nprocs", "1", "--omp-nthreads", "1", "--no-preprocess",
            "--no-progress", "--skip-bids-validation", *extra]


@pytest.mark.parametrize("corruption", ["truncated gzip", "4-D image", "empty file"])
def test_app_corrupt_atlas_is_refused_up_front(ds, tmp_path, capsys, no_registration, corruption):
    atlas = tmp_path / "atlas_T1w.nii.gz"
    if corruption == "truncated gzip":
        atlas.write_bytes(gzip.compress(b"\x5c\x01" + b"\0" * 400)[:60])
    elif corruption == "4-D image":
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), str(atlas))
    else:
        atlas.write_bytes(b"")
    before = digest(ds["bids"], ds["labels"], atlas)
    argv = [ds["bids"], tmp_path / "out", "participant", "--atlas", atlas, "--labels-dir", ds["labels"],
            "--methods", "demons", "--work-dir", tmp_path / "work", "--no-progress", "--skip-bids-validation"]
    code, err = run_cli(bids_app_main, argv, capsys)
    assert_one_line_refusal(code, err, str(atlas))
    assert digest(ds["bids"], ds["labels"], atlas) == before
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_app_output_in_the_labels_dataset_is_refused(ds, tmp_path, capsys, no_registration):
    """Case 4: OUTPUT_DIR = --labels-dir used to replace its dataset_description.json and add 14 files."""
    before = digest(ds["labels"], ds["bids"])
    for out in (ds["labels"], ds["labels"] / "derivatives"):
        code, err = run_cli(bids_app_main, app(ds, out, tmp_path / "work"), capsys)
        assert_one_line_refusal(code, err, "OUTPUT_DIR", str(ds["labels"]), "--labels-dir")
    code, err = run_cli(bids_app_main, app(ds, tmp_path / "out", ds["labels"] / "work"), capsys)
    assert_one_line_refusal(code, err, "--work-dir", "--labels-dir")
    assert digest(ds["labels"], ds["bids"]) == before
    assert not (ds["labels"] / "derivatives").exists() and not (ds["labels"] / "work").exists()


def test_app_atlas_where_the_app_writes_is_refused(ds, tmp_path, capsys, no_registration):
    """An input file inside OUTPUT_DIR where the app writes (here its dataset_description.json) is refused."""
    out = tmp_path / "out"
    atlas = save_image(load_image(ds["bids"] / "sub-01" / "anat" / "sub-01_T1w.nii.gz"),
                       out / "sub-01" / "anat" / "atlas_T1w.nii.gz")
    before = digest(out)
    argv = [ds["bids"], out, "participant", "--atlas", atlas, "--work-dir", tmp_path / "work", "--no-progress",
            "--skip-bids-validation", "--methods", "demons"]
    code, err = run_cli(bids_app_main, argv, capsys)
    assert_one_line_refusal(code, err, "OUTPUT_DIR", "--atlas", "atlas_T1w.nii.gz")
    assert digest(out) == before


@pytest.mark.parametrize("argv, needles", [
    (["--nprocs", "-1"], ["--nprocs", "-1", "positive"]),
    (["--omp-nthreads", "0"], ["--omp-nthreads", "positive"]),
    (["--seed", "-3"], ["--seed", ">= 0"]),
    (["--atlas-resolution", "0"], ["--atlas-resolution", "positive"]),
])
def test_app_resources_must_be_positive(ds, tmp_path, capsys, argv, needles):
    code, err = run_cli(bids_app_main, [*app(ds, tmp_path / "out", tmp_path / "work"), *argv], capsys)
    assert_one_line_refusal(code, err, *needles)
    assert not (tmp_path / "out").exists()


def test_app_unknown_session_is_named(ds, tmp_path, capsys, no_registration):
    code, err = run_cli(bids_app_main, [*app(ds, tmp_path / "out", tmp_path / "work"), "--session-label", "9"],
                        capsys)
    assert_one_line_refusal(code, err, "ses-9", "not found")


# ----------------------------------------------------------------------------- case 5: zero voxel size


def zero_pixdim_copy(src: Path, dst: Path, axis: int = 1) -> Path:
    """A copy of ``src`` whose header says 0 mm along ``axis`` (qform set, no sform), written byte by byte:
    nibabel would repair the header on save."""
    img = nib.load(str(src))
    out = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    out.set_qform(img.affine, code=1)
    out.set_sform(None, code=0)
    raw = bytearray(out.header.binaryblock + b"\0" * 4 + np.asarray(out.dataobj).astype("<f4").tobytes(order="F"))
    raw[76 + 4 * (axis + 1):80 + 4 * (axis + 1)] = struct.pack("<f", 0.0)
    raw[108:112] = struct.pack("<f", 352.0)  # vox_offset
    header = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])), check=False)
    header.set_data_dtype(np.float32)
    raw[70:72] = struct.pack("<h", 16)  # datatype float32
    raw[72:74] = struct.pack("<h", 32)  # bitpix
    dst.write_bytes(gzip.compress(bytes(raw)))
    return dst


def test_zero_voxel_size_is_refused_naming_the_file(pair, capsys, no_registration):
    bad = zero_pixdim_copy(pair["moving"], pair["dir"] / "zero_pixdim.nii.gz")
    header = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(gzip.decompress(bad.read_bytes())[:348]),
                                           check=False)
    assert header["pixdim"][2] == 0 and header["qform_code"] == 1  # the case as written
    with pytest.raises(ImageError, match="zero_pixdim.nii.gz: the header's voxel size"):
        load_image(bad)
    code, err = run_cli(main, ["register", pair["fixed"], bad, "-o", pair["dir"] / "o", "--method", "demons"], capsys)
    assert_one_line_refusal(code, err, str(bad), "voxel size", "0.0")


# ----------------------------------------------------------------------------- case 6: smaller ones


@pytest.mark.parametrize("argv, needles", [
    (["--threads", "-2"], ["--threads", "-2", "positive"]),
    (["--threads", "0"], ["--threads", "positive"]),
    (["--seed", "-1"], ["--seed"]),
    (["--method", "hdar", "--refine", "-5"], ["--refine"]),
])
def test_register_resources_must_be_positive(pair, capsys, no_registration, argv, needles):
    code, err = run_cli(main, ["register", pair["fixed"], pair["moving"], "-o", pair["dir"] / "o", *argv], capsys)
    assert_one_line_refusal(code, err, *needles)


def test_demo_resources_must_be_positive(tmp_path, capsys):
    code, err = run_cli(main, ["demo", "-o", tmp_path / "demo", "--nprocs", "-1"], capsys)
    assert_one_line_refusal(code, err, "--nprocs")
    assert not (tmp_path / "demo").exists()


def test_evaluate_all_background_labels_scores_zero_with_a_flag(pair, capsys):
    """A registration that lost every label scores 0 (and says so), instead of being refused."""
    lab = nib.load(str(pair["fixed_labels"]))
    n = len(np.unique(np.asarray(lab.dataobj))) - 1
    empty = save_image(new_image(np.zeros(lab.shape, np.int16), lab), pair["dir"] / "lost_dseg.nii.gz")
    out = pair["dir"] / "eval.csv"
    code, err = run_cli(main, ["evaluate", pair["fixed_labels"], empty, "-o", out, "--no-figures"], capsys)
    assert code == 0, err
    assert "all background" in err and "Traceback" not in err
    table = pd.read_csv(out)
    assert len(table) == n >= 3 and (table["dice"] == 0).all() and (table["target_overlap"] == 0).all()
    assert set(table["flag"]) == {"missing_in_labels"}
    summary = pd.read_csv(pair["dir"] / "eval_summary.csv").iloc[0]
    assert summary["mean_dice"] == 0 and summary["n_labels_evaluated"] == n and summary["n_labels_missing"] == n
    # an empty *reference* still has nothing to evaluate against: refused, naming it
    code, err = run_cli(main, ["evaluate", empty, pair["fixed_labels"], "-o", out], capsys)
    assert_one_line_refusal(code, err, "lost_dseg.nii.gz", "empty")


# ----------------------------------------------------------------------------- the other commands


def test_demo_output_naming_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "demo"
    target.write_text("keep")
    code, err = run_cli(main, ["demo", "-o", target, "--subjects", "1", "--methods", "affine"], capsys)
    assert_one_line_refusal(code, err, "-o/--output", str(target), "not a folder")
    assert target.read_text() == "keep"


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "imgs"
    image, labels = ball_phantom()
    paths = []
    for i in range(3):
        s = make_subject(image, labels, seed=i, magnitude_mm=4.0)
        paths.append(save_image(s.image, folder / f"s{i}_t1.nii.gz"))
        save_image(s.labels, folder / f"s{i}_seg.nii.gz")
    return folder, paths


@pytest.mark.parametrize("case", ["inside --folder", "over --images", "a file"])
def test_train_outputs_never_touch_its_inputs(images, tmp_path, capsys, case, monkeypatch):
    import hdar_pipeline.hdar.train as training

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("training started before the refusal"))
    folder, paths = images
    before = digest(folder)
    if case == "inside --folder":
        argv, needles = ["--folder", folder, "-o", folder / "run"], ["-o/--output", "--folder"]
    elif case == "over --images":
        argv, needles = ["--images", *paths, "-o", folder], ["-o/--output", "--images", "s0_t1.nii.gz"]
    else:
        argv, needles = ["--images", *paths, "-o", paths[0]], ["-o/--output", "not a folder"]
    code, err = run_cli(main, ["train", *argv], capsys)
    assert_one_line_refusal(code, err, *needles)
    assert digest(folder) == before


@pytest.mark.parametrize("case", ["missing", "a folder", "inside -o"])
def test_train_resume_checkpoint_is_checked_and_protected_before_training(images, tmp_path, capsys, case,
                                                                          monkeypatch):
    """``--resume CHECKPOINT`` names an input: a missing one (or a folder) is refused before the work, and one from
    another run cannot lie inside this run's output folder, where training would overwrite it."""
    import hdar_pipeline.hdar.train as training

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("training started before the refusal"))
    folder, paths = images
    other = tmp_path / "runs" / "old" / "checkpoints"
    other.mkdir(parents=True)
    (other / "last.pt").write_bytes(b"a checkpoint")
    if case == "missing":
        argv, needles = ["--resume", tmp_path / "nope.pt", "-o", tmp_path / "run"], ["--resume", "not found"]
    elif case == "a folder":
        argv, needles = ["--resume", other, "-o", tmp_path / "run"], ["--resume", "is a folder"]
    else:
        argv, needles = ["--resume", other / "last.pt", "-o", tmp_path / "runs"], ["-o/--output", "--resume"]
    code, err = run_cli(main, ["train", "--images", *paths, *argv], capsys)
    assert_one_line_refusal(code, err, *needles)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs" / "checkpoints").exists()
    assert (other / "last.pt").read_bytes() == b"a checkpoint"


def test_convert_never_writes_its_label_table(images, tmp_path, capsys):
    folder, _ = images
    dest = tmp_path / "bids"
    dest.mkdir()
    table = dest / "dseg.tsv"
    table.write_text("index\tname\n1\tone\n2\ttwo\n3\tthree\n4\tfour\n")
    before = digest(folder, table)
    code, err = run_cli(main, ["convert", "folder", folder, dest, "--images", "*_t1.nii.gz", "--labels",
                               "*_seg.nii.gz", "--label-table", table, "--overwrite"], capsys)
    assert_one_line_refusal(code, err, "DEST", "--label-table", "dseg.tsv")
    assert digest(folder, table) == before


def test_benchmark_output_inside_its_dataset_is_refused(tmp_path, capsys, no_registration):
    """`hdar benchmark --lpba40 DIR -o DIR/out` used to write its rows into the dataset."""
    data = tmp_path / "lpba40"
    image, labels = ball_phantom()
    for sid in ("S21", "S22"):
        save_image(image, data / sid / f"{sid}.delineation.skullstripped.nii.gz")
        save_image(labels, data / sid / f"{sid}.delineation.structure.label.nii.gz")
    before = digest(data)
    code, err = run_cli(main, ["benchmark", "--lpba40", data, "--subjects", "S21", "S22", "--variants", "affine",
                               "-o", data / "out", "--no-progress"], capsys)
    assert_one_line_refusal(code, err, "-o/--output", "--lpba40", str(data))
    assert digest(data) == before and not (data / "out").exists()
    code, err = run_cli(main, ["benchmark", "--lpba40", data, "--threads", "-2"], capsys)
    assert_one_line_refusal(code, err, "--threads", "positive")


@pytest.mark.parametrize("fault", ["tampered", "missing", "no model card"])
def test_register_weights_are_present_and_verified_before_the_work(pair, tmp_path, capsys, no_registration, fault):
    from hdar_pipeline.hdar.weights import resolve_weights

    pt, card = resolve_weights("default")
    weights = tmp_path / "w" / "model.pt"
    weights.parent.mkdir()
    if fault != "missing":
        weights.write_bytes(pt.read_bytes() + (b"x" if fault == "tampered" else b""))
    if fault != "no model card":
        weights.with_suffix(".json").write_bytes(card.read_bytes())
    out = tmp_path / "o"
    code, err = run_cli(main, ["register", pair["fixed"], pair["moving"], "-o", out, "--method", "hdar",
                               "--weights", weights], capsys)
    assert_one_line_refusal(code, err, "model.pt", {"tampered": "SHA-256", "missing": "not found",
                                                    "no model card": "model card"}[fault])
    assert not out.exists()
