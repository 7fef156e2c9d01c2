"""hdar/unet.py and hdar/cascade.py: shapes, selection inside the cascade, modes, training on a phantom."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from hdar_pipeline.hdar.cascade import CascadeConfig, HDARCascade, build_cascade, field_voxels_to_transform
from hdar_pipeline.hdar.layers import SpatialTransformer
from hdar_pipeline.hdar.losses import anti_folding_loss, jacobian_determinant, local_ncc_loss
from hdar_pipeline.hdar.unet import AttentionUNet, count_parameters

# Tiny geometry for fast tests: patches of 24 (S2, resized to 12) and 12 (S3) voxels.
TINY = dict(s2_patch=24, s2_input=12, s3_patch=12, s3_input=12, top_k=3)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def phantom(shape=(32, 32, 32), seed=0, amplitude=2.5):
    """Fixed image, its label, and a moving image/label made with a known smooth deformation."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float64)
    c = (np.asarray(shape) - 1) / 2.0
    r = np.sqrt(sum(((idx[a] - c[a]) / (0.32 * shape[a])) ** 2 for a in range(3)))
    inner = np.sqrt(((idx[0] - c[0] - 3) / 5.0) ** 2 + ((idx[1] - c[1]) / 7.0) ** 2 + ((idx[2] - c[2] + 2) / 4.0) ** 2)
    tex = ndimage.gaussian_filter(rng.random(shape), 2.0)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    img = (r < 1) * (0.5 + 0.2 * tex) + (inner < 1) * 0.3
    label = ((r < 1).astype(np.int64) + (inner < 1)).astype(np.float32)
    disp = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 5.0) for _ in range(3)])
    disp = disp / np.abs(disp).max() * amplitude
    st = SpatialTransformer()
    f = torch.from_numpy(img.astype(np.float32))[None, None]
    d = torch.from_numpy(disp.astype(np.float32))[None]
    m = st(f, d)
    lab_f = torch.from_numpy(label)[None, None]
    lab_m = SpatialTransformer("nearest")(lab_f, d)
    return f, m, lab_f, lab_m


def dice(a: torch.Tensor, b: torch.Tensor, value: int) -> float:
    x, y = a == value, b == value
    return float(2 * (x & y).sum() / (x.sum() + y.sum()))


# ------------------------------------------------------------------------------------ the U-Net


@pytest.mark.parametrize("channels", [3, 6])
def test_unet_any_size_and_near_zero_initial_flow(channels):
    torch.manual_seed(0)
    net = AttentionUNet(channels, "small")
    flow, att = net(torch.rand(2, channels, 37, 45, 29))
    assert flow.shape == (2, 3, 37, 45, 29)
    assert att.shape == (2, 16, 19, 23, 15)
    assert 0 < att.min() and att.max() < 1
    assert flow.abs().max() < 1e-3


def test_unet_paper_width_shapes():
    torch.manual_seed(0)
    net = AttentionUNet(6, "paper")
    with torch.no_grad():
        flow, att = net(torch.rand(1, 6, 13, 10, 7))
    assert flow.shape == (1, 3, 13, 10, 7) and att.shape == (1, 128, 7, 5, 4)


def test_parameter_counts():
    paper = HDARCascade(width="paper", levels=3).parameter_counts()
    small = HDARCascade(width="small", levels=3).parameter_counts()
    print(f"\nparameters: paper {paper}  small {small}")
    assert paper["S1"] == count_parameters(AttentionUNet(3, "paper"))
    assert 14e6 < paper["total"] < 19e6  # the original TensorFlow cascade has about 18 M
    assert 2.5e5 < small["total"] < 4e5
    assert HDARCascade(width="small", levels=1).parameter_counts()["total"] == small["S1"]


def test_attention_gates_the_skip_connections():
    """The attention map is on the computation path: perturbing it changes the flow."""
    torch.manual_seed(0)
    net = AttentionUNet(3, "small")
    x = torch.rand(1, 3, 16, 16, 16)
    net.flow.weight.data.normal_(0, 0.1)
    base, _ = net(x)
    with torch.no_grad():
        net.attention.out.bias.add_(5.0)  # saturate the gate
    changed, att = net(x)
    assert att.min() > 0.9 and (changed - base).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ the cascade


def test_cascade_fast_mode_shapes_and_patch_hierarchy():
    torch.manual_seed(0)
    model = HDARCascade(width="small", levels=3, **TINY)
    f, m, _, _ = phantom((37, 45, 29))
    with torch.no_grad():
        out = model(f, m)
    assert out.flow.shape == (1, 3, 37, 45, 29)
    assert out.flow.abs().max() < 1e-3  # untrained: ~identity
    assert [lvl.level for lvl in out.levels] == [1, 2, 3]
    s1 = out.levels[0]
    assert s1.patches[0][0].size == (37, 45, 29) and s1.attention[0][0].shape == (1, 1, 5, 6, 4)  # 1/4 then 1/2
    s2, s3 = out.patches(2), out.patches(3)
    assert 1 <= len(s2) <= 3 and 1 <= len(s3) <= 3
    assert all(p.size == (24, 24, 24) for p in s2) and all(p.size == (12, 12, 12) for p in s3)
    for p in s3:  # S3 patches are chosen inside S2 patches
        parent = s2[p.parent]
        centre = np.array(p.start) + 6
        assert np.all((np.array(parent.start) <= centre) & (centre <= np.array(parent.stop)))
    assert all(a.shape == (1, 1, 6, 6, 6) for a in out.levels[1].attention[0])
    qc = out.levels[2].attention_volume()
    assert qc.shape == (37, 45, 29) and 0 <= qc.min() and qc.max() < 1
    inside = np.zeros((37, 45, 29), bool)
    for p in s3:
        inside[p.slices] = True
    assert qc.numpy()[~inside].max() == 0 and qc.numpy()[inside].min() > 0
    assert out.levels[0].attention_volume().min() > 0  # S1 covers the whole volume


def test_cascade_full_mode_covers_the_brain_and_levels_option():
    torch.manual_seed(0)
    model = HDARCascade(width="small", levels=3, **TINY)
    f, m, _, _ = phantom((32, 36, 28))
    with torch.no_grad():
        out = model(f, m, mode="full")
        two = model(f, m, levels=2)
    brain = (f[0, 0] > 0).numpy()
    for level in (2, 3):
        covered = np.zeros(brain.shape, bool)
        for p in out.patches(level):
            covered[p.slices] = True
        assert covered[brain].all()
    assert len(out.patches(3)) > len(out.patches(2)) > 1
    assert len(two.levels) == 2


def test_cascade_refines_when_patch_levels_predict_something():
    """A patch level that predicts a constant residual changes the field only where patches lie,
    and with the coarse field as base the result is continuous."""
    torch.manual_seed(0)
    model = HDARCascade(width="small", levels=2, **TINY)
    with torch.no_grad():
        model.nets[1].flow.bias.copy_(torch.tensor([0.5, 0.0, 0.0]))  # residual 0.5 input voxels = 1 voxel
    f, m, _, _ = phantom((48, 40, 36))
    with torch.no_grad():
        out = model(f, m, mode="fast")
    flow = out.flow[0, 0]
    patch = out.patches(2)[0]
    core = tuple(slice(s + 8, s + 16) for s in patch.start)
    assert flow[core].mean().item() == pytest.approx(1.0, abs=0.05)
    covered = np.zeros(flow.shape, bool)
    for p in out.patches(2):
        covered[p.slices] = True
    assert flow.numpy()[~covered].max() < 1e-3
    # A hard paste would jump by 1 voxel at patch faces. Ramps of 6 voxels rise by at most
    # pi / 12 = 0.26 per voxel, twice that where two patches' ramps coincide.
    assert max(float(flow.diff(dim=d).abs().max()) for d in range(3)) < 0.55


@pytest.mark.parametrize("settings", [dict(diffeomorphic=True), dict(composition="add"),
                                      dict(levels=1), dict(s1_shape=(12, 12, 12))])
def test_cascade_variants_run(settings):
    torch.manual_seed(0)
    model = HDARCascade(CascadeConfig(width="small", **{"levels": 3, **TINY, **settings}))
    f, m, _, _ = phantom((30, 26, 34))
    with torch.no_grad():
        out = model(f, m)
    assert out.flow.shape == (1, 3, 30, 26, 34) and torch.isfinite(out.flow).all()


def test_diffeomorphic_mode_keeps_large_random_fields_fold_free():
    """Random flow heads (fields of ~8 voxels, rough): plain displacements fold, velocities do not."""
    f, m, _, _ = phantom((40, 40, 40), seed=5)
    folds = {}
    for diffeo in (False, True):
        torch.manual_seed(0)
        model = HDARCascade(width="small", levels=3, diffeomorphic=diffeo, **TINY)
        with torch.no_grad():
            for net in model.nets:
                net.flow.weight.normal_(0, 2.0)
            out = model(f, m, mode="full")
        assert out.flow.abs().max() > 4
        folds[diffeo] = (jacobian_determinant(out.flow) <= 0).float().mean().item()
    assert folds[False] > 0.01 and folds[True] < 1e-3, folds


def test_cascade_batches_and_checkpoint_round_trip():
    torch.manual_seed(0)
    model = build_cascade("small", 3, seed=1, **TINY)
    f1, m1, _, _ = phantom((32, 32, 32), seed=1)
    f2, m2, _, _ = phantom((32, 32, 32), seed=2)
    with torch.no_grad():
        model.nets[0].flow.weight.normal_(0, 0.01)  # something non-trivial to compare
        batch = model(torch.cat([f1, f2]), torch.cat([m1, m2])).flow
        single = model(f2, m2).flow
        clone = HDARCascade.from_checkpoint(model.checkpoint(), mode="fast")
        again = clone(f2, m2).flow
    assert torch.allclose(batch[1:], single, atol=1e-5)
    assert torch.equal(again, single)
    assert build_cascade("small", 3, seed=1, **TINY).state_dict()["nets.0.enc0.conv.weight"].equal(
        build_cascade("small", 3, seed=1, **TINY).state_dict()["nets.0.enc0.conv.weight"])
    with pytest.raises(ValueError):
        CascadeConfig.from_dict({"levels": 2, "bogus": 1})
    with pytest.raises(ValueError):
        CascadeConfig(levels=4)


def test_cascade_flow_and_transform_exit():
    from hdar_pipeline.core.images import Grid

    torch.manual_seed(0)
    model = build_cascade("small", 2, seed=0, **TINY).eval()
    f, m, _, _ = phantom((24, 28, 20))
    with torch.no_grad():
        flow = model(f, m).flow[0].float().numpy()
    assert flow.shape == (3, 24, 28, 20) and flow.dtype == np.float32
    transform = field_voxels_to_transform(flow, Grid((24, 28, 20), np.diag([2.0, 2.0, 2.0, 1.0])))
    assert transform.field.shape == (24, 28, 20, 3)
    assert np.allclose(transform.field[..., 0], -2.0 * flow[0], atol=1e-6)  # RAS x -> LPS -x


def test_small_model_overfits_a_phantom_pair():
    """100 Adam steps of a one-level small model (S1 at 1/2) on a 32^3 phantom deformed by up to 5
    voxels: NCC and label Dice improve, without folding."""
    torch.manual_seed(0)
    f, m, lab_f, lab_m = phantom((32, 32, 32), seed=3, amplitude=5.0)
    model = HDARCascade(width="small", levels=1, s1_scale=0.5)
    st, st_nearest = SpatialTransformer(), SpatialTransformer("nearest")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.no_grad():
        ncc_before = local_ncc_loss(f, m).item()
    dice_before = [dice(lab_m, lab_f, v) for v in (1, 2)]
    start = time.perf_counter()
    for _ in range(100):
        flow = model(f, m).flow
        loss = local_ncc_loss(f, st(m, flow)) + 1.0 * anti_folding_loss(flow)
        opt.zero_grad()
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        flow = model(f, m).flow
        ncc_after = local_ncc_loss(f, st(m, flow)).item()
        warped = st_nearest(lab_m, flow)
    dice_after = [dice(warped, lab_f, v) for v in (1, 2)]
    print(f"\noverfit: {elapsed:.1f}s  NCC {ncc_before:.3f} -> {ncc_after:.3f}  "
          f"Dice {np.round(dice_before, 3)} -> {np.round(dice_after, 3)}")
    assert ncc_after < ncc_before - 0.05  # about -0.37 -> -0.48
    assert np.mean(dice_after) > np.mean(dice_before) + 0.04  # about 0.86 -> 0.95
    assert (jacobian_determinant(flow) <= 0).float().mean() < 0.01


def test_stagewise_training_step_reaches_only_the_unfrozen_level():
    torch.manual_seed(0)
    model = HDARCascade(width="small", levels=2, **TINY)
    for p in model.nets[0].parameters():
        p.requires_grad_(False)
    f, m, _, _ = phantom((32, 32, 32))
    out = model(f, m, mode="full")
    local_ncc_loss(f, SpatialTransformer()(m, out.flow)).backward()
    assert all(p.grad is None for p in model.nets[0].parameters())
    assert model.nets[1].flow.weight.grad is not None and model.nets[1].flow.weight.grad.abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    model = build_cascade("small", 3, seed=0, **TINY)
    with torch.no_grad():
        for net in model.nets:
            net.flow.weight.normal_(0, 0.01)
    f, m, _, _ = phantom((40, 36, 32), seed=4)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        cpu = model(f, m)
        gpu = model.cuda()(f.cuda(), m.cuda())
    assert [p.start for p in gpu.patches(2)] == [p.start for p in cpu.patches(2)]
    assert [p.start for p in gpu.patches(3)] == [p.start for p in cpu.patches(3)]
    assert torch.allclose(gpu.flow.cpu(), cpu.flow, atol=1e-4)


def test_patches_in_one_batch_give_the_same_field_as_one_at_a_time():
    """``patch_batch`` is a speed setting only: the patch networks see the same inputs either way."""
    torch.manual_seed(0)
    one = HDARCascade(width="small", levels=3, patch_batch=1, **TINY)
    many = HDARCascade(CascadeConfig.from_dict({**one.config.to_dict(), "patch_batch": 8}))
    many.load_state_dict(one.state_dict())
    with torch.no_grad():
        for net in one.nets[1:]:  # make the patch levels predict something that depends on the input
            net.flow.weight.normal_(0, 0.5)
        many.load_state_dict(one.state_dict())
        f, m, _, _ = phantom((37, 45, 29))
        a, b = one(f, m), many(f, m)
    assert len(a.patches(3)) == 3
    assert [p.start for p in a.patches(3)] == [p.start for p in b.patches(3)]
    assert float(a.flow.abs().max()) > 0.1
    torch.testing.assert_close(a.flow, b.flow, atol=1e-5, rtol=1e-4)


def test_top_k_override_limits_the_patches_per_level():
    torch.manual_seed(0)
    model = HDARCascade(width="small", levels=3, **TINY)
    f, m, _, _ = phantom((37, 45, 29))
    with torch.no_grad():
        default, fewer = model(f, m), model(f, m, top_k=1)
    assert len(default.patches(2)) == 3 and len(fewer.patches(2)) == 1 and len(fewer.patches(3)) == 1
    assert fewer.patches(2)[0].start == default.patches(2)[0].start  # the hardest one either way


def test_level_resolution_gives_the_full_resolution_field_on_a_coarser_grid():
    """resolution='level' keeps the fields on S2's half-resolution grid: same patches, vectors in the right
    units (a constant S2 residual of 0.5 input voxels is one full-resolution voxel either way), and the
    field upsampled once at the end."""
    torch.manual_seed(0)
    model = HDARCascade(width="small", levels=2, **TINY)
    with torch.no_grad():
        model.nets[1].flow.bias.copy_(torch.tensor([0.5, 0.0, -0.25]))
    f, m, _, _ = phantom((48, 40, 36))
    assert model.work_scale() == 0.5 and model.work_scale(1) == 1.0
    with torch.no_grad():
        full = model(f, m, mode="fast")
        level = model(f, m, mode="fast", resolution="level")
    assert level.levels[-1].flow.shape == (1, 3, 24, 20, 18)
    assert level.levels[-1].full_shape == (48, 40, 36)
    assert level.flow.shape == full.flow.shape == (1, 3, 48, 40, 36)
    assert [p.start for p in level.patches(2)] == [p.start for p in full.patches(2)]
    patch = full.patches(2)[0]
    core = (slice(None), slice(None), *(slice(s + 8, s + 16) for s in patch.start))
    assert level.flow[core][:, 0].mean().item() == pytest.approx(1.0, abs=0.05)
    assert level.flow[core][:, 2].mean().item() == pytest.approx(-0.5, abs=0.05)
    assert float((level.flow - full.flow).abs().mean()) < 0.05
    with pytest.raises(ValueError, match="resolution"):
        model(f, m, resolution="half")
