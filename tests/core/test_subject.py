"""The one subject record and its finders (core/subject.py), and the machine description (core/provenance.py)."""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import pytest

from hdar_pipeline.core import provenance
from hdar_pipeline.core.subject import (DatasetError, Subject, find_bids_images, find_bids_labels,
                                        find_dataset_subjects, find_folder_images, find_image_subjects,
                                        find_lpba40_subjects, match_labels, natural_key, subject_name)


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


def test_folder_images_formats_and_label_like_names(tmp_path):
    for name in ("A.nii.gz", "B.nii", "C.img", "C.hdr", "D.img.gz", "E.MGZ", "F_label.nii.gz", "G_Mask.nii.gz",
                 "H.hdr.gz", "notes.txt", "sub/I.nii.gz"):
        _touch(tmp_path / name)
    (tmp_path / "dir.nii.gz").mkdir()
    # an Analyze pair counts once, by its .img; label maps and masks are skipped unless a pattern asks for them
    assert [p.name for p in find_folder_images(tmp_path)] == ["A.nii.gz", "B.nii", "C.img", "D.img.gz", "E.MGZ"]
    assert [p.name for p in find_folder_images(tmp_path, "*")] == [
        "A.nii.gz", "B.nii", "C.img", "D.img.gz", "E.MGZ", "F_label.nii.gz", "G_Mask.nii.gz"]
    assert [p.relative_to(tmp_path).as_posix() for p in find_folder_images(tmp_path, "**/*.nii.gz")] == [
        "A.nii.gz", "F_label.nii.gz", "G_Mask.nii.gz", "sub/I.nii.gz"]
    assert [s.name for s in find_image_subjects(folder=tmp_path, labels=None)] == ["A", "B", "C", "D", "E"]
    with pytest.raises(DatasetError, match=r"no image files found matching '\*\.mgh'"):
        find_image_subjects(folder=tmp_path, pattern="*.mgh")
    with pytest.raises(DatasetError, match=r"notes\.txt: not a folder"):
        find_folder_images(tmp_path / "notes.txt")
    with pytest.raises(DatasetError, match=r"notes\.txt: BIDS dataset folder not found"):
        find_image_subjects(bids=tmp_path / "notes.txt")


def test_subject_names_from_file_names():
    assert subject_name("x/sub-01_ses-2_acq-fast_T1w.nii.gz") == "sub-01_ses-2"
    assert subject_name("ses-1_sub-2_T1w.mgz") == "sub-2_ses-1"  # entities in any order
    assert subject_name("S01.delineation.skullstripped.nii.gz") == "S01.delineation.skullstripped"
    assert [subject_name(n) for n in ("a.img.gz", "b.hdr", "c.NII", "d.hdr.gz", "e.tar.gz", "f")] == [
        "a", "b", "c", "d.hdr", "e.tar", "f"]  # image suffixes whole, any other only its last part


def test_image_list_with_label_files(tmp_path):
    images = [_touch(tmp_path / n) for n in ("sub-01_run-1_T1w.nii.gz", "sub-01_run-2_T1w.nii.gz", "S7.nii")]
    labels = [_touch(tmp_path / "lab" / n) for n in ("x.nii.gz", "y.nii.gz", "z.nii.gz")]
    found = find_image_subjects(images=[str(p) for p in images], labels=labels)
    # two runs of one subject: every name falls back to the file stem; ids and entities still from the name
    assert [(s.id, s.session, s.name, s.entities) for s in found] == [
        ("01", "", "sub-01_run-1_T1w", {"subject": "01"}), ("01", "", "sub-01_run-2_T1w", {"subject": "01"}),
        ("S7", "", "S7", {})]
    assert [s.labels for s in found] == labels and [s.t1w for s in found] == images
    assert find_image_subjects(images=images[:1], labels=str(labels[0]))[0].labels == labels[0]
    with pytest.raises(DatasetError, match=r"label file\(s\) not found: .*nope\.nii\.gz"):
        find_image_subjects(images=images[:1], labels=[tmp_path / "nope.nii.gz"])
    with pytest.raises(DatasetError, match=r"image file\(s\) not found: .*nope\.nii\.gz"):
        find_image_subjects(images=[tmp_path / "nope.nii.gz"])
    with pytest.raises(DatasetError, match="the same image is listed more than once"):
        find_image_subjects(images=[images[0], tmp_path / "lab" / ".." / images[0].name])
    with pytest.raises(DatasetError, match="give exactly one of images, folder or bids"):
        find_image_subjects()


def test_match_labels_by_name_then_bids_entities_then_leading_identifier(tmp_path):
    images = [tmp_path / "img" / n for n in ("S01.brain.nii.gz", "S02_T1.nii.gz", "sub-03_ses-1_T1w.nii.gz")]
    cands = [tmp_path / "a" / "S01.brain.nii.gz", tmp_path / "b" / "S01_seg.nii.gz",  # same name wins
             tmp_path / "b" / "S02.lab.nii.gz", tmp_path / "b" / "sub-03_ses-2_dseg.nii.gz",
             tmp_path / "b" / "sub-03_ses-1_desc-x_dseg.nii.gz", images[1]]  # the image itself is no candidate
    assert match_labels(images, cands) == [cands[0], cands[2], cands[4]]
    # a BIDS name matches only by its entities, never by its leading identifier ("sub-03")
    assert match_labels(images[2:], [tmp_path / "sub-03_x.nii.gz"], required=False) == [None]
    with pytest.raises(DatasetError, match=r"sub-03_ses-1_T1w\.nii\.gz: no label map found for it .*'sub-03'"):
        match_labels(images[2:], [tmp_path / "sub-03_x.nii.gz"])


def _bids(root: Path) -> None:
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "toy", "BIDSVersion": "1.8.0"}')
    for key, folder in (("sub-01", "sub-01"), ("sub-02_ses-1", "sub-02/ses-1"), ("sub-02_ses-2", "sub-02/ses-2")):
        _touch(root / folder / "anat" / f"{key}_T1w.nii.gz")
        der = root / "derivatives" / "seg" / folder / "anat"
        _touch(der / f"{key}_space-MNI152NLin2009cAsym_desc-aseg_dseg.nii.gz")  # not in subject space
        if key != "sub-02_ses-2":
            _touch(der / f"{key}_desc-aseg_dseg.nii.gz")
    _touch(root / "derivatives" / "seg" / "sub-01" / "anat" / "sub-01_space-T1w_desc-dkt_dseg.nii.gz")
    _touch(root / "sub-03" / "anat" / "sub-03_T2w.nii.gz")


def test_bids_labels_in_subject_space(tmp_path):
    _bids(tmp_path)
    assert [p.name for p in find_bids_labels(tmp_path)] == [
        "sub-01_desc-aseg_dseg.nii.gz", "sub-01_space-T1w_desc-dkt_dseg.nii.gz", "sub-02_ses-1_desc-aseg_dseg.nii.gz"]
    assert [p.name for p in find_bids_labels(tmp_path, "dkt")] == ["sub-01_space-T1w_desc-dkt_dseg.nii.gz"]
    assert find_bids_labels(tmp_path / "sub-01") == []  # no derivatives folder
    with pytest.raises(DatasetError, match=r"several label maps match it"):  # two desc: ask for one
        find_image_subjects(bids=tmp_path)
    with pytest.warns(UserWarning, match=r"no \*_dseg label map for 1 of 3 subjects \(sub-02_ses-2\); their pairs "
                                         "train without the Dice term"):
        found = find_image_subjects(bids=tmp_path, labels_desc="aseg")
    assert [(s.name, s.labels.name if s.labels else None) for s in found] == [
        ("sub-01", "sub-01_desc-aseg_dseg.nii.gz"), ("sub-02_ses-1", "sub-02_ses-1_desc-aseg_dseg.nii.gz"),
        ("sub-02_ses-2", None)]
    assert [s.entities for s in found][1:] == [{"subject": "02", "session": "1"}, {"subject": "02", "session": "2"}]


@pytest.mark.parametrize("pybids", ["installed", "absent", "fails"])
def test_bids_images_with_pybids_or_globbed(tmp_path, monkeypatch, pybids):
    """The T1w images through pybids, or by globbing where it is not installed or cannot index the dataset."""
    _bids(tmp_path)

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot index")

    if pybids != "installed":
        fake = None if pybids == "absent" else types.SimpleNamespace(BIDSLayout=refuse)  # None: ImportError
        monkeypatch.setitem(sys.modules, "bids", fake)
    names = ["sub-01_T1w.nii.gz", "sub-02_ses-1_T1w.nii.gz", "sub-02_ses-2_T1w.nii.gz"]
    if pybids == "fails":
        with pytest.warns(UserWarning, match=r"pybids could not index .* \(RuntimeError: cannot index\); globbing"):
            assert [p.name for p in find_bids_images(tmp_path)] == names
    else:
        assert [p.name for p in find_bids_images(tmp_path)] == names
    (tmp_path / "empty").mkdir()
    expected = r"empty: no T1w images found \(expected sub-\*/\[ses-\*/\]anat/\*_T1w\.nii\.gz\)"
    with pytest.raises(DatasetError, match=expected):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pybids "fails": its warning was checked above
            find_bids_images(tmp_path / "empty")


def test_machine_description():
    summary = provenance.machine_summary()
    assert summary.endswith(f"({provenance.cpu_model()}, {__import__('os').cpu_count()} cores)")
    lines = provenance.machine_description()
    assert lines[0].startswith(f"CPU: {provenance.cpu_model()}, ") and lines[-1].startswith("commit: ")
    assert lines[-1] == f"commit: {provenance.git_commit(short=True)}"
    torch = pytest.importorskip("torch")
    hw = provenance.hardware_description(torch.device("cpu"))
    assert hw["device"] == "cpu" and hw["cpu"] == provenance.cpu_model() and "gpu" not in hw
