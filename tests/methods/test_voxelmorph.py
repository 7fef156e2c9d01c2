"""VoxelMorph (hdar/voxelmorph.py, methods/voxelmorph.py): the vm2/vm1 network on any size, a diffeomorphic output,
training through HDAR's loop (the paper's loss defaults, the smoothness on the velocity), export, loading and
registration of synthetic pairs with the `fast` and `refined` presets, the ANTs round trip, the wiring (get_method,
CLI, App, benchmark, reports), and old HDAR cards still loading as HDAR.

Weights are made here by a tiny training run on brain phantoms (32^3, 3 mm) deformed by
:func:`hdar_pipeline.core.synthetic.make_subject`; nothing depends on shipped VoxelMorph weights.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import make_brain_phantom, mean_dice
from test_hdar_method import ncc_after
from hdar_pipeline.core.provenance import sha256
from hdar_pipeline.hdar import weights as W
from hdar_pipeline.hdar.cascade import CascadeConfig, build_cascade, transform_to_field_voxels
from hdar_pipeline.hdar.data import PairDataset, Volume
from hdar_pipeline.hdar.inference import refine_smooth_weight_of
from hdar_pipeline.hdar.layers import VecInt
from hdar_pipeline.hdar.losses import diffusion_loss, jacobian_determinant
from hdar_pipeline.hdar.train import TrainConfig, _check_resume_config, export, pair_loss, read_log, train
from hdar_pipeline.hdar.voxelmorph_net import VoxelMorphUNet
from hdar_pipeline.core.images import Grid, save_image
from hdar_pipeline.methods import get_method, model_identity
from hdar_pipeline.methods.hdar_method import HDARMethod
from hdar_pipeline.methods.voxelmorph_method import DEFAULT_PRESET, VoxelMorphMethod
from hdar_pipeline.core.synthetic import make_subject
from hdar_pipeline.core.transforms import Transform

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SHIPPED_HDAR_CARD = W.WEIGHTS_DIR / "default.json"


# ------------------------------------------------------------------------------------------- the network


@pytest.mark.parametrize("variant, shape", [("vm2", (40, 48, 40)), ("vm2", (7, 9, 13)), ("vm1", (16, 17, 33))])
def test_network_takes_any_size_and_starts_near_zero(variant, shape):
    torch.manual_seed(0)
    net = VoxelMorphUNet(variant)
    with torch.no_grad():
        out = net(torch.rand(2, 2, *shape))
    assert out.shape == (2, 3, *shape)
    assert float(out.abs().max()) < 1e-3  # flow head ~N(0, 1e-5), zero bias
    assert net.full_convs[-1].conv.out_channels == (16 if variant == "vm2" else 8)
    with pytest.raises(ValueError, match="input channels"):
        net(torch.rand(1, 3, *shape))


def test_vm2_has_the_papers_layers():
    net = VoxelMorphUNet("vm2")
    assert [c.conv.out_channels for c in net.encoder] == [16, 32, 32, 32]
    assert all(c.conv.stride == (2, 2, 2) and c.conv.kernel_size == (3, 3, 3) for c in net.encoder)
    decoder = [*net.up_convs, *net.half_convs, *net.full_convs]
    assert [c.conv.out_channels for c in decoder] == [32, 32, 32, 32, 32, 16, 16]
    assert all(abs(c.act.negative_slope - 0.2) < 1e-9 for c in [*net.encoder, *decoder])
    assert net.flow.out_channels == 3 and float(net.flow.bias.detach().abs().max()) == 0.0


def test_the_integrated_output_does_not_fold_where_the_raw_field_would():
    """A random network (flow head scaled up) gives a rough velocity whose use as a displacement folds 4 % of the
    voxels; its exponential by scaling and squaring (7 squarings, as in VoxelMorph) folds none. On a rougher field
    (17 % folded as a displacement) the discrete integration folds a few hundredths of a percent: near zero, which is
    what "diffeomorphic by construction" means on a voxel grid."""
    torch.manual_seed(4)
    net = VoxelMorphUNet("vm2")
    with torch.no_grad():
        net.flow.weight.normal_(0.0, 0.05)
        velocity = net(torch.rand(1, 2, 32, 32, 32))
        velocity /= velocity.abs().max()
        for amplitude, raw_at_least, allowed in ((2.0, 0.03, 0.0), (3.0, 0.15, 0.0005)):
            raw = float((jacobian_determinant(amplitude * velocity) <= 0).float().mean())
            disp = VecInt(7)(amplitude * velocity)
            folded = float((jacobian_determinant(disp) <= 0).float().mean())
            assert raw > raw_at_least and float(disp.abs().max()) > 0.75 * amplitude
            assert folded <= allowed, (amplitude, raw, folded)


def test_the_cascade_runs_voxelmorph_as_its_only_level():
    model = build_cascade(None, None, seed=0, network="voxelmorph", diffeomorphic=True, s1_scale=0.5)
    assert model.config.levels == 1 and model.config.width == "vm2"
    assert isinstance(model.nets[0], VoxelMorphUNet) and len(model.nets) == 1
    f, m = torch.rand(1, 1, 20, 24, 20), torch.rand(1, 1, 20, 24, 20)
    out = model(f, m)
    assert out.flow.shape == (1, 3, 20, 24, 20)
    assert out.levels[0].attention == [[]]  # no attention map
    assert out.levels[0].attention_volume().shape == (20, 24, 20)
    raw, att = model.s1_output(f, m)
    assert att is None and raw.shape == (1, 3, 20, 24, 20)
    with pytest.raises(ValueError, match="levels must be 1"):
        CascadeConfig(network="voxelmorph", levels=2)
    with pytest.raises(ValueError, match="variant"):
        CascadeConfig(network="voxelmorph", width="small")
    with pytest.raises(ValueError, match="network"):
        CascadeConfig(network="unet")


# ------------------------------------------------------------------------------------------- configuration


def test_training_defaults_follow_the_network():
    vxm = TrainConfig(network="voxelmorph", diffeomorphic=True)
    assert (vxm.width, vxm.levels, vxm.smoothness, vxm.smooth_weight, vxm.smooth_on) == \
        ("vm2", 1, "diffusion", 1.0, "velocity")
    assert vxm.cascade_settings()["network"] == "voxelmorph"
    assert TrainConfig(network="voxelmorph").smooth_on == "displacement"  # no velocity without --diffeomorphic
    hdar = TrainConfig(diffeomorphic=True)
    assert (hdar.width, hdar.levels, hdar.smoothness, hdar.smooth_weight, hdar.smooth_on) == \
        ("small", 3, "anti_folding", 1.5, "displacement")
    with pytest.raises(ValueError, match="levels must be 1"):
        TrainConfig(network="voxelmorph", levels=2)
    with pytest.raises(ValueError, match="smooth_on='velocity'"):
        TrainConfig(network="voxelmorph", diffeomorphic=True, loss_resolution="full")
    # a checkpoint written before these settings existed resumes an HDAR run unchanged
    saved = {k: v for k, v in TrainConfig(levels=2, steps_per_stage=(3, 3)).to_dict().items()
             if k not in ("network", "smooth_on")}
    _check_resume_config(saved, TrainConfig(levels=2, steps_per_stage=(3, 3)))
    with pytest.raises(ValueError, match="network"):
        _check_resume_config(saved, TrainConfig(network="voxelmorph", steps_per_stage=3))


def test_the_smoothness_is_computed_on_the_velocity_before_integration():
    phantom = make_brain_phantom((16, 16, 16), 3.0)
    data = PairDataset([Volume("a", np.asarray(phantom.image.dataobj, np.float32),
                               np.asarray(phantom.labels.dataobj).astype(np.uint8)),
                        Volume("b", np.roll(np.asarray(phantom.image.dataobj, np.float32), 1, axis=0),
                               np.roll(np.asarray(phantom.labels.dataobj).astype(np.uint8), 1, axis=0))],
                       Grid.of(phantom.image))
    cfg = TrainConfig(network="voxelmorph", diffeomorphic=True, augment=False, cascade={"s1_scale": 1.0}, dice_weight=0)
    model = build_cascade(None, None, seed=0, **{k: v for k, v in cfg.cascade_settings().items()
                                                 if k not in ("width", "levels")})
    with torch.no_grad():
        model.nets[0].flow.weight.normal_(0.0, 0.05)
    pair = data.pair(0, 1)
    _, terms = pair_loss(model, pair, 1, cfg, torch.device("cpu"), np.random.default_rng(0))
    with torch.no_grad():
        velocity, _ = model.s1_output(pair.fixed, pair.moving)
    assert terms["loss_smooth"] == pytest.approx(float(diffusion_loss(velocity)), rel=1e-5)
    assert terms["loss_smooth"] != pytest.approx(float(diffusion_loss(model.integrate(velocity))), rel=1e-3)


# ------------------------------------------------------------------------------------------- trained weights


@pytest.fixture(scope="module")
def cohort():
    """A brain phantom (the atlas) and two subjects deformed from it (up to 12 mm = 4 voxels)."""
    phantom = make_brain_phantom((32, 32, 32), 3.0)
    subjects = [make_subject(phantom.image, phantom.labels, seed=s, magnitude_mm=12.0, smoothness_mm=18.0)
                for s in (2, 3)]
    return phantom, subjects


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cohort):
    """VoxelMorph trained through `train` for 60 steps on the atlas and the first subject (both orders), exported as
    vxm-tiny.pt. The S1 grid is 16^3 here, so the NCC window is 3 (9 would span half the image)."""
    phantom, subjects = cohort

    def volume(name, image, labels):
        return Volume(name, np.asarray(image.dataobj, np.float32), np.asarray(labels.dataobj).astype(np.uint8))

    data = PairDataset([volume("atlas", phantom.image, phantom.labels),
                        volume("subject", subjects[0].image, subjects[0].labels)], Grid.of(phantom.image))
    cfg = TrainConfig(network="voxelmorph", diffeomorphic=True, steps_per_stage=60, lr=2e-3, ncc_window=3,
                      augment="none", val_every=1000, checkpoint_every=1000, cascade={"s1_scale": 0.5}, seed=0)
    out = tmp_path_factory.mktemp("vxm-run")
    result = train(data, out, cfg, progress=False, device="cpu")
    pt, card = export(result, "vxm-tiny", command="pytest", data_description={"source": "phantom"})
    return {"pt": pt, "card": json.loads(card.read_text()), "result": result}


def test_export_writes_a_voxelmorph_card(trained):
    card = trained["card"]
    assert card["config"]["cascade"]["network"] == "voxelmorph" and card["config"]["cascade"]["levels"] == 1
    training = card["config"]["training"]
    assert (training["network"], training["smoothness"], training["smooth_weight"], training["smooth_on"]) == \
        ("voxelmorph", "diffusion", 1.0, "velocity")
    assert W.card_network(card) == "voxelmorph" and card["sha256"] == sha256(trained["pt"])
    loaded = W.load_weights(trained["pt"])
    assert isinstance(loaded.model.nets[0], VoxelMorphUNet)
    # the refinement keeps HDAR's anti-folding weight: VoxelMorph's diffusion weight does not carry over
    assert refine_smooth_weight_of(card) == 1.5
    losses = [float(r["loss"]) for r in read_log(trained["result"].log_path)]
    assert np.mean(losses[-20:]) < np.mean(losses[:20])


def test_registers_a_synthetic_pair_fast_and_refined(trained, cohort):
    phantom, subjects = cohort
    subject = subjects[0]
    reference = np.asarray(phantom.labels.dataobj)
    before = mean_dice(reference, np.asarray(subject.labels.dataobj))
    ncc_before = ncc_after(Transform(Grid.of(phantom.image)), phantom.image, subject.image)

    def scores(method):
        t = method.register(phantom.image, subject.image)
        warped = np.asarray(t.apply(subject.labels, interpolation="nearest").dataobj)
        flow = torch.from_numpy(transform_to_field_voxels(t.to_dense()))[None]
        return mean_dice(reference, warped), ncc_after(t, phantom.image, subject.image), \
            int((jacobian_determinant(flow) <= 0).sum()), t

    d_net, ncc_net, folds_net, t = scores(VoxelMorphMethod(weights=trained["pt"], preset="fast", prealign=False,
                                                           device="cpu", seed=0))
    d_fast, _, folds_fast, _ = scores(VoxelMorphMethod(weights=trained["pt"], preset="fast", device="cpu", seed=0))
    refined = VoxelMorphMethod(weights=trained["pt"], device="cpu", seed=0)
    assert refined.preset == DEFAULT_PRESET == "refined"
    assert (refined.refine, refined.refine_full_resolution) == (30, 2)  # HDAR accurate's refinement
    d_ref, ncc_ref, folds_ref, t_ref = scores(refined)
    print(f"\nDice before {before:.4f}, network {d_net:.4f}, fast {d_fast:.4f}, refined {d_ref:.4f}; "
          f"NCC {ncc_before:.4f} -> {ncc_net:.4f} -> {ncc_ref:.4f}")
    assert d_net > before + 0.01 and ncc_net > ncc_before + 0.03  # the network learned the pair
    assert d_ref > d_net and ncc_ref > ncc_net  # and the refinement goes further
    assert folds_net == folds_fast == 0  # the diffeomorphic network, with or without the affine pre-alignment
    # HDAR's refinement on this coarse 3 mm phantom folds a few voxels (39-43 of 32^3, mostly outside the brain, with
    # HDAR's own tiny weights too; none on LPBA40 at 1 mm)
    assert folds_ref < 0.002 * 32 ** 3
    assert t.metadata["weights_sha256"] == trained["card"]["sha256"]
    assert t_ref.metadata["method"] == "voxelmorph" and t_ref.metadata["refine_steps"] == 30
    assert refined.parameters["weights"] == str(trained["pt"]) and refined.parameters["diffeomorphic"] is True


def test_ants_reapplies_the_written_transform(trained, cohort, tmp_path):
    """`hdar register --method voxelmorph` then ants.apply_transforms: the same warped labels."""
    import ants

    from hdar_pipeline.apps.cli import main

    phantom, subjects = cohort
    fixed = save_image(phantom.image, tmp_path / "fixed.nii.gz")
    moving = save_image(subjects[1].image, tmp_path / "moving.nii.gz")  # not seen in training
    labels = save_image(subjects[1].labels, tmp_path / "moving_dseg.nii.gz")
    out = tmp_path / "out"
    assert main(["register", str(fixed), str(moving), "-o", str(out), "--method", "voxelmorph", "--preset", "fast",
                 "--weights", str(trained["pt"]), "--moving-labels", str(labels), "--device", "cpu",
                 "--threads", "1", "--seed", "1"]) == 0
    record = json.loads((out / "registration.json").read_text())
    assert record["method"] == "voxelmorph" and record["preset"] == "fast"
    assert record["weights_sha256"] == trained["card"]["sha256"]
    ours = np.asarray(nib.load(str(out / "warped_labels.nii.gz")).dataobj)
    theirs = ants.apply_transforms(ants.image_read(str(fixed)), ants.image_read(str(labels)),
                                   transformlist=[str(out / t) for t in record["transforms"]],
                                   interpolator="nearestNeighbor").numpy()
    theirs = np.rint(theirs).astype(int)
    for lab in np.unique(ours[ours > 0]):
        a, b = ours == lab, theirs == lab
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99
    assert record["jacobian"]["folded_percent_grid"] == 0.0


# ------------------------------------------------------------------------------------------- weights and wiring


@pytest.fixture()
def only_hdar_shipped(tmp_path, monkeypatch):
    """The package's weights folder with the HDAR weights only (so these tests hold once VoxelMorph's ship)."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    for suffix in (".pt", ".json"):
        shutil.copy(W.WEIGHTS_DIR / f"default{suffix}", folder / f"default{suffix}")
    monkeypatch.setattr(W, "WEIGHTS_DIR", folder)
    return folder


def test_without_voxelmorph_weights_construction_fails_with_the_clear_message(only_hdar_shipped):
    with pytest.raises(W.NoWeightsError, match="no shipped HDAR weights named 'voxelmorph'; shipped: default.*"
                                               "--network voxelmorph"):
        get_method("voxelmorph")
    with pytest.raises(W.NoWeightsError, match="not found"):
        VoxelMorphMethod(weights=only_hdar_shipped / "missing.pt")
    assert model_identity("voxelmorph") == ""
    assert model_identity("hdar").startswith("default@sha256:")


def test_old_hdar_cards_load_as_hdar_and_the_networks_are_not_mixed_up(trained, only_hdar_shipped):
    card = W.read_card(SHIPPED_HDAR_CARD)
    assert "network" not in card["config"]["cascade"] and "network" not in card["config"]["training"]
    assert W.card_network(card) == "hdar"
    assert CascadeConfig.from_dict(card["config"]["cascade"]).network == "hdar"
    loaded = W.load_weights("default")
    assert loaded.model.config.network == "hdar" and loaded.model.config.width == "small"
    assert refine_smooth_weight_of(card) == 1.5
    assert HDARMethod(weights="default").network == "hdar"
    with pytest.raises(W.WeightsError, match="hold an HDAR cascade, not a VoxelMorph network"):
        VoxelMorphMethod(weights="default")
    with pytest.raises(W.WeightsError, match="hold a VoxelMorph network, not an HDAR cascade"):
        HDARMethod(weights=trained["pt"])
    # the VoxelMorph weights under their shipped name, as they will ship
    for suffix in (".pt", ".json"):
        shutil.copy(trained["pt"].with_suffix(suffix), only_hdar_shipped / f"voxelmorph{suffix}")
    method = get_method("voxelmorph", preset="fast", device="cpu")
    assert isinstance(method, VoxelMorphMethod) and method.weights == "voxelmorph" and method.refine == 0
    assert model_identity("voxelmorph") == f"voxelmorph@sha256:{trained['card']['sha256']}"
    with pytest.raises(ValueError, match="unknown VoxelMorph preset 'accurate'"):
        get_method("voxelmorph", preset="accurate")


def test_the_default_preset_and_wiring_are_the_same_everywhere():
    from hdar_pipeline.apps.benchmark.runner import default_variants
    from hdar_pipeline.apps.bids_app_cli import build_bids_app_parser
    from hdar_pipeline.engine.nipype_interfaces import RegisterInputSpec
    from hdar_pipeline.methods import method_names
    from hdar_pipeline.apps.bids_app import AppOptions, method_presets

    assert "voxelmorph" in method_names()
    args = build_bids_app_parser().parse_args(["in", "out", "participant", "--methods", "voxelmorph"])
    assert args.voxelmorph_preset == DEFAULT_PRESET and args.methods == ["voxelmorph"]
    opts = AppOptions(bids_dir="in", output_dir="out", analysis_level="participant")
    assert opts.voxelmorph_preset == DEFAULT_PRESET and method_presets(opts)["voxelmorph"] == DEFAULT_PRESET
    variants = default_variants()
    assert (variants["voxelmorph"].method, variants["voxelmorph"].preset) == ("voxelmorph", "fast")
    assert variants["voxelmorph-refined"].preset == "refined"
    assert "voxelmorph" in RegisterInputSpec().trait("method").trait_type.values


def test_methods_text_cites_voxelmorph_with_bibtex():
    from hdar_pipeline.reports.methods_text import bibtex, cited_keys, method_title, methods_paragraph

    params = {"preset": "refined", "prealign": True, "refine": 30, "refine_levels": (0.25, 0.5),
              "refine_full_resolution": 2, "refine_diffeomorphic": True, "weights": "voxelmorph",
              "weights_sha256": "ab12", "diffeomorphic": True, "device": "auto"}
    text = methods_paragraph(methods=["voxelmorph"], parameters={"voxelmorph": params},
                             presets={"voxelmorph": "refined"}, atlas_description="a phantom",
                             devices={"voxelmorph": ["cpu"]})
    assert method_title("voxelmorph") == "VoxelMorph"
    assert "VoxelMorph (Balakrishnan et al. 2019)" in text and "(Dalca et al. 2019)" in text
    assert "30 steps per level" in text and "`voxelmorph` (SHA-256 `ab12`)" in text and "`cpu`" in text
    assert "Other settings" not in text  # every parameter is described
    keys = cited_keys(text)
    assert {"balakrishnan2019", "dalca2019"} <= set(keys)
    bib = bibtex(keys)
    assert "doi = {10.1109/TMI.2019.2897538}" in bib and "doi = {10.1016/j.media.2019.07.006}" in bib
