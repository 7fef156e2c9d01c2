"""Property-based tests (hypothesis) for image loading and label evaluation (issue 14).

Image loading: whatever voxel size a NIfTI header carries (0, negative, NaN, infinite, tiny, ordinary), for
either orientation source (qform or sform), :func:`load_image` returns an image whose voxel sizes are the
header's, or refuses it with an :class:`ImageError` naming the file; never another exception, never a
silently repaired geometry (nibabel turns a 0 into 1 mm).

Label evaluation: for any pair of small label maps, :func:`evaluate` gives each label the Dice an
independent count gives, between 0 and 1, the same whichever map is the reference, 0 for every label
when the evaluated map is all background, and NaN only on a flagged row.
"""

from __future__ import annotations

import math
import struct

import nibabel as nib
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from hdar_pipeline.evaluation.evaluate import evaluate  # noqa: E402
from hdar_pipeline.core.images import Grid, ImageError, load_image, new_image  # noqa: E402

VOXEL = st.one_of(st.sampled_from([0.0, -1.0, -0.5, float("nan"), float("inf"), 1e-30, 1.0, 2.0]),
                  st.floats(min_value=0.05, max_value=8.0))


def write_raw_nifti(path, pixdim, *, qform: bool, sform: bool) -> None:
    """A 6x7x5 NIfTI-1 whose header says ``pixdim`` as given (nibabel would repair it on save)."""
    data = np.arange(6 * 7 * 5, dtype=np.float32).reshape(6, 7, 5) + 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1 if qform else 0)
    img.set_sform(affine, code=1 if sform else 0)
    header = bytearray(img.header.binaryblock)
    for axis, value in enumerate(pixdim):
        header[80 + 4 * axis:84 + 4 * axis] = struct.pack("<f", value)
    header[108:112] = struct.pack("<f", 352.0)
    path.write_bytes(bytes(header) + b"\0" * 4 + data.tobytes(order="F"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pixdim=st.tuples(VOXEL, VOXEL, VOXEL), qform=st.booleans(), sform=st.booleans())
def test_load_image_never_invents_a_voxel_size(tmp_path, pixdim, qform, sform):
    path = tmp_path / "img.nii"
    write_raw_nifti(path, pixdim, qform=qform, sform=sform)
    try:
        img = load_image(path)
    except ImageError as exc:
        assert str(exc).startswith(str(path) + ": ")
        return
    sizes = Grid.of(img).spacing
    assert all(math.isfinite(p) and p > 0 for p in pixdim), f"accepted pixdim {pixdim}"
    if not sform:  # the geometry comes from the header's voxel sizes: they must be the ones used
        assert np.allclose(sizes, pixdim, rtol=1e-5), (sizes, pixdim)


LABEL_MAPS = hnp.arrays(np.int16, (5, 6, 4), elements=st.integers(0, 4))


def dice_by_count(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    return 2 * float((x & y).sum()) / float(x.sum() + y.sum())


@settings(max_examples=150, deadline=None)
@given(ref=LABEL_MAPS, lab=LABEL_MAPS, lose_all=st.booleans())
def test_evaluate_dice_is_the_counted_dice(ref, lab, lose_all):
    if not ref.any():
        ref = ref.copy()
        ref[0, 0, 0] = 1
    if lose_all:
        lab = np.zeros_like(lab)
    grid = Grid(ref.shape, np.diag([1.5, 1.0, 2.0, 1.0]))
    table = evaluate(new_image(ref, grid), new_image(lab, grid), distances=False).labels.set_index("label")
    for label, row in table.iterrows():
        in_ref, in_lab = bool((ref == label).any()), bool((lab == label).any())
        if in_ref and in_lab:
            assert row["dice"] == pytest.approx(dice_by_count(ref, lab, label))
            assert 0 <= row["dice"] <= 1 and row["flag"] == ""
        elif in_ref:
            assert row["dice"] == 0 and row["flag"] == "missing_in_labels"  # a lost label: scored 0
        else:
            assert math.isnan(row["dice"]) and row["flag"] != ""
    if lab.any():  # symmetric where both maps hold the label
        swapped = evaluate(new_image(lab, grid), new_image(ref, grid), distances=False).labels.set_index("label")
        both = [v for v in table.index if (ref == v).any() and (lab == v).any()]
        assert np.allclose(table.loc[both, "dice"], swapped.loc[both, "dice"])
