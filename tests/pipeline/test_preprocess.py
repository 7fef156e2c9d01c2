"""preprocess.py and templates.py: N4, skull-strip detection, atlas-based brain extraction, full preprocessing.

The fast tests run on 3 mm grids built from the MNI template that ships with nilearn: a synthetic *head*
is made from a skull-stripped brain by wrapping it in CSF, bone, muscle and fat layers of irregular
thickness (other thicknesses and intensities than the pseudo-head that brain_extract wraps around its
template), multiplying by a smooth bias field, adding Rician noise and moving it by a known affine.
The real-data tests (marked ``slow`` and ``realdata``) do the same at 1 mm with LPBA40 brains.
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import rotation_scaling_affine, warp_by
from scipy import ndimage

from hdar_pipeline.core import templates
from hdar_pipeline.core.images import Grid, ImageError, load_image, new_image, normalize_intensity
from hdar_pipeline.pipeline.preprocess import (
    BRAIN_FLOOR,
    BrainExtractionInfo,
    PreprocessResult,
    brain_extract,
    is_skull_stripped,
    n4_bias_correct,
    preprocess_t1w,
    skull_strip_evidence,
)
from hdar_pipeline.core.templates import mni_template
from hdar_pipeline.core.transforms import Transform

#: Default head layers: (thickness mm, intensity relative to the brain's 99th percentile).
HEAD_LAYERS = ((2.5, 0.12), (6.0, 0.04), (2.5, 0.45), (3.5, 0.95))


def dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def bias_field(shape: tuple[int, int, int], strength: float = 0.35) -> np.ndarray:
    """A smooth multiplicative field (about 0.6-1.6 across the volume)."""
    c = [(np.arange(n, dtype=np.float32) - n / 2) / n for n in shape]
    x, y, z = c[0][:, None, None], c[1][None, :, None], c[2][None, None, :]
    return np.exp(strength * (x + 0.8 * y - 0.6 * z + 1.5 * x * y + z ** 2)).astype(np.float32)


def synthetic_head(brain: nib.Nifti1Image, mask: np.ndarray, *, seed: int = 0, layers=HEAD_LAYERS,
                   bias: float = 0.35, noise: float = 0.02, zero_background: bool = False,
                   pad_mm: float = 30.0, affine_kw: dict | None = None) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """A T1w-like head around a skull-stripped ``brain`` and its true brain mask (uint8), both moved by a
    known affine (``rotation_scaling_affine(**affine_kw)``)."""
    rng = np.random.default_rng(seed)
    grid = Grid.of(brain)
    spacing = grid.spacing
    data = np.asarray(brain.dataobj, np.float32)
    data = data / np.percentile(data[mask], 99)
    pad = int(np.ceil(pad_mm / spacing.min()))
    data, inside = np.pad(data, pad), np.pad(mask, pad)
    affine = grid.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, float(pad))
    padded = Grid(data.shape, affine)
    depth = ndimage.distance_transform_edt(~inside, sampling=spacing)
    wobble = ndimage.gaussian_filter(rng.standard_normal(data.shape), 10.0 / spacing)
    depth += wobble / np.abs(wobble).max()  # +-1 mm: the layers are not parallel surfaces
    shell = np.zeros_like(data)
    start = 0.0
    for thickness, value in layers:
        shell[(depth > start) & (depth <= start + thickness)] = value
        start += thickness
    head = np.where(inside, data, ndimage.gaussian_filter(shell, 0.5 / spacing))
    head *= bias_field(head.shape, bias)
    if zero_background:
        head[depth > start] = 0.0
    else:
        head = np.sqrt((head + rng.normal(0, noise, head.shape)) ** 2 + rng.normal(0, noise, head.shape) ** 2)
    truth = Transform.from_affine(rotation_scaling_affine(padded, **(affine_kw or {})), padded)
    moved = warp_by(new_image(head.astype(np.float32), padded), truth)
    moved_mask = warp_by(new_image(inside.astype(np.uint8), padded), truth, labels=True)
    return moved, moved_mask


@pytest.fixture(scope="module")
def mni3():
    t1, mask = mni_template(3.0)
    return t1, np.asarray(mask.dataobj) > 0


@pytest.fixture(scope="module")
def head3(mni3):
    t1, mask = mni3
    return synthetic_head(t1, mask, seed=1)


@pytest.fixture(scope="module")
def preprocessed_head3(head3, mni3) -> tuple[PreprocessResult, float]:
    start = time.perf_counter()
    result = preprocess_t1w(head3[0], mni3[0], seed=1, threads=2)
    return result, time.perf_counter() - start


# ----------------------------------------------------------------------------- templates


def test_mni_template_is_packaged_and_sane():
    t1, mask = mni_template()
    assert t1.shape == (197, 233, 189) and np.allclose(Grid.of(t1).spacing, 1.0)
    assert nib.aff2axcodes(t1.affine) == ("R", "A", "S")
    data, m = np.asarray(t1.dataobj), np.asarray(mask.dataobj) > 0
    assert data.dtype == np.float32 and data.min() == 0.0 and data.max() == 1.0
    assert 1.7 < m.sum() / 1e6 < 2.0  # litres
    assert dice(m, data > 0) > 0.99  # gm+wm, closed, with a CSF margin: the template's own support
    t3, m3 = mni_template(3.0)
    assert np.allclose(Grid.of(t3).spacing, 3.0) and t3.shape == (66, 78, 63)
    assert abs(np.asarray(m3.dataobj).sum() * 27e-6 - m.sum() / 1e6) < 0.05
    # The world extent is kept: the centres of mass of the masks agree within a voxel.
    com = lambda img: img.affine[:3, :3] @ np.array(ndimage.center_of_mass(np.asarray(img.dataobj))) + img.affine[:3, 3]
    assert np.linalg.norm(com(mask) - com(m3)) < 1.5


def test_missing_nilearn_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(templates.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImageError, match="nilearn"):
        templates.nilearn_data_dir()


def test_missing_template_file_gives_a_clear_error(monkeypatch, tmp_path):
    class Spec:
        submodule_search_locations = [str(tmp_path)]

    (tmp_path / "datasets" / "data").mkdir(parents=True)
    monkeypatch.setattr(templates.importlib.util, "find_spec", lambda name: Spec())
    with pytest.raises(ImageError, match="mni_icbm152_t1_tal_nlin_sym_09a"):
        templates.nilearn_data_dir()


# ----------------------------------------------------------------------------- skull-strip detection


def test_skull_stripped_detection(mni3, head3):
    t1, mask = mni3
    assert is_skull_stripped(t1)
    evidence = skull_strip_evidence(head3[0])
    assert not evidence.skull_stripped and "background" in evidence.reason
    # A head whose air was zeroed (as some scanners and defacing tools do) is still a head.
    zeroed, _ = synthetic_head(t1, mask, seed=2, zero_background=True)
    evidence = skull_strip_evidence(zeroed)
    assert not evidence.skull_stripped, evidence
    assert evidence.background_fraction > 0.2


def test_the_evidence_on_the_foreground_box_is_that_of_the_whole_field_of_view(mni3, head3, monkeypatch):
    """The check runs on the foreground's box plus a voxel: the same numbers as on the whole volume (the box
    replaced by every voxel), for a brain off-centre in a large field of view, a head, a head whose air was zeroed
    and a brain cut by the volume's edge."""
    from hdar_pipeline.pipeline import preprocess as P

    t1, mask = mni3
    data = np.asarray(t1.dataobj, dtype=np.float32)
    big = np.zeros(tuple(n + pad for n, pad in zip(data.shape, (40, 30, 25))), np.float32)
    big[30:30 + data.shape[0], 5:5 + data.shape[1], 20:20 + data.shape[2]] = data  # off-centre in a larger view
    edge = np.zeros_like(data)
    edge[:, : data.shape[1] - 10] = data[:, 10:]
    zeroed, _ = synthetic_head(t1, mask, seed=2, zero_background=True)
    images = (nib.Nifti1Image(big, t1.affine), head3[0], zeroed, nib.Nifti1Image(edge, t1.affine))
    boxed = [skull_strip_evidence(img) for img in images]
    assert P._foreground_box(np.zeros((4, 4, 4), bool)) == (slice(0, 4),) * 3  # nothing in front: every voxel
    monkeypatch.setattr(P, "_foreground_box", lambda m: (slice(None),) * 3)
    for img, ours in zip(images, boxed):
        whole = skull_strip_evidence(img)
        assert ours.skull_stripped == whole.skull_stripped and ours.reason.split("(")[0] == whole.reason.split("(")[0]
        assert ours.background_fraction == whole.background_fraction
        assert ours.foreground_volume_l == pytest.approx(whole.foreground_volume_l, rel=1e-12)
        assert ours.shell_dip == pytest.approx(whole.shell_dip, rel=1e-9, nan_ok=True)


# ----------------------------------------------------------------------------- N4


def test_n4_removes_a_known_bias_field(mni3):
    t1, mask = mni3
    data = np.asarray(t1.dataobj)
    wm = ndimage.binary_erosion(mask & (data > np.percentile(data[mask], 75)))  # a bright, homogeneous class
    field = bias_field(data.shape, 0.5)  # 0.8-1.45 inside the brain
    biased = new_image(data * field, t1)
    cov = lambda a: float(a[wm].std() / a[wm].mean())
    corrected, estimate = n4_bias_correct(biased, new_image(mask.astype(np.uint8), t1), threads=2,
                                          return_field=True)
    out, est = np.asarray(corrected.dataobj), np.asarray(estimate.dataobj)
    r = np.corrcoef(np.log(est[mask]), np.log(field[mask]))[0, 1]
    print(f"N4: coefficient of variation in white matter {cov(data):.3f} clean, {cov(data * field):.3f} biased, "
          f"{cov(out):.3f} corrected; log-field correlation {r:.2f}")
    assert cov(out) < 0.5 * cov(data * field)
    assert cov(out) < 2.0 * cov(data)
    assert r > 0.6  # the estimated field follows the true one (up to N4's arbitrary scale)
    assert np.allclose(out * est, data * field, rtol=1e-4, atol=1e-6)  # corrected = input / field
    assert np.all(out[data == 0] == 0)  # zeros stay zero
    # Fewer fitting levels (a smoother field) fit this global field even better.
    smooth = np.asarray(n4_bias_correct(biased, mask, iterations=(50, 50, 50), threads=2).dataobj)
    assert cov(smooth) < 1.5 * cov(data)


@pytest.mark.parametrize("voxel_mm, shape, expected", [(1.0, (160, 192, 160), 8), (2.0, (96, 128, 96), 4),
                                                      (1.0, (160, 192, 64), 4), (0.5, (320, 320, 320), 16)])
def test_n4_estimates_at_about_8_mm_by_default(monkeypatch, voxel_mm, shape, expected):
    """The default shrink factor is N4_WORKING_MM over the voxel size, capped so that the shrunk image keeps
    16 voxels per axis (a thin slab keeps a finer estimate); an explicit shrink_factor is used as given."""
    import ants

    import hdar_pipeline.pipeline.preprocess as prep

    seen = []

    def fake_n4(image, **kwargs):
        seen.append(kwargs["shrink_factor"])
        return image.new_image_like(np.ones(image.shape, dtype=np.float32))

    monkeypatch.setattr(ants, "n4_bias_field_correction", fake_n4)
    data = np.zeros(shape, np.float32)
    data[tuple(slice(n // 4, 3 * n // 4) for n in shape)] = 100.0
    img = nib.Nifti1Image(data, np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0]))
    prep.n4_bias_correct(img, data > 0)
    prep.n4_bias_correct(img, data > 0, shrink_factor=2)
    assert seen == [expected, 2]


def test_n4_errors(mni3):
    t1, mask = mni3
    with pytest.raises(ImageError, match="mask"):
        n4_bias_correct(t1, np.ones((4, 4, 4), bool))
    with pytest.raises(ImageError, match="empty"):
        n4_bias_correct(t1, np.zeros(t1.shape, bool))


# ----------------------------------------------------------------------------- brain extraction


def test_preprocess_head_extracts_the_brain(preprocessed_head3, head3, mni3):
    result, seconds = preprocessed_head3
    head, truth = head3
    assert not result.skull_stripped_input
    d = dice(result.native_mask.dataobj, truth.dataobj)
    print(f"synthetic MNI head at 3 mm: brain mask Dice {d:.3f}, preprocess_t1w {seconds:.1f} s")
    assert d >= 0.9
    assert any("brain extraction: MNI152NLin2009aSym" in s for s in result.steps)
    assert [s.split(":")[0].split(" ")[0] for s in result.steps][:2] == ["skull-strip", "N4"]


def test_preprocess_head_outputs_on_the_atlas_grid(preprocessed_head3, mni3):
    result, _ = preprocessed_head3
    atlas, atlas_mask = mni3
    assert isinstance(result.to_atlas, Transform) and not result.to_atlas.has_field
    assert Grid.of(result.image).same_as(Grid.of(atlas)) and Grid.of(result.mask).same_as(Grid.of(atlas))
    image = np.asarray(result.image.dataobj)
    assert image.dtype == np.float32 and image.min() >= 0.0 and image.max() <= 1.0
    # Affinely aligned: the brain lands on the atlas brain, and intensities correlate.
    assert dice(result.mask.dataobj, atlas_mask) > 0.85
    inside = atlas_mask
    assert np.corrcoef(image[inside], np.asarray(atlas.dataobj)[inside])[0, 1] > 0.7
    native, nmask = np.asarray(result.native_brain.dataobj), np.asarray(result.native_mask.dataobj) > 0
    assert np.array_equal(native != 0, nmask) and native.max() <= 1.0 and native[nmask].min() >= BRAIN_FLOOR
    # to_atlas maps the native brain onto the atlas-grid image.
    again = np.asarray(result.to_atlas.apply(result.native_brain).dataobj)
    assert np.allclose(np.clip(again, 0, 1), image, atol=1e-5)


def test_brain_extract_on_a_different_head(mni3):
    """Thicker bone, thinner scalp, zeroed air, opposite rotation: the mask is still found."""
    t1, mask = mni3
    head, truth = synthetic_head(t1, mask, seed=3, layers=((1.5, 0.1), (8.0, 0.03), (4.0, 0.5), (2.0, 0.8)),
                                 zero_background=True, bias=0.0,
                                 affine_kw=dict(angles_deg=(-7.0, 3.0, -4.0), translation_mm=(-4.0, 6.0, -3.0),
                                                scale=(0.95, 0.97, 0.94)))
    info = BrainExtractionInfo()
    brain, brain_mask = brain_extract(head, seed=0, threads=2, info=info)
    d = dice(brain_mask.dataobj, truth.dataobj)
    print(f"brain_extract (zeroed air, thick bone): Dice {d:.3f}, {info}")
    assert d >= 0.9
    assert Grid.of(brain).same_as(Grid.of(head)) and np.asarray(brain_mask.dataobj).dtype == np.uint8
    b = np.asarray(brain.dataobj)
    assert np.all(b[np.asarray(brain_mask.dataobj) == 0] == 0)


# ----------------------------------------------------------------------------- skull-stripped input


def test_skull_stripped_input_passes_through(mni3):
    t1, mask = mni3
    # A stripped brain with a mild bias, moved off the atlas by a known affine.
    truth = Transform.from_affine(rotation_scaling_affine(Grid.of(t1), angles_deg=(5.0, 0.0, -3.0)), t1)
    subject = warp_by(new_image(np.asarray(t1.dataobj) * bias_field(t1.shape, 0.15), t1), truth)
    result = preprocess_t1w(subject, t1, seed=0, threads=2)
    assert result.skull_stripped_input and result.evidence.skull_stripped
    assert any("brain extraction: skipped" in s for s in result.steps)
    nz = np.asarray(subject.dataobj) != 0
    assert np.array_equal(np.asarray(result.native_mask.dataobj) > 0, nz)
    ref = np.asarray(normalize_intensity(subject).dataobj)[nz]
    assert np.corrcoef(np.asarray(result.native_brain.dataobj)[nz], ref)[0, 1] > 0.99
    # Forced modes are obeyed.
    forced = preprocess_t1w(subject, t1, skull_stripped=True, n4=False, seed=0, threads=2)
    assert forced.evidence is None and not any("N4" in s for s in forced.steps)
    assert np.array_equal(np.asarray(forced.native_mask.dataobj) > 0, nz)


def test_a_skull_stripped_brain_stored_with_an_intensity_offset_keeps_its_mask(mni3):
    """int16 at value * 1200 + 40 (a scanner's rescale intercept): the background is 40, not 0. The brain mask is
    the brain, not the whole field of view, and the prepared brain is the one stored without the offset (before
    the fix: every voxel was 'brain', the atlas prepared from such a file had a background at 0.45, and the
    subjects' affines to it filled the field of view: mean Dice 0.02)."""
    t1, _ = mni3
    data = np.asarray(t1.dataobj, dtype=np.float32)
    scaled = np.round(data / data.max() * 1200.0)
    plain = nib.Nifti1Image(scaled.astype(np.int16), t1.affine)
    offset = nib.Nifti1Image((scaled + 40.0).astype(np.int16), t1.affine)
    a = preprocess_t1w(plain, t1, seed=0, threads=2, n4=False)
    b = preprocess_t1w(offset, t1, seed=0, threads=2, n4=False)
    assert b.skull_stripped_input and any("background stored at 40" in s for s in b.steps)
    assert np.array_equal(np.asarray(b.native_mask.dataobj) > 0, scaled != 0)
    assert np.allclose(np.asarray(b.native_brain.dataobj), np.asarray(a.native_brain.dataobj), atol=1e-6)
    with_n4 = preprocess_t1w(offset, t1, seed=0, threads=2)
    assert np.array_equal(np.asarray(with_n4.native_brain.dataobj) != 0, scaled != 0)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_give_clear_errors(tmp_path, mni3):
    t1, _ = mni3
    with pytest.raises(ImageError, match="file not found"):
        preprocess_t1w(tmp_path / "missing_T1w.nii.gz", t1)
    four_d = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), np.float32), np.eye(4)), str(four_d))
    with pytest.raises(ImageError, match="sub-01_T1w.nii.gz.*3-D"):
        preprocess_t1w(four_d, t1)
    with pytest.raises(ImageError, match="empty"):
        preprocess_t1w(new_image(np.zeros((20, 20, 20), np.float32), Grid((20, 20, 20), np.eye(4))), t1)
    with pytest.raises(ImageError, match="NaN"):
        is_skull_stripped(new_image(np.full((20, 20, 20), np.nan, np.float32), Grid((20, 20, 20), np.eye(4))))
    with pytest.raises(ValueError, match="skull_stripped"):
        preprocess_t1w(t1, t1, skull_stripped="maybe")
    with pytest.raises(ImageError, match="atlas.nii.gz: file not found"):
        preprocess_t1w(t1, tmp_path / "atlas.nii.gz")
    with pytest.raises(TypeError, match="nibabel image or a path"):
        brain_extract(np.zeros((10, 10, 10)))


# ----------------------------------------------------------------------------- real data (LPBA40)


def _lpba40_brain(lpba40_dir: Path, subject: str) -> nib.Nifti1Image:
    path = lpba40_dir / subject / f"{subject}.delineation.skullstripped.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return load_image(path)


@pytest.mark.slow
@pytest.mark.realdata
def test_lpba40_skull_stripped_passes_through(lpba40_dir):
    img = _lpba40_brain(lpba40_dir, "S01")
    atlas = _lpba40_brain(lpba40_dir, "S02")
    start = time.perf_counter()
    result = preprocess_t1w(img, atlas, seed=0, threads=2)
    seconds = time.perf_counter() - start
    nz = np.asarray(img.dataobj) != 0
    assert result.skull_stripped_input, result.evidence
    assert np.array_equal(np.asarray(result.native_mask.dataobj) > 0, nz)
    assert np.array_equal(np.asarray(result.native_brain.dataobj) != 0, nz)
    ref = np.asarray(normalize_intensity(img).dataobj)[nz]
    r = np.corrcoef(np.asarray(result.native_brain.dataobj)[nz], ref)[0, 1]
    print(f"LPBA40 S01 pass-through: correlation {r:.4f}, {seconds:.1f} s, steps {result.steps}")
    assert r > 0.99
    assert dice(result.mask.dataobj, np.asarray(atlas.dataobj) != 0) > 0.85


@pytest.mark.slow
@pytest.mark.realdata
def test_lpba40_synthetic_head_brain_mask(lpba40_dir):
    brain = _lpba40_brain(lpba40_dir, "S02")
    head, truth = synthetic_head(brain, np.asarray(brain.dataobj) != 0, seed=4)
    assert not is_skull_stripped(head)
    start = time.perf_counter()
    atlas = _lpba40_brain(lpba40_dir, "S01")
    result = preprocess_t1w(head, atlas, seed=0, threads=2)
    seconds = time.perf_counter() - start
    d = dice(result.native_mask.dataobj, truth.dataobj)
    print(f"LPBA40 S02 synthetic head at 1 mm: brain mask Dice {d:.3f}, preprocess_t1w {seconds:.1f} s, "
          f"{result.runtime_s}")
    assert d >= 0.9
    assert dice(result.mask.dataobj, np.asarray(atlas.dataobj) != 0) > 0.85


def test_an_atlas_taken_from_raw_heads_is_prepared_as_the_subjects(tmp_path, head3):
    """The BIDS App's --atlas-participant on a dataset of raw heads: the atlas is brain-extracted once (the
    subjects are; a head as atlas would align their brains to its skull), on its own grid, and reused."""
    from hdar_pipeline.pipeline.subject_steps import ATLAS_MARGIN_MM, prepare_atlas_files
    from hdar_pipeline.core.images import new_image, save_image

    head, true_mask = head3
    source = save_image(head, tmp_path / "sub-01_T1w.nii.gz")
    before = source.read_bytes()
    labels = save_image(new_image(np.asarray(true_mask.dataobj).astype(np.int16) * 7, head),
                        tmp_path / "sub-01_dseg.nii.gz")
    prepared = prepare_atlas_files(source, tmp_path / "atlas", name="sub-01", labels=labels, seed=1, threads=2)
    assert prepared.image.name == "sub-01_desc-brain_T1w.nii.gz" and source.read_bytes() == before
    img, lab = load_image(prepared.image), load_image(prepared.labels, labels=True)
    # cut to the brain's box plus the margin: a slice of the head's voxels, in the same world coordinates,
    # with the labels cut alike (they still apply)
    assert Grid.of(lab).same_as(Grid.of(img)) and all(a <= b for a, b in zip(img.shape, head.shape))
    start = np.round(np.linalg.solve(head.affine, img.affine)[:3, 3]).astype(int)
    assert np.allclose(head.affine[:3, :3], img.affine[:3, :3])
    assert np.allclose(head.affine @ np.r_[start, 1], img.affine[:, 3])
    cut = tuple(slice(a, a + n) for a, n in zip(start, img.shape))
    assert np.array_equal(np.asarray(lab.dataobj), np.asarray(nib.load(labels).dataobj)[cut])
    data = np.asarray(img.dataobj)
    full = np.zeros(head.shape, bool)
    full[cut] = data > 0
    assert is_skull_stripped(img) and not is_skull_stripped(head)
    assert dice(full, true_mask.dataobj) > 0.9
    assert 0.0 <= data.min() and data.max() <= 1.0
    # the margin: the brain keeps at least 10 mm (less only where the field of view ends) on every side
    brain = np.argwhere(data > 0)
    spacing = np.asarray(head.header.get_zooms()[:3])
    room_kept, room_there = brain.min(0) * spacing, (start + brain.min(0)) * spacing  # below the brain, mm
    assert (room_kept >= np.minimum(ATLAS_MARGIN_MM, room_there) - 1e-6).all()
    sidecar = prepared.image.with_name("sub-01_desc-brain_T1w.json").read_text()
    assert "brain extraction" in sidecar and "not skull-stripped" in sidecar and "cut to the brain" in sidecar
    # the same source and options: the files are reused as they are; other options: prepared again
    stamp = prepared.image.stat().st_mtime_ns
    again = prepare_atlas_files(source, tmp_path / "atlas", name="sub-01", labels=labels, seed=1, threads=2)
    assert again == prepared and prepared.image.stat().st_mtime_ns == stamp
    prepare_atlas_files(source, tmp_path / "atlas", name="sub-01", labels=labels, seed=1, threads=2, n4=False)
    assert prepared.image.stat().st_mtime_ns != stamp
    # the whole field of view on request
    whole = prepare_atlas_files(source, tmp_path / "whole", name="sub-01", seed=1, threads=2, margin_mm=None)
    assert whole.labels is None and Grid.of(load_image(whole.image)).same_as(Grid.of(head))
