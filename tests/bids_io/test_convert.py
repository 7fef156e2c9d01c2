"""`hdar convert`: public labelled distributions (in their own layouts) into BIDS raw + label derivatives.

The fake trees are tiny (12x14x10) volumes written as Analyze .img/.hdr (plain, and .img.gz beside a
plain .hdr as LONI ships them), .nii and .nii.gz. Each test checks what a user relies on: the BIDS names,
that pybids reads the result with validation on, that label maps equal the source voxel for voxel on the
image's affine, the participants mapping, the label names, and clear errors that name the file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hdar_pipeline import __version__
from hdar_pipeline.apps.cli import main
from hdar_pipeline.bids_io.convert import LPBA40_LABELS, ConvertError, bids_labels, convert
from hdar_pipeline.core.images import ImageError, load_image

SHAPE = (12, 14, 10)
AFFINE = np.array([[-1.2, 0, 0, 7.0], [0, 1.1, 0, -8.0], [0, 0, 1.3, -6.0], [0, 0, 0, 1]])


# ----------------------------------------------------------------------------- fake distributions


def volumes(seed: int, label_values=(21, 22, 181), dtype=np.int16) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid 'brain' with noise and a label map of three parts of it."""
    rng = np.random.default_rng(seed)
    idx = np.indices(SHAPE).astype(float)
    c = (np.asarray(SHAPE) - 1) / 2
    r = sum(((idx[a] - c[a]) / (SHAPE[a] / 2.4)) ** 2 for a in range(3))
    brain = r < 1
    image = np.where(brain, 100 + rng.integers(0, 400, SHAPE), rng.integers(0, 5, SHAPE)).astype(dtype)
    labels = np.zeros(SHAPE, np.int16)
    labels[brain & (idx[0] < c[0])] = label_values[0]
    labels[brain & (idx[0] >= c[0])] = label_values[1]
    labels[brain & (idx[2] < c[2] - 1)] = label_values[2]
    return image, labels


def write(path: Path, data: np.ndarray, affine=AFFINE) -> Path:
    """Write ``data`` at ``path`` in the format its suffix names: .nii, .nii.gz, .img (Analyze pair) or
    .img.gz (gzipped .img beside a plain .hdr, as LONI ships LPBA40)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    if name.endswith(".img.gz"):
        plain = path.with_name(name[: -len(".gz")])
        write(plain, data, affine)
        with open(plain, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        plain.unlink()
    elif name.endswith(".img"):
        img = nib.AnalyzeImage(data, affine)
        nib.save(img, str(path))
    else:
        nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def make_lpba40(src: Path, suffixes=(".img", ".img.gz", ".nii", ".nii.gz"), table=True) -> dict[str, tuple]:
    """LONI's delineation-space layout: SRC/S01/S01.delineation.skullstripped.<suffix> + ...structure.label."""
    data = {}
    for i, suffix in enumerate(suffixes, start=1):
        sid = f"S{i:02d}"
        image, labels = volumes(i)
        write(src / sid / f"{sid}.delineation.skullstripped{suffix}", image)
        write(src / sid / f"{sid}.delineation.structure.label{suffix}", labels)
        data[sid] = (image, labels)
    if table:
        (src / "lpba40_labels.tsv").write_text("index\tname\n21\tL superior frontal gyrus\n"
                                               "22\tR superior frontal gyrus\n181\tcerebellum\n")
    return data


def make_klein(root: Path, ids, suffix=".img") -> dict[str, tuple]:
    """Klein et al. 2009 archive: Brains/<id>.img, Heads/<id>.img, Atlases/<id>.img (same names)."""
    data = {}
    for i, sid in enumerate(ids, start=1):
        image, labels = volumes(10 + i)
        head = image.copy()
        head[head < 5] = 50  # a 'scalp' in the background
        write(root / "Brains" / f"{sid}{suffix}", image)
        write(root / "Heads" / f"{sid}{suffix}", head)
        write(root / "Atlases" / f"{sid}{suffix}", labels)
        data[sid] = (image, labels, head)
    return data


def layout_of(dest: Path):
    import bids

    return bids.BIDSLayout(str(dest), validate=True, derivatives=str(dest / "derivatives" / "labels"))


def check_bids(dest: Path, labels: list[str]) -> None:
    """pybids (validation on) finds every T1w and, through the derivatives, every dseg."""
    layout = layout_of(dest)
    t1w = layout.get(suffix="T1w", extension=".nii.gz", return_type="filename")
    assert sorted(Path(f).name for f in t1w) == [f"sub-{s}_T1w.nii.gz" for s in labels]
    assert sorted(layout.get_subjects()) == labels
    dseg = layout.get(scope="derivatives", suffix="dseg", extension=".nii.gz", return_type="filename")
    assert sorted(Path(f).name for f in dseg) == [f"sub-{s}_dseg.nii.gz" for s in labels]
    desc = json.loads((dest / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.9.0" and desc["DatasetType"] == "raw" and desc["Name"]
    ddesc = json.loads((dest / "derivatives" / "labels" / "dataset_description.json").read_text())
    assert ddesc["DatasetType"] == "derivative" and ddesc["SourceDatasets"]
    gen = ddesc["GeneratedBy"][0]
    assert gen["Name"] == "hdar-pipeline convert" and gen["Version"] == __version__
    assert "file:" not in gen.get("CodeURL", "")  # never a path on the converting machine
    assert (dest / "README").is_file()


def check_subject(dest: Path, label: str, source_image: Path, image: np.ndarray, labels: np.ndarray) -> None:
    t1w = nib.load(str(dest / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"))
    dseg = nib.load(str(dest / "derivatives" / "labels" / f"sub-{label}" / "anat" / f"sub-{label}_dseg.nii.gz"))
    assert np.array_equal(np.asanyarray(t1w.dataobj), image)  # never rescaled
    assert t1w.get_data_dtype() == image.dtype
    assert np.issubdtype(dseg.get_data_dtype(), np.integer)
    assert np.array_equal(np.asanyarray(dseg.dataobj), labels)  # voxel for voxel
    assert np.array_equal(dseg.affine, t1w.affine)
    np.testing.assert_allclose(t1w.affine, load_image(source_image).affine, atol=1e-6)


def read_tsv(path: Path) -> list[dict[str, str]]:
    lines = path.read_text().splitlines()
    return [dict(zip(lines[0].split("\t"), ln.split("\t"))) for ln in lines[1:]]


# ----------------------------------------------------------------------------- presets


def test_lpba40_loni_layout_every_format(tmp_path):
    src, dest = tmp_path / "LPBA40", tmp_path / "bids"
    data = make_lpba40(src)
    before = tree_hash(src)
    result = convert("lpba40", src, dest)
    assert tree_hash(src) == before  # SRC untouched
    assert result.n_subjects == 4 and not result.skipped
    check_bids(dest, ["01", "02", "03", "04"])
    assert read_tsv(dest / "participants.tsv") == [
        {"participant_id": f"sub-0{i}", "source_id": f"S0{i}"} for i in range(1, 5)]
    for i, (suffix, sid) in enumerate(zip((".img", ".img.gz", ".nii", ".nii.gz"), data), start=1):
        check_subject(dest, f"0{i}", src / sid / f"{sid}.delineation.skullstripped{suffix}", *data[sid])
    assert read_tsv(dest / "derivatives" / "labels" / "dseg.tsv") == [
        {"index": "21", "name": "L superior frontal gyrus"}, {"index": "22", "name": "R superior frontal gyrus"},
        {"index": "181", "name": "cerebellum"}]
    assert "lpba40_labels.tsv" in result.label_table


def test_lpba40_builtin_names_and_subject_filter(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "bids"
    make_lpba40(src, table=False)
    result = convert("lpba40", src, dest, subjects=["S02", "sub-04"])
    assert [r["source_id"] for r in result.converted] == ["S02", "S04"]
    check_bids(dest, ["02", "04"])
    rows = read_tsv(dest / "derivatives" / "labels" / "dseg.tsv")
    assert len(rows) == 56 and {int(r["index"]): r["name"] for r in rows} == LPBA40_LABELS
    with pytest.raises(ConvertError, match="S09"):
        convert("lpba40", src, tmp_path / "other", subjects=["S09"])


def test_lpba40_explicit_label_table_and_klein_layout(tmp_path):
    src, dest = tmp_path / "archive", tmp_path / "bids"
    data = make_klein(src / "LPBA40", ["l1", "l2"])
    table = tmp_path / "names.tsv"
    table.write_text("index\tname\tabbreviation\n0\tbackground\tbg\n21\tleft\tL\n22\tright\tR\n181\tcbl\tC\n")
    result = convert("lpba40", src, dest, label_table=table)
    assert "Klein" in result.layout
    check_bids(dest, ["01", "02"])
    check_subject(dest, "01", src / "LPBA40" / "Brains" / "l1.img", *data["l1"][:2])
    assert [r["name"] for r in read_tsv(dest / "derivatives" / "labels" / "dseg.tsv")] == \
        ["background", "left", "right", "cbl"]


def test_lpba40_nested_download_duplicates_and_no_heads(tmp_path):
    src = tmp_path / "download"
    data = make_lpba40(src / "LPBA40" / "delineation_space", suffixes=(".img.gz", ".nii"))
    # the same file in a second format: the NIfTI wins, no ambiguity
    for kind, array in (("skullstripped", data["S01"][0]), ("structure.label", data["S01"][1])):
        write(src / "LPBA40" / "delineation_space" / "S01" / f"S01.delineation.{kind}.nii.gz", array)
    result = convert("lpba40", src, tmp_path / "bids")
    assert result.n_subjects == 2 and result.converted[0]["image"].endswith("S01.delineation.skullstripped.nii.gz")
    check_bids(tmp_path / "bids", ["01", "02"])
    with pytest.raises(ConvertError, match="no head images"):
        convert("lpba40", src, tmp_path / "heads", use_heads=True)


@pytest.mark.parametrize("preset, folder, ids, labels", [
    ("cumc12", "CUMC12", ["m1", "m2", "m10"], ["01", "02", "10"]),
    ("mgh10", "MGH10", ["g1", "g2"], ["01", "02"]),
    ("ibsr18", "IBSR18", ["IBSR_01", "IBSR_02"], ["01", "02"]),
])
def test_klein_archives(tmp_path, preset, folder, ids, labels):
    src, dest = tmp_path / "downloads", tmp_path / "bids"
    data = make_klein(src / folder, ids)
    before = tree_hash(src)
    result = convert(preset, src, dest)  # SRC is the archive's parent: the folder is found
    assert tree_hash(src) == before
    check_bids(dest, labels)
    for sid, lab in zip(ids, labels):
        check_subject(dest, lab, src / folder / "Brains" / f"{sid}.img", *data[sid][:2])
    assert [r["source_id"] for r in read_tsv(dest / "participants.tsv")] == ids
    # no label table anywhere: the values are the names
    assert read_tsv(dest / "derivatives" / "labels" / "dseg.tsv") == [
        {"index": v, "name": v} for v in ("21", "22", "181")]
    assert result.label_table.startswith("none")
    # --use-heads converts Heads/ (a fresh DEST)
    convert(preset, src / folder, tmp_path / "heads", use_heads=True)
    check_subject(tmp_path / "heads", labels[0], src / folder / "Heads" / f"{ids[0]}.img",
                  data[ids[0]][2], data[ids[0]][1])
    with pytest.raises(ConvertError, match=r"\(head images\)"):  # brains into a heads dataset: refused
        convert(preset, src / folder, tmp_path / "heads")


def test_ibsr18_nitrc_layout_with_freesurfer_lut(tmp_path):
    src, dest = tmp_path / "IBSR_nifti", tmp_path / "bids"
    data = {}
    for i in (1, 2):
        sid = f"IBSR_{i:02d}"
        image, labels = volumes(i, label_values=(17, 53, 16))
        head = image + 7
        write(src / sid / f"{sid}_ana_strip.nii.gz", image)
        write(src / sid / f"{sid}_ana.nii.gz", head)
        write(src / sid / f"{sid}_seg_ana.nii.gz", labels)
        data[sid] = (image, labels, head)
    (src / "FreeSurferColorLUT.txt").write_text(
        "# FreeSurfer LUT\n0   Unknown  0 0 0 0\n16  Brain-Stem  119 159 176 0\n17  Left-Hippocampus  220 216 20 0\n"
        "53  Right-Hippocampus  220 216 20 0\n1000 ctx-lh-unknown 25 5 25 0\n")
    convert("ibsr18", src, dest)
    check_bids(dest, ["01", "02"])
    check_subject(dest, "02", src / "IBSR_02" / "IBSR_02_ana_strip.nii.gz", *data["IBSR_02"][:2])
    # a LUT names only the labels the maps hold
    assert read_tsv(dest / "derivatives" / "labels" / "dseg.tsv") == [
        {"index": "16", "name": "Brain-Stem"}, {"index": "17", "name": "Left-Hippocampus"},
        {"index": "53", "name": "Right-Hippocampus"}]
    convert("ibsr18", src, tmp_path / "heads", use_heads=True)
    check_subject(tmp_path / "heads", "01", src / "IBSR_01" / "IBSR_01_ana.nii.gz",
                  data["IBSR_01"][2], data["IBSR_01"][1])


def make_mindboggle(src: Path) -> dict[str, tuple]:
    data = {}
    for group, n in (("OASIS-TRT-20", 2), ("MMRR-21", 1)):
        for i in range(1, n + 1):
            sid = f"{group}-{i}"
            folder = src / f"{group}_volumes" / sid
            image, labels = volumes(30 + i + len(group), label_values=(1002, 2002, 17))
            image = image.astype(np.float32) / 7
            write(folder / "t1weighted_brain.nii.gz", image)
            write(folder / "t1weighted.nii.gz", image + 1)
            write(folder / "labels.DKT31.manual+aseg.nii.gz", labels)
            cortical = np.where(labels >= 1000, labels, 0).astype(np.int16)
            write(folder / "labels.DKT31.manual.nii.gz", cortical)
            data[sid] = (image, labels, cortical)
    return data


def test_mindboggle101(tmp_path):
    src, dest = tmp_path / "mindboggle", tmp_path / "bids"
    data = make_mindboggle(src)
    before = tree_hash(src)
    convert("mindboggle101", src, dest)
    assert tree_hash(src) == before
    check_bids(dest, ["MMRR211", "OASISTRT201", "OASISTRT202"])
    check_subject(dest, "OASISTRT202", src / "OASIS-TRT-20_volumes" / "OASIS-TRT-20-2" / "t1weighted_brain.nii.gz",
                  *data["OASIS-TRT-20-2"][:2])
    assert read_tsv(dest / "participants.tsv") == [
        {"participant_id": "sub-MMRR211", "source_id": "MMRR-21-1", "group": "MMRR-21"},
        {"participant_id": "sub-OASISTRT201", "source_id": "OASIS-TRT-20-1", "group": "OASIS-TRT-20"},
        {"participant_id": "sub-OASISTRT202", "source_id": "OASIS-TRT-20-2", "group": "OASIS-TRT-20"}]
    assert [r["name"] for r in read_tsv(dest / "derivatives" / "labels" / "dseg.tsv")] == ["17", "1002", "2002"]
    # the cortical-only labels, names from a given LUT
    lut = tmp_path / "lut.txt"
    lut.write_text("17 Left-Hippocampus 1 2 3 0\n1002 ctx-lh-caudalanteriorcingulate 1 2 3 0\n"
                   "2002 ctx-rh-caudalanteriorcingulate 1 2 3 0\n")
    other = tmp_path / "cortical"
    convert("mindboggle101", src / "OASIS-TRT-20_volumes", other, labels="*/labels.DKT31.manual.nii.gz",
            label_table=lut)
    check_bids(other, ["OASISTRT201", "OASISTRT202"])  # the same labels as from the whole tree
    check_subject(other, "OASISTRT201", src / "OASIS-TRT-20_volumes" / "OASIS-TRT-20-1" / "t1weighted_brain.nii.gz",
                  data["OASIS-TRT-20-1"][0], data["OASIS-TRT-20-1"][2])
    assert [r["name"] for r in read_tsv(other / "derivatives" / "labels" / "dseg.tsv")] == \
        ["ctx-lh-caudalanteriorcingulate", "ctx-rh-caudalanteriorcingulate"]


def test_folder_preset_default_ids_and_regex(tmp_path):
    src = tmp_path / "src"
    a, la = volumes(1)
    b, lb = volumes(2)
    write(src / "images" / "subjA_t1.nii", a.astype(np.float32))
    write(src / "images" / "subjB_t1.nii", b.astype(np.float32))
    write(src / "seg" / "subjA_seg.nii.gz", la)
    write(src / "seg" / "subjB_seg.nii.gz", lb)
    table = tmp_path / "t.tsv"
    table.write_text("index\tname\n21\ta\n22\tb\n181\tc\n")
    convert("folder", src, tmp_path / "d1", images="images/*_t1.nii", labels="seg/*.nii.gz", label_table=table)
    check_bids(tmp_path / "d1", ["subjA", "subjB"])
    check_subject(tmp_path / "d1", "subjB", src / "images" / "subjB_t1.nii", b.astype(np.float32), lb)
    convert("folder", src, tmp_path / "d2", images=["images/*_t1.nii"], labels=["seg/*"],
            subject_regex=r"subj(?P<id>[AB])_")
    check_bids(tmp_path / "d2", ["A", "B"])
    with pytest.raises(ConvertError, match="--images"):
        convert("folder", src, tmp_path / "d3")


def test_cli_convert(tmp_path, capsys):
    src, dest = tmp_path / "LPBA40", tmp_path / "bids"
    data = make_lpba40(src, suffixes=(".img.gz", ".nii.gz"))
    assert main(["convert", "lpba40", str(src), str(dest)]) == 0
    out = capsys.readouterr().out
    assert "converted 2 subject(s)" in out and str(dest) in out and "redistribution" in out
    check_bids(dest, ["01", "02"])
    check_subject(dest, "01", src / "S01" / "S01.delineation.skullstripped.img.gz", *data["S01"])
    # a non-empty folder that is not this conversion: refused with exit status 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["convert", "lpba40", str(src), str(other)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", "lpba40", str(src), str(tmp_path / "src_labels"), "--subject-labels", "source",
                 "--subjects", "S02", "-q"]) == 0
    check_bids(tmp_path / "src_labels", ["S02"])


# ----------------------------------------------------------------------------- errors


def test_missing_label_map_names_the_file_and_skip_bad(tmp_path, capsys):
    src = tmp_path / "src"
    make_lpba40(src, suffixes=(".nii.gz", ".nii.gz", ".nii.gz"))
    (src / "S02" / "S02.delineation.structure.label.nii.gz").unlink()
    with pytest.raises(ConvertError, match=r"S02\.delineation\.skullstripped\.nii\.gz: no label map"):
        convert("lpba40", src, tmp_path / "d1")
    result = convert("lpba40", src, tmp_path / "d2", skip_bad=True)
    assert [r["source_id"] for r in result.converted] == ["S01", "S03"]
    assert [sid for sid, _ in result.skipped] == ["S02"]
    check_bids(tmp_path / "d2", ["01", "03"])
    assert main(["convert", "lpba40", str(src), str(tmp_path / "d3"), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 subject(s)" in out and "S02" in out


def test_image_missing_for_a_label_map(tmp_path):
    src = tmp_path / "CUMC12"
    make_klein(src, ["m1", "m2"])
    (src / "Brains" / "m2.img").unlink()
    (src / "Brains" / "m2.hdr").unlink()
    with pytest.raises(ConvertError, match=r"Atlases/m2\.img: label map of subject m2 has no image"):
        convert("cumc12", src, tmp_path / "d")


def test_mismatched_grid_names_both_files(tmp_path):
    src = tmp_path / "src"
    make_lpba40(src, suffixes=(".nii.gz", ".nii.gz"))
    _, labels = volumes(2)
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    write(src / "S02" / "S02.delineation.structure.label.nii.gz", labels, shifted)
    with pytest.raises(ImageError) as err:
        convert("lpba40", src, tmp_path / "d1")
    assert "S02.delineation.structure.label.nii.gz" in str(err.value)
    assert "S02.delineation.skullstripped.nii.gz" in str(err.value) and "affine" in str(err.value)
    write(src / "S02" / "S02.delineation.structure.label.nii.gz", labels[:, :, :8])
    with pytest.raises(ImageError, match=r"structure\.label\.nii\.gz: label map shape \(12, 14, 8\)"):
        convert("lpba40", src, tmp_path / "d2", subjects=["S02"])


def test_unreadable_file_is_named(tmp_path):
    src = tmp_path / "src"
    make_lpba40(src, suffixes=(".nii.gz", ".nii.gz"))
    bad = src / "S01" / "S01.delineation.skullstripped.nii.gz"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match=r"S01\.delineation\.skullstripped\.nii\.gz: cannot be read"):
        convert("lpba40", src, tmp_path / "d1")
    result = convert("lpba40", src, tmp_path / "d2", skip_bad=True)
    assert [sid for sid, _ in result.skipped] == ["S01"] and "cannot be read" in result.skipped[0][1]


def test_destination_rules(tmp_path):
    src = tmp_path / "src"
    make_lpba40(src, suffixes=(".nii.gz", ".nii.gz", ".nii.gz"))
    before = tree_hash(src)
    with pytest.raises(ConvertError, match="inside the source"):
        convert("lpba40", src, src / "bids")
    assert tree_hash(src) == before
    dest = tmp_path / "bids"
    dest.mkdir()
    (dest / "other.txt").write_text("x")
    with pytest.raises(ConvertError, match="not empty"):
        convert("lpba40", src, dest)
    convert("lpba40", src, dest, overwrite=True, subjects=["S01"])
    assert (dest / "other.txt").read_text() == "x"  # nothing deleted
    # DEST now holds this conversion: a re-run adds subjects without --overwrite, participants merged
    convert("lpba40", src, dest, subjects=["S03"])
    assert [r["source_id"] for r in read_tsv(dest / "participants.tsv")] == ["S01", "S03"]
    # ... but another preset or source is refused
    with pytest.raises(ConvertError, match="converted from"):
        convert("folder", src, dest, images="*/*skullstripped*", labels="*/*label*")


def test_subject_labels_rules():
    def labels(ids, style="auto"):
        return bids_labels(ids, style)

    assert labels(["S01", "S02", "S40"]) == ["01", "02", "40"]
    assert labels(["m1", "m12"]) == ["01", "12"]
    assert labels(["IBSR_01", "IBSR_18"]) == ["01", "18"]
    assert labels(["s1", "s100"]) == ["001", "100"]
    assert labels(["a1", "b2"]) == ["a1", "b2"]  # different prefixes: the ids themselves
    assert labels(["S01", "S1"]) == ["S01", "S1"]  # numbers clash: the ids themselves
    assert labels(["S01"], "source") == ["S01"]
    with pytest.raises(ConvertError, match="both become sub-ab"):
        labels(["a-b", "a_b"])


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_lpba40_two_subjects(lpba40_dir, tmp_path):
    """Two real LPBA40 subjects into tmp_path only (LONI's terms forbid redistribution)."""
    dest = tmp_path / "lpba40_bids"
    result = convert("lpba40", lpba40_dir, dest, subjects=["S01", "S02"])
    assert result.n_subjects == 2
    check_bids(dest, ["01", "02"])
    for sid, label in (("S01", "01"), ("S02", "02")):
        src_img = lpba40_dir / sid / f"{sid}.delineation.skullstripped.nii.gz"
        src_lab = lpba40_dir / sid / f"{sid}.delineation.structure.label.nii.gz"
        t1w = nib.load(str(dest / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"))
        dseg = nib.load(str(dest / "derivatives" / "labels" / f"sub-{label}" / "anat" / f"sub-{label}_dseg.nii.gz"))
        assert np.array_equal(np.asanyarray(t1w.dataobj), np.asanyarray(nib.load(str(src_img)).dataobj))
        assert np.array_equal(np.asanyarray(dseg.dataobj), load_image(src_lab, labels=True).get_fdata())
        assert np.array_equal(dseg.affine, t1w.affine)
    rows = read_tsv(dest / "derivatives" / "labels" / "dseg.tsv")
    assert len(rows) == 56
