"""HDAR outside LPBA40's frame, with the shipped weights: one held-out LPBA40 pair re-stored as other scanners
and datasets store brains (another axis order, a brain off-centre in a 256x256x180 field of view, 0.9 and
1.3 mm voxels, int16 with another range and an offset) registers as well as in its native frame, for every
preset. Dice is computed on each frame's own grid, as a user of that frame would.

A frame with other voxels changes the measurement as well as the registration: the fixed labels live on a
coarser or finer grid and the moving labels were interpolated once more. Each frame's Dice is therefore compared
with the native registration's own transform re-applied in that frame (the same world mapping, sampled on the
frame's grid): what is left is HDAR's dependence on the frame."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import mean_dice
from hdar_pipeline.core.images import load_image
from hdar_pipeline.methods.hdar_method import HDAR_PRESETS, HDARMethod
from hdar_pipeline.core.restoring import FRAMES, restore
from hdar_pipeline.core.transforms import Transform

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

MOVING, FIXED = "S21", "S24"  # validation subjects, never trained on


@pytest.fixture(scope="module")
def stored(lpba40_dir):
    def read(s):
        return (load_image(lpba40_dir / s / f"{s}.delineation.skullstripped.nii.gz"),
                load_image(lpba40_dir / s / f"{s}.delineation.structure.label.nii.gz", labels=True))

    (mi, ml), (fi, fl) = read(MOVING), read(FIXED)
    return {name: {"fixed": restore(fi, f), "moving": restore(mi, f), "fixed_labels": restore(fl, f, labels=True),
                   "moving_labels": restore(ml, f, labels=True)} for name, f in FRAMES.items()}


@pytest.mark.parametrize("preset", sorted(HDAR_PRESETS))
def test_every_frame_within_a_hundredth_of_the_native_dice(stored, preset):
    method = HDARMethod(preset=preset, seed=1, threads=2)
    native = method.register(stored["native"]["fixed"], stored["native"]["moving"])
    scores, in_frame, folded = {}, {}, {}
    for name, pair in stored.items():
        transform = native if name == "native" else method.register(pair["fixed"], pair["moving"])
        reference = np.asarray(pair["fixed_labels"].dataobj)
        warped = np.asarray(transform.apply(pair["moving_labels"], interpolation="nearest").dataobj)
        scores[name] = mean_dice(reference, warped)
        # the native registration's world mapping on this frame's grid: the frame's measurement, not its input
        native_here = native.compose(Transform.identity(pair["fixed"]))
        in_frame[name] = mean_dice(reference, np.asarray(native_here.apply(pair["moving_labels"],
                                                                           interpolation="nearest").dataobj))
        jac = transform.jacobian_determinant()
        folded[name] = float(100.0 * np.mean(jac[np.asarray(pair["fixed"].dataobj) > 0] <= 0))
    print(f"\n{preset}: " + ", ".join(f"{k} {v:.4f} (native transform here {in_frame[k]:.4f}, {folded[k]:.4f} % "
                                     f"folded)" for k, v in scores.items()))
    for name, value in scores.items():
        # HDAR registering in the frame against the native answer measured in the frame: within 0.005 everywhere
        # (measured on this pair: at most 0.0002 at 1 mm, 0.0020 at 0.9 and 1.3 mm, for every preset)
        assert abs(value - in_frame[name]) <= 0.005, (name, value, in_frame[name])
        # Against the native frame's own Dice: within 0.01 in the 1 mm frames. At 0.9 and 1.3 mm the frame's
        # grid itself costs the native answer up to 0.014 (re-applied at 1.3 mm: `refined` 0.7345 vs 0.7443,
        # `accurate` 0.7382 vs 0.7518: the more accurate the registration, the more a coarser label grid takes
        # from it), so HDAR may lose that and at most 0.005 more.
        same_voxels = FRAMES[name].voxel_size is None
        storage = abs(in_frame[name] - scores["native"])
        assert abs(value - scores["native"]) <= (0.01 if same_voxels else storage + 0.005), (
            name, value, scores["native"], in_frame[name])
        assert folded[name] == 0.0 or preset not in ("refined", "accurate"), (name, folded[name])
