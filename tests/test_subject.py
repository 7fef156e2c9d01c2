"""The one subject record and its finders (core/subject.py), and the machine description (core/provenance.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hdar_pipeline.core import provenance
from hdar_pipeline.core.subject import (DatasetError, Subject, find_dataset_subjects, find_lpba40_subjects,
                                        natural_key)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_subject_key():
    assert Subject("01").key == "sub-01"
    assert Subject("01", session="pre").key == "sub-01_ses-pre"
    assert sorted(["S10", "S2", "s1"], key=natural_key) == ["s1", "S2", "S10"]


def test_folder_layout_pairs_images_and_labels_by_id(tmp_path):
    for sid in ("S10", "S2", "S1"):
        _touch(tmp_path / "img" / f"{sid}_T1.nii.gz")
    for sid in ("S1", "S10", "S3"):
        _touch(tmp_path / "seg" / f"{sid}_seg.nii.gz")
    _touch(tmp_path / "img" / "S1_T1.img")  # the same image in a second format: the .nii.gz wins
    _touch(tmp_path / "img" / "__.nii")  # no letters or digits: no subject id
    root, layout, found = find_dataset_subjects("folder", tmp_path, images="img/*", labels="seg/*")
    assert root == tmp_path and layout.name == "user patterns"
    assert [s.id for s in found] == ["S1", "S2", "S3", "S10", "__.nii"]  # natural order, then the orphan
    s1, s2, s3, s10, orphan = found
    assert s1.t1w.name == "S1_T1.nii.gz" and s1.labels.name == "S1_seg.nii.gz" and not s1.notes
    assert s10.t1w.name == "S10_T1.nii.gz" and not s10.notes
    assert s2.labels is None and s2.notes == [f"{s2.t1w}: no label map found for subject S2 (looked for "
                                              f"{tmp_path / 'seg/*'})"]
    assert s3.t1w is None and "label map of subject S3 has no image" in s3.notes[0]
    assert orphan.t1w is None and orphan.labels is None and "cannot read a subject id" in orphan.notes[0]


def test_dataset_layouts(tmp_path):
    src = tmp_path / "LPBA40"
    for sid in ("S02", "S01"):
        _touch(src / sid / f"{sid}.delineation.skullstripped.nii.gz")
        _touch(src / sid / f"{sid}.delineation.structure.label.nii.gz")
    root, layout, found = find_dataset_subjects("lpba40", tmp_path)
    assert root == tmp_path and layout.name == "LONI LPBA40, delineation space"  # ``**/``: at any depth
    assert [(s.id, s.t1w.parent.name, s.labels.name) for s in found] == [
        ("S01", "S01", "S01.delineation.structure.label.nii.gz"),
        ("S02", "S02", "S02.delineation.structure.label.nii.gz")]
    with pytest.raises(DatasetError, match="has no head images"):
        find_dataset_subjects("lpba40", tmp_path, use_heads=True)
    with pytest.raises(DatasetError, match="no CUMC12 images found"):
        find_dataset_subjects("cumc12", tmp_path)
    for kind in ("Brains", "Heads", "Atlases"):  # Klein et al.'s archive, below SRC in the preset's root folder
        _touch(tmp_path / "cumc12" / kind / "m1.img")
    root, layout, found = find_dataset_subjects("cumc12", tmp_path, use_heads=True)
    assert root == tmp_path / "cumc12" and [(s.id, s.t1w.parent.name, s.labels.parent.name) for s in found] == [
        ("m1", "Heads", "Atlases")]
    with pytest.raises(DatasetError, match="needs both --images GLOB and --labels GLOB"):
        find_dataset_subjects("folder", tmp_path, images="*")
    # LONI's folders as the benchmark reads them: in the order asked, repeats dropped, missing files named
    assert [s.id for s in find_lpba40_subjects(src, ["S02", "S01", "S02"])] == ["S02", "S01"]
    with pytest.raises(DatasetError, match=r"LPBA40 files missing: .*S03\.delineation\.skullstripped\.nii\.gz"):
        find_lpba40_subjects(src, ["S01", "S03"])


def test_machine_description():
    summary = provenance.machine_summary()
    assert summary.endswith(f"({provenance.cpu_model()}, {__import__('os').cpu_count()} cores)")
    lines = provenance.machine_description()
    assert lines[0].startswith(f"CPU: {provenance.cpu_model()}, ") and lines[-1].startswith("commit: ")
    assert lines[-1] == f"commit: {provenance.git_commit(short=True)}"
    torch = pytest.importorskip("torch")
    hw = provenance.hardware_description(torch.device("cpu"))
    assert hw["device"] == "cpu" and hw["cpu"] == provenance.cpu_model() and "gpu" not in hw
