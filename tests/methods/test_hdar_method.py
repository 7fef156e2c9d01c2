"""methods/hdar.py: HDARMethod with weights from a tiny training run (a temporary .pt + model card), its
presets, instance optimisation (refine), provenance, and get_method("hdar") without shipped weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import mean_dice
from hdar_pipeline.core.provenance import sha256
from hdar_pipeline.hdar import weights as W
from hdar_pipeline.hdar.losses import local_ncc
from hdar_pipeline.hdar.train import TrainConfig, export, train
from hdar_pipeline.core.images import Grid, new_image, normalize_intensity, resample_to
from hdar_pipeline.methods import get_method, register_pair
from hdar_pipeline.methods.hdar_method import HDARMethod
from hdar_pipeline.core.transforms import Transform
from test_hdar_train import pair_dataset

TINY = dict(s2_patch=16, s2_input=8, s3_patch=8, s3_input=8, top_k=2, s1_scale=0.5)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """40 S1 steps + 3 S2 steps on the textured phantom pair, exported as tiny.pt/tiny.json."""
    out = tmp_path_factory.mktemp("hdar-run")
    data = pair_dataset((32, 32, 32))
    cfg = TrainConfig(levels=2, steps_per_stage=(40, 3), lr=3e-3, augment=False, val_every=100, checkpoint_every=100,
                      cascade=TINY, seed=0, loss_resolution="full")
    result = train(data, out, cfg, progress=False, device="cpu")
    pt, card = export(result, "tiny", command="pytest", data_description={"source": "phantom"})
    grid = Grid((32, 32, 32), np.diag([2.0, 2.0, 2.0, 1.0]))
    fixed, moving = data.volumes[0], data.volumes[1]
    return {"pt": pt, "card": json.loads(card.read_text()), "grid": grid,
            "fixed": new_image(fixed.image, grid), "moving": new_image(moving.image, grid),
            "fixed_labels": fixed.labels.astype(np.int32), "moving_labels": new_image(moving.labels.astype(np.int32), grid)}


def ncc_after(transform: Transform, fixed, moving) -> float:
    warped = np.asarray(transform.apply(moving).dataobj, np.float32)
    f = torch.from_numpy(np.asarray(fixed.dataobj, np.float32))[None, None]
    return float(local_ncc(f, torch.from_numpy(warped)[None, None]).mean())


def test_hdar_method_with_trained_weights_improves_dice(trained):
    method = HDARMethod(weights=trained["pt"], device="cpu", seed=0, threads=1, preset="fast")
    transform = method.register(trained["fixed"], trained["moving"])
    assert transform.field.shape == (32, 32, 32, 3) and transform.affine is None
    before = mean_dice(trained["fixed_labels"], np.asarray(trained["moving_labels"].dataobj))
    after = mean_dice(trained["fixed_labels"],
                      np.asarray(transform.apply(trained["moving_labels"], interpolation="nearest").dataobj))
    print(f"\nHDAR (tiny weights): Dice {before:.3f} -> {after:.3f} in {method.last_run.runtime_s:.2f} s")
    assert after > before + 0.01
    assert transform.jacobian_determinant().min() > 0
    assert method.device_used == "cpu"
    assert transform.metadata["weights_sha256"] == trained["card"]["sha256"] == sha256(trained["pt"])
    assert transform.metadata["method"] == "hdar" and transform.metadata["refine_steps"] == 0
    params = method.parameters
    assert params["weights"] == str(trained["pt"]) and params["mode"] == "fast" and "device_used" not in params
    json.dumps(params)


def test_the_network_itself_registers_without_prealign_or_refinement(trained):
    """The cascade's own output, nothing before or after it, must improve the pair: the prealignment and the
    refinement can hide a network that no longer contributes (its output zeroed passes the test above)."""
    method = HDARMethod(weights=trained["pt"], device="cpu", seed=0, threads=1, preset="fast", prealign=False)
    transform = method.register(trained["fixed"], trained["moving"])
    before = mean_dice(trained["fixed_labels"], np.asarray(trained["moving_labels"].dataobj))
    after = mean_dice(trained["fixed_labels"],
                      np.asarray(transform.apply(trained["moving_labels"], interpolation="nearest").dataobj))
    print(f"\nHDAR network alone (tiny weights): Dice {before:.3f} -> {after:.3f}")
    assert transform.metadata["prealign"] is False and transform.metadata["refine_steps"] == 0
    assert after > before + 0.01


def test_full_preset_and_register_pair_provenance(trained):
    method = HDARMethod(preset="full", weights=str(trained["pt"]), device="auto")
    transform, info = register_pair(trained["fixed"], trained["moving"], method, affine=False)
    assert info["weights_sha256"] == trained["card"]["sha256"]
    assert info["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert info["preset"] == "full" and transform.field is not None
    with pytest.raises(ValueError, match="unknown HDAR preset"):
        HDARMethod(preset="ultra", weights=trained["pt"])
    # 'refined': fast mode plus the default refinement, unless refine is given
    refined = HDARMethod(preset="refined", weights=trained["pt"])
    assert refined.refine == 25 and refined.parameters["mode"] == "fast" and refined.parameters["refine"] == 25
    assert HDARMethod(preset="refined", refine=5, weights=trained["pt"]).refine == 5
    assert HDARMethod(weights=trained["pt"]).refine == 30  # accurate is the default preset
    assert HDARMethod(weights=trained["pt"], preset="fast").refine == 0
    # 'accurate': more steps per level and a last level at full resolution
    assert refined.refine_full_resolution == 0 and refined.parameters["refine_full_resolution"] == 0
    accurate = HDARMethod(preset="accurate", weights=trained["pt"])
    assert (accurate.refine, accurate.refine_full_resolution) == (30, 2)
    assert accurate.parameters["refine_full_resolution"] == 2
    assert HDARMethod(preset="refined", refine_full_resolution=1, weights=trained["pt"]).refine_full_resolution == 1
    with pytest.raises(ValueError, match="refine_full_resolution"):
        HDARMethod(preset="fast", refine_full_resolution=2, weights=trained["pt"])
    # a refinement whose finest level is already at full resolution, or on the downsampled images, leaves
    # out the preset's full-resolution level; asking for it explicitly there is an error
    assert HDARMethod(preset="accurate", refine_levels=(0.5, 1.0), weights=trained["pt"]).refine_full_resolution == 0
    assert HDARMethod(refine_similarity="level", weights=trained["pt"]).refine_full_resolution == 0
    with pytest.raises(ValueError, match="coarser than 1"):
        HDARMethod(preset="accurate", refine_levels=(0.5, 1.0), refine_full_resolution=2, weights=trained["pt"])


def test_refine_improves_ncc_further(trained):
    plain = HDARMethod(weights=trained["pt"], device="cpu", preset="fast").register(trained["fixed"], trained["moving"])
    refined_method = HDARMethod(weights=trained["pt"], device="cpu", refine=15, refine_full_resolution=0)
    refined = refined_method.register(trained["fixed"], trained["moving"])
    ncc0, ncc1 = ncc_after(plain, trained["fixed"], trained["moving"]), ncc_after(refined, trained["fixed"], trained["moving"])
    print(f"\nrefine 15 steps: local NCC {ncc0:.4f} -> {ncc1:.4f} ({refined_method.last_run.runtime_s:.2f} s)")
    assert ncc1 > ncc0 + 0.005
    assert refined.metadata["refine_steps"] == 15
    assert refined.jacobian_determinant().min() > 0
    # the accurate preset (its last level on the full-resolution grid) fits better still, without folding
    accurate = HDARMethod(weights=trained["pt"], device="cpu", preset="accurate").register(trained["fixed"],
                                                                                           trained["moving"])
    ncc_accurate = ncc_after(accurate, trained["fixed"], trained["moving"])
    print(f"accurate: local NCC {ncc_accurate:.4f}")
    assert ncc_accurate > ncc1 and accurate.metadata["refine_full_resolution_steps"] == 2
    assert accurate.jacobian_determinant().min() > 0
    # one level at full resolution, no pre-alignment, composed exp(v) corrections: still better
    other = HDARMethod(weights=trained["pt"], device="cpu", refine=15, refine_levels=(1.0,), prealign=False,
                       refine_diffeomorphic=True)
    ncc_other = ncc_after(other.register(trained["fixed"], trained["moving"]), trained["fixed"], trained["moving"])
    print(f"refine 15 steps at full resolution: local NCC {ncc0:.4f} -> {ncc_other:.4f}")
    assert ncc_other > ncc0 + 0.003
    assert other.parameters["refine_levels"] == (1.0,) and other.parameters["prealign"] is False
    # the finest level on the downsampled images instead of the linearised full-resolution NCC
    level = HDARMethod(weights=trained["pt"], device="cpu", refine=15, refine_similarity="level")
    ncc_level = ncc_after(level.register(trained["fixed"], trained["moving"]), trained["fixed"], trained["moving"])
    print(f"refine 15 steps, finest level on half-resolution images: local NCC {ncc0:.4f} -> {ncc_level:.4f}")
    assert ncc_level > ncc0 + 0.003 and level.parameters["refine_similarity"] == "level"
    with pytest.raises(ValueError, match="refine_levels"):
        HDARMethod(weights=trained["pt"], refine_levels=(0.5, 0))
    with pytest.raises(ValueError, match="refine_similarity"):
        HDARMethod(weights=trained["pt"], refine_similarity="coarse")
    with pytest.raises(ValueError, match="1/b"):
        HDARMethod(weights=trained["pt"], refine=5, refine_levels=(0.25, 0.4))


def test_prealign_helps_when_the_pair_is_affinely_misaligned(trained):
    """The moving image scaled by 8 % about its centre: the pre-alignment takes the scaling out first."""
    from hdar_pipeline.core.images import Grid as G

    grid = trained["grid"]
    scaled = G(grid.shape, grid.affine @ np.diag([1.08, 1.08, 1.08, 1.0]) @ np.r_[np.c_[np.eye(3), -(np.asarray(
        grid.shape) - 1) / 2 * 0.08 / 1.08], [[0, 0, 0, 1]]])
    moving = resample_to(new_image(np.asarray(trained["moving"].dataobj), scaled), grid)
    labels = resample_to(new_image(np.asarray(trained["moving_labels"].dataobj), scaled), grid, interpolation="nearest")
    scores = {}
    for prealign in (False, True):
        t = HDARMethod(weights=trained["pt"], device="cpu", prealign=prealign, preset="fast").register(trained["fixed"], moving)
        assert t.metadata["prealign"] is prealign
        scores[prealign] = mean_dice(trained["fixed_labels"],
                                     np.asarray(t.apply(labels, interpolation="nearest").dataobj))
    print(f"\nscaled moving image: Dice {scores[False]:.3f} without, {scores[True]:.3f} with pre-alignment")
    assert scores[True] > scores[False] + 0.02


def test_moving_on_another_grid_is_resampled_and_intensities_rescaled(trained):
    fixed, moving = trained["fixed"], trained["moving"]
    method = HDARMethod(weights=trained["pt"], device="cpu", preset="fast")
    # raw scanner-like intensities are rescaled with normalize_intensity, as the training data were
    scaled = method.register(fixed, new_image(np.asarray(moving.dataobj) * 800.0, trained["grid"]))
    normalised = method.register(fixed, normalize_intensity(moving))
    # float32 rounding of the two rescalings differs slightly; the pre-alignment's Adam steps carry that
    # to hundredths of a millimetre (0.07 mm at most on these 2 mm voxels; 1e-4 without pre-alignment)
    assert np.allclose(scaled.field, normalised.field, atol=0.1)
    assert np.abs(scaled.field - normalised.field).mean() < 0.03
    no_pre = HDARMethod(weights=trained["pt"], device="cpu", prealign=False, preset="fast")
    assert np.allclose(no_pre.register(fixed, new_image(np.asarray(moving.dataobj) * 800.0, trained["grid"])).field,
                       no_pre.register(fixed, normalize_intensity(moving)).field, atol=1e-4)
    # a moving image on another (finer, shifted) grid is resampled onto the fixed grid first (compared without
    # the pre-alignment, whose fit on the twice-resampled image moves the field by a few tenths of a mm)
    finer = Grid((40, 40, 40), np.diag([1.6, 1.6, 1.6, 1.0]) + np.c_[np.zeros((4, 3)), [0.3, -0.2, 0.1, 0]])
    other = no_pre.register(fixed, resample_to(moving, finer))
    assert other.grid.same_as(trained["grid"])
    assert method.register(fixed, resample_to(moving, finer)).grid.same_as(trained["grid"])
    plain = no_pre.register(fixed, moving)
    assert np.abs(other.field - plain.field).mean() < 0.1 * np.abs(plain.field).mean() + 0.05
    with pytest.raises(ValueError, match="fixed_mask shape"):
        method.register(fixed, moving, fixed_mask=new_image(np.ones((8, 8, 8), np.uint8), Grid((8, 8, 8), np.eye(4))))


def test_get_method_without_shipped_weights_gives_the_clear_message(tmp_path, monkeypatch):
    empty = tmp_path / "shipped"
    empty.mkdir()
    monkeypatch.setattr(W, "WEIGHTS_DIR", empty)
    with pytest.raises(W.NoWeightsError, match="no trained HDAR weights are shipped in this version; train with "
                                               "`hdar train`"):
        get_method("hdar")
    with pytest.raises(W.NoWeightsError, match="not found"):
        HDARMethod(weights=tmp_path / "missing.pt")


def test_register_function_several_pairs_and_cli_weights(trained, tmp_path):
    """hdar_pipeline.register() with HDAR options and a list of moving images; `hdar register --weights --refine`."""
    import hdar_pipeline
    from hdar_pipeline.apps.cli import main
    from hdar_pipeline.core.images import save_image

    transforms = hdar_pipeline.register(trained["fixed"], [trained["moving"], trained["moving"]], method="hdar",
                                        affine=False, weights=trained["pt"], device="cpu", seed=0)
    assert len(transforms) == 2 and all(isinstance(t, Transform) for t in transforms)
    np.testing.assert_allclose(transforms[0].field, transforms[1].field, atol=1e-5)  # one model, same answer
    single = hdar_pipeline.register(trained["fixed"], trained["moving"], method="hdar", affine=False,
                                    weights=trained["pt"], device="cpu", seed=0)
    assert isinstance(single, Transform)
    with pytest.raises(ValueError, match="no option"):
        hdar_pipeline.register(trained["fixed"], trained["moving"], method="demons", affine=False, weights="x.pt")

    fixed = save_image(trained["fixed"], tmp_path / "fixed.nii.gz")
    moving = save_image(trained["moving"], tmp_path / "moving.nii.gz")
    assert main(["register", str(fixed), str(moving), "-o", str(tmp_path / "out"), "--method", "hdar", "--no-affine",
                 "--weights", str(trained["pt"]), "--refine", "2", "--device", "cpu", "--threads", "1"]) == 0
    record = json.loads((tmp_path / "out" / "registration.json").read_text())
    assert record["parameters"]["weights"] == str(trained["pt"]) and record["parameters"]["refine"] == 2
    assert record["parameters"]["refine_similarity"] == "full"
    assert record["weights_sha256"] == trained["card"]["sha256"]
    assert main(["register", str(fixed), str(moving), "-o", str(tmp_path / "level"), "--method", "hdar", "--no-affine",
                 "--weights", str(trained["pt"]), "--preset", "refined", "--refine-similarity", "level",
                 "--device", "cpu", "--threads", "1"]) == 0
    record = json.loads((tmp_path / "level" / "registration.json").read_text())
    assert record["parameters"]["refine"] == 25 and record["parameters"]["refine_similarity"] == "level"
    assert main(["register", str(fixed), str(moving), "-o", str(tmp_path / "bad"), "--method", "hdar",
                 "--weights", str(tmp_path / "missing.pt")]) == 2


def _orientation_to(affine, codes: str):
    """nibabel's orientation transform from ``affine``'s array axes to ``codes`` (e.g. ``"LPS"``)."""
    import nibabel as nib

    return nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(tuple(codes)))


def _stored_as(img, codes: str):
    """The same world image stored with array axes ``codes`` (flips/permutations only)."""
    import nibabel as nib

    ornt = _orientation_to(img.affine, codes)
    data = nib.orientations.apply_orientation(np.asarray(img.dataobj), ornt)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


@pytest.mark.parametrize("codes", ["LPS", "SAL"])
def test_the_network_runs_in_the_orientation_of_its_training_data(trained, codes):
    """A pair stored L-P-S (or permuted) is registered exactly as the same pair stored as the model was trained
    (R-A-S here): the network sees identical arrays, and the field maps back onto the fixed array."""
    import dataclasses

    import nibabel as nib

    from hdar_pipeline.hdar.inference import register_with_model

    loaded = W.load_weights(trained["pt"])
    ras = dataclasses.replace(loaded, card={**loaded.card, "data": {"orientation": "RAS"}})
    fixed, moving, labels = trained["fixed"], trained["moving"], trained["moving_labels"]
    t_ras, _ = register_with_model(ras, fixed, moving)
    t_other, _ = register_with_model(ras, _stored_as(fixed, codes), _stored_as(moving, codes))
    assert not np.allclose(t_ras.field, 0)
    ornt = _orientation_to(fixed.affine, codes)
    want = nib.orientations.apply_orientation(np.asarray(t_ras.apply(labels, interpolation="nearest").dataobj), ornt)
    got = np.asarray(t_other.apply(_stored_as(labels, codes), interpolation="nearest").dataobj)
    assert got.shape == want.shape and (got != want).mean() < 1e-3
    # without the card's orientation the reoriented arrays go into the network as they are
    bare = dataclasses.replace(loaded, card={**loaded.card, "data": {}})
    t_bare, _ = register_with_model(bare, _stored_as(fixed, codes), _stored_as(moving, codes))
    assert not np.allclose(t_bare.field, t_other.field, atol=1e-3)


@pytest.fixture(scope="module")
def framed(trained, tmp_path_factory):
    """The tiny model with a card that describes its training data (L-P-S arrays, 2 mm, 32^3), as `hdar train`
    writes it, so that inference runs in that canonical frame."""
    import shutil

    folder = tmp_path_factory.mktemp("framed")
    pt = folder / "framed.pt"
    shutil.copy(trained["pt"], pt)
    card = dict(trained["card"])
    card["data"] = {"source": "phantom", "orientation": "LPS", "voxel_size_mm": [2.0, 2.0, 2.0],
                    "grid_shape": [32, 32, 32]}
    (folder / "framed.json").write_text(json.dumps(card))
    lps = Grid((32, 32, 32), np.diag([-2.0, -2.0, 2.0, 1.0]))  # the phantom's arrays, stored L-P-S

    def on(img):
        return new_image(np.asarray(img.dataobj), lps)

    labels = new_image(trained["fixed_labels"], lps)
    return {"pt": pt, "fixed": on(trained["fixed"]), "moving": on(trained["moving"]),
            "fixed_labels": labels, "moving_labels": on(trained["moving_labels"])}


@pytest.mark.parametrize("preset", ["fast", "full", "refined"])
def test_every_preset_gives_the_same_answer_in_another_storage_frame(framed, preset):
    """The same pair re-stored A-S-L, off-centre in a larger field of view, as int16 with an offset: the
    canonical frame gives the network the same arrays, so the warped labels agree (Dice 1 up to a few
    border voxels of the interpolated field) and the folding is the same."""
    from hdar_pipeline.core.restoring import StorageFrame, restore

    frame = StorageFrame("asl", "ASL", (40, 44, 38), None, (6.0, -4.0, 8.0), "int16", 900.0, 25.0)
    method = HDARMethod(weights=framed["pt"], device="cpu", preset=preset, seed=0, threads=1, refine=5
                        if preset == "refined" else None)
    native = method.register(framed["fixed"], framed["moving"])
    fixed, moving = restore(framed["fixed"], frame), restore(framed["moving"], frame)
    other = method.register(fixed, moving)
    assert other.grid.same_as(Grid.of(fixed)) and other.metadata["frame"]["exact"]
    warped_native = np.asarray(native.apply(framed["moving_labels"], interpolation="nearest").dataobj)
    warped_other = np.asarray(other.apply(restore(framed["moving_labels"], frame, labels=True),
                                          interpolation="nearest").dataobj)
    # the re-stored result, brought back onto the native grid (same world, voxel centres coincide)
    back_native = np.asarray(resample_to(new_image(warped_other.astype(np.int32), fixed), framed["fixed"],
                                         interpolation="nearest").dataobj)
    reference = np.asarray(framed["fixed_labels"].dataobj)
    d_native, d_other = mean_dice(reference, warped_native), mean_dice(reference, back_native)
    print(f"\n{preset}: Dice native frame {d_native:.4f}, A-S-L off-centre int16 {d_other:.4f}")
    assert abs(d_native - d_other) < 0.01
    assert mean_dice(warped_native, back_native) > 0.98


def test_the_default_preset_is_the_same_everywhere():
    """`hdar register`, the BIDS App, get_method and the benchmark's `hdar` row all mean DEFAULT_PRESET."""
    from hdar_pipeline.apps.benchmark.runner import build_method, default_variants
    from hdar_pipeline.apps.bids_app_cli import build_bids_app_parser
    from hdar_pipeline.methods.hdar_method import DEFAULT_PRESET

    assert DEFAULT_PRESET == "accurate"
    args = build_bids_app_parser().parse_args(["in", "out", "participant"])
    assert args.hdar_preset == DEFAULT_PRESET
    from hdar_pipeline.apps.bids_app import AppOptions

    assert AppOptions(bids_dir="in", output_dir="out", analysis_level="participant").hdar_preset == DEFAULT_PRESET
    method = get_method("hdar")
    assert method.preset == DEFAULT_PRESET and method.refine == 30 and method.refine_diffeomorphic
    assert method.refine_full_resolution == 2
    row = default_variants()["hdar"]
    assert row.preset is None and build_method(row, seed=0, threads=1).preset == DEFAULT_PRESET


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_hdar_with_its_affine_stage_runs_on_cuda_and_gives_the_cpu_answer(trained, monkeypatch):
    """The GPU path end to end: the fast affine stage, HDAR's pre-alignment, network and refinement (the default
    preset) on CUDA give the CPU's registration, up to float32 summation order."""
    from hdar_pipeline.methods import fast_affine

    devices = []
    original = fast_affine.FastAffineMethod._register

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        devices.append(self.device_used)
        return out

    monkeypatch.setattr(fast_affine.FastAffineMethod, "_register", spy)
    results = {}
    for device in ("cpu", "cuda"):
        method = HDARMethod(weights=trained["pt"], device=device, seed=0)
        results[device] = register_pair(trained["fixed"], trained["moving"], method, affine=True, seed=0)
    (cpu, cpu_info), (gpu, gpu_info) = results["cpu"], results["cuda"]
    assert cpu_info["device"] == "cpu" and gpu_info["device"].startswith("cuda")
    assert devices[0] == "cpu" and devices[1].startswith("cuda")  # the affine stage ran where HDAR ran
    assert np.abs(gpu.matrix - cpu.matrix).max() < 1e-2
    assert float(np.abs(gpu.field - cpu.field).mean()) < 0.05  # mm, on 2 mm voxels
    dice = [mean_dice(trained["fixed_labels"],
                      np.asarray(t.apply(trained["moving_labels"], interpolation="nearest").dataobj))
            for t in (cpu, gpu)]
    assert abs(dice[0] - dice[1]) < 0.01
    assert gpu.jacobian_determinant().min() > 0
