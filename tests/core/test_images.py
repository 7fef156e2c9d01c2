"""images.py: loading in every supported format, validation errors, normalisation, resampling, conversions."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from hdar_pipeline.core.images import (
    Grid, ImageError, check_labels_match, from_ants, from_sitk, load_image, new_image, normalize_intensity,
    reorient_to, resample_to, to_ants, to_sitk,
)


def oblique_affine() -> np.ndarray:
    aff = np.diag([1.2, 1.0, 1.5, 1.0])
    th = 0.2
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    aff[:3, :3] = rot @ aff[:3, :3]
    aff[:3, 3] = [-20.0, 15.0, -30.0]
    return aff


@pytest.fixture
def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    data = np.zeros((20, 24, 18), np.float32)
    data[4:16, 5:20, 3:15] = rng.uniform(50, 100, size=(12, 15, 12))
    return data


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mgz", ".img", ".img.gz"])
def test_load_every_format_keeps_data_and_affine(tmp_path, volume, suffix):
    aff = oblique_affine()
    path = tmp_path / f"im{suffix}"
    if suffix == ".mgz":
        nib.save(nib.MGHImage(volume, aff), str(path))
    elif suffix.startswith(".img"):
        plain = tmp_path / "im.img"
        nib.save(nib.Nifti1Pair(volume, aff), str(plain))
        if suffix == ".img.gz":
            with open(plain, "rb") as src, gzip.open(path, "wb") as dst:  # LPBA40 style: .img.gz + .hdr
                shutil.copyfileobj(src, dst)
            plain.unlink()
    else:
        nib.save(nib.Nifti1Image(volume, aff), str(path))
    img = load_image(path)
    if suffix.startswith(".img"):
        # Analyze 7.5 has no rotation: nibabel reads the stored zooms/origin only.
        assert np.allclose(np.asarray(img.dataobj), volume)
    else:
        assert np.allclose(img.affine, aff, atol=1e-5)
        assert np.allclose(np.asarray(img.dataobj), volume)
    assert img.get_fdata().dtype == np.float64 and np.asarray(img.dataobj).dtype == np.float32


def test_load_analyze_through_hdr(tmp_path, volume):
    nib.save(nib.AnalyzeImage(volume, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "a.img"))
    img = load_image(tmp_path / "a.hdr")
    assert img.shape == volume.shape
    assert np.allclose(Grid.of(img).spacing, 2.0)


def test_4d_single_volume_is_squeezed(tmp_path, volume):
    nib.save(nib.Nifti1Image(volume[..., None], np.eye(4)), str(tmp_path / "v.nii.gz"))
    assert load_image(tmp_path / "v.nii.gz").shape == volume.shape


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda v: v[..., None].repeat(2, axis=3), "expected a 3-D image"),
        (lambda v: v[:, :, 0], "expected a 3-D image"),
        (lambda v: np.where(v > 90, np.nan, v).astype(np.float32), "NaN or infinite"),
        (lambda v: np.zeros_like(v), "empty"),
    ],
)
def test_bad_images_name_the_file_and_problem(tmp_path, volume, make, problem):
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(make(volume), np.eye(4)), str(path))
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_zero_voxel_size_and_unreadable_and_missing(tmp_path, volume):
    path = tmp_path / "flat.nii.gz"
    img = nib.Nifti1Image(volume, np.eye(4))
    img.to_filename(str(path))
    raw = nib.load(str(path))
    hdr = raw.header.copy()
    hdr.set_qform(None, code=0)
    hdr["srow_z"] = [0.0, 0.0, 0.0, 0.0]  # an sform that squashes the third axis
    hdr["sform_code"] = 1
    nib.Nifti1Image(volume, None, header=hdr).to_filename(str(path))
    assert np.linalg.det(nib.load(str(path)).affine[:3, :3]) == 0
    with pytest.raises(ImageError, match="voxel sizes must be positive"):
        load_image(path)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ImageError, match="cannot be read"):
        load_image(junk)
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "missing.nii.gz")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ImageError, match="unsupported file type"):
        load_image(tmp_path / "x.txt")


def test_label_maps(tmp_path, volume):
    labels = (volume > 75).astype(np.float32) * 3
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "l.nii.gz"))
    out = load_image(tmp_path / "l.nii.gz", labels=True)
    assert np.asarray(out.dataobj).dtype == np.int32 and set(np.unique(out.dataobj)) == {0, 3}
    nib.save(nib.Nifti1Image(volume / 7.0, np.eye(4)), str(tmp_path / "frac.nii.gz"))
    with pytest.raises(ImageError, match="non-integer"):
        load_image(tmp_path / "frac.nii.gz", labels=True)
    img = new_image(volume, Grid(volume.shape, np.eye(4)))
    other = new_image(labels[:-1], Grid(labels[:-1].shape, np.eye(4)))
    with pytest.raises(ImageError, match="does not match"):
        check_labels_match(img, other, labels_source="lab.nii.gz")


def test_load_never_writes_to_input(tmp_path, volume):
    path = tmp_path / "im.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    before = (path.stat().st_mtime_ns, path.read_bytes())
    img = load_image(path)
    normalize_intensity(img)
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im.nii.gz"]


def test_normalize_to_unit_range_with_robust_percentiles(volume):
    data = volume.copy()
    data[10, 10, 10] = 1e6  # an outlier must not squash the range
    img = normalize_intensity(new_image(data, Grid(data.shape, np.eye(4))))
    out = np.asarray(img.dataobj)
    assert out.min() == 0.0 and out.max() == 1.0
    inside = out[volume > 0]
    # the background (0) is the image's 0; the brain's values 50-100 land on 0.5-1 (the outlier clipped)
    assert 0.6 < np.median(inside) < 0.9 and 0.45 < inside.min() < 0.55
    assert np.all(out[volume == 0] == 0)


def test_resample_to_identity_grid_is_exact_and_shift_moves(volume):
    grid = Grid(volume.shape, oblique_affine())
    img = new_image(volume, grid)
    same = resample_to(img, grid)
    assert np.allclose(np.asarray(same.dataobj), volume, atol=1e-4)
    # A reference grid shifted by exactly one voxel along i samples the next voxel.
    shifted = oblique_affine()
    shifted[:3, 3] += shifted[:3, 0]
    out = np.asarray(resample_to(img, Grid(volume.shape, shifted)).dataobj)
    assert np.allclose(out[:-1], volume[1:], atol=1e-4)
    labels = new_image((volume > 75).astype(np.int32), grid)
    lab = resample_to(labels, Grid(volume.shape, shifted), interpolation="nearest")
    assert np.asarray(lab.dataobj).dtype == np.int32


def test_reorient_keeps_world_positions(volume):
    img = new_image(volume, Grid(volume.shape, np.diag([-1.0, -1.0, 1.0, 1.0])))  # LPS voxel axes
    ras = reorient_to(img, ("R", "A", "S"))
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    back = resample_to(ras, img)
    assert np.allclose(np.asarray(back.dataobj), volume)


def test_sitk_and_ants_round_trips_keep_geometry(volume):
    import SimpleITK as sitk

    grid = Grid(volume.shape, oblique_affine())
    img = new_image(volume, grid)
    s = to_sitk(img)
    assert s.GetSize() == volume.shape
    # Voxel (i, j, k) must sit at the same world point in both conventions (ITK: LPS).
    ijk = (3, 7, 11)
    lps = np.asarray(s.TransformIndexToPhysicalPoint(ijk))
    ras = grid.affine @ np.array([*ijk, 1.0])
    assert np.allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-6)
    assert s[ijk] == pytest.approx(volume[ijk])
    back = from_sitk(s)
    assert np.allclose(back.affine, grid.affine) and np.allclose(np.asarray(back.dataobj), volume)
    a = to_ants(img)
    assert np.allclose(a.numpy(), volume)
    back = from_ants(a)
    assert np.allclose(back.affine, grid.affine, atol=1e-6) and np.allclose(np.asarray(back.dataobj), volume)
    vec = np.random.default_rng(1).normal(size=(*volume.shape, 3)).astype(np.float32)
    sv = to_sitk(vec, grid)
    assert sv.GetNumberOfComponentsPerPixel() == 3
    assert np.allclose(sv[ijk], vec[ijk], atol=1e-6)
    assert sitk.GetArrayFromImage(sv).shape == (*volume.shape[::-1], 3)


def test_seed_zero_gives_a_nonzero_ants_seed(monkeypatch):
    import os

    from hdar_pipeline.core.runtime import seed_everything

    monkeypatch.delenv("ANTS_RANDOM_SEED", raising=False)
    seed_everything(0)
    assert os.environ["ANTS_RANDOM_SEED"] == "1"  # ANTs would read 0 as "seed from the clock"
    seed_everything(7)
    assert os.environ["ANTS_RANDOM_SEED"] == "8"
    with pytest.raises(ValueError):
        seed_everything(-1)
