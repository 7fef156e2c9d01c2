"""hdar/patches.py: difficulty-aware selection (scores, NMS, top K), sliding windows, seamless blending."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hdar_pipeline.hdar.patches import (Patch, PatchBlender, blend_weights, box_iou, candidate_patches, clamp_start,
                                        nms_3d, ramp_profile, select_patches, sliding_window_patches)


def peaked_map(shape, peaks, channels=4, seed=0, sigma=1.5) -> torch.Tensor:
    """Low noise plus Gaussian bumps of given heights at given centres, ``(C, x, y, z)``."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float64)
    m = 0.05 * rng.random(shape)
    for centre, height in peaks:
        d2 = sum((idx[a] - centre[a]) ** 2 for a in range(3))
        m = m + height * np.exp(-d2 / (2 * sigma ** 2))
    # channels differ, their mean is the map (checks the channel averaging)
    offs = np.linspace(-0.02, 0.02, channels)
    return torch.from_numpy(np.stack([m + o for o in offs]).astype(np.float32))


def test_iou_and_nms():
    boxes = np.array([[0, 0, 0, 10, 10, 10], [5, 0, 0, 15, 10, 10], [20, 20, 20, 30, 30, 30],
                      [1, 0, 0, 11, 10, 10]], float)
    assert box_iou(boxes[0], boxes[1:]) == pytest.approx([5 / 15, 0.0, 9 / 11])
    keep = nms_3d(boxes, np.array([0.9, 0.8, 0.7, 0.85]), 0.5)
    assert keep.tolist() == [0, 1, 2]  # box 3 overlaps box 0 by 9/11 > 0.5; box 1 by 1/3 survives
    assert nms_3d(boxes, np.array([0.9, 0.8, 0.7, 0.85]), 0.5, max_keep=2).tolist() == [0, 1]
    # ties: lower index first
    assert nms_3d(boxes[[0, 2]], np.array([0.5, 0.5]), 0.5).tolist() == [0, 1]


def test_clamp_start():
    assert clamp_start((-3, 5, 90), (10, 10, 10), (50, 50, 96)) == (0, 5, 86)
    assert clamp_start((0, 0, 0), (60, 10, 10), (50, 50, 50))[0] == -5  # larger than the volume: centred


def test_selection_returns_the_highest_non_overlapping_windows():
    """Attention map at 1/4 of a 96x112x80 volume with four hot blocks of exactly one window (8^3).

    Any window scoring above 2/3 of a block's value overlaps that block's window with IoU > 0.5, so
    with block values 1.0 > 0.9 > 0.8 > 0.7 the top 4 after NMS are exactly the blocks, in order.
    """
    shape = (24, 28, 20)
    blocks = [((1, 2, 1), 0.9), ((14, 18, 11), 1.0), ((15, 1, 2), 0.7), ((2, 19, 11), 0.8)]
    m = np.zeros(shape, np.float32)
    for (x, y, z), value in blocks:
        m[x:x + 8, y:y + 8, z:z + 8] = value
    att = torch.from_numpy(np.stack([m - 0.01, m + 0.01, m]))  # channel mean = m
    full = (96, 112, 80)
    cands = candidate_patches(att, patch_size=32, full_shape=full, stride=1)
    assert len(cands) == (24 - 8 + 1) * (28 - 8 + 1) * (20 - 8 + 1)
    chosen = select_patches(cands, top_k=3, iou_threshold=0.5)
    expected = sorted(blocks, key=lambda b: -b[1])[:3]
    assert [p.start for p in chosen] == [tuple(4 * o for o in offset) for offset, _ in expected]
    assert [p.score for p in chosen] == pytest.approx([v for _, v in expected], abs=1e-5)
    assert len(select_patches(cands, top_k=8)) == 8  # more survive NMS (partial windows), ranked lower
    assert [p.start for p in select_patches(cands, top_k=8)[:4]] == \
        [tuple(4 * o for o in offset) for offset, _ in sorted(blocks, key=lambda b: -b[1])]


def test_selection_with_smooth_peaks_is_greedy_nms_over_all_windows():
    """Brute force: each pick is the best window whose IoU with every earlier pick is <= 0.5."""
    shape = (24, 28, 20)
    peaks = [((6, 6, 6), 1.0), ((17, 20, 12), 0.95), ((4, 22, 14), 0.9)]
    att = peaked_map(shape, peaks, seed=1, sigma=2.0)
    cands = candidate_patches(att, patch_size=32, full_shape=(96, 112, 80))
    chosen = select_patches(cands, top_k=5)
    boxes = np.array([[*c.start, *c.stop] for c in cands], float)
    scores = np.array([c.score for c in cands])
    picked: list[int] = []
    for _ in range(5):
        ok = np.ones(len(cands), bool)
        for i in picked:
            ok &= box_iou(boxes[i], boxes) <= 0.5
        ok[picked] = False
        picked.append(int(np.flatnonzero(ok)[np.argmax(scores[ok])]))
    assert [p.start for p in chosen] == [cands[i].start for i in picked]
    # the top window contains the strongest peak and the second pick covers the second peak
    for p, (centre, _) in zip(chosen[:2], peaks[:2]):
        c = (np.asarray(centre) + 0.5) * 4
        assert np.all((np.array(p.start) <= c) & (c < np.array(p.stop)))


def test_selection_inside_a_parent_region_and_mask_filter():
    att = peaked_map((14, 14, 14), [((3, 10, 7), 1.0)])
    cands = candidate_patches(att, patch_size=28, full_shape=(160, 192, 160), region_start=(40, 60, 30),
                              region_size=(56, 56, 56), parent=2)
    best = select_patches(cands, top_k=1)[0]
    assert best.parent == 2
    centre = np.array(best.start) + 14
    assert np.abs(centre - (np.array([40, 60, 30]) + (np.array([3, 10, 7]) + 0.5) * 4)).max() <= 6
    mask = np.zeros((160, 192, 160), bool)
    mask[80:, :, :] = True  # the peak lies outside the mask: the mask wins
    masked = select_patches(cands, top_k=1, mask=mask, min_mask_fraction=0.0)
    assert masked and masked[0].stop[0] > 80


def test_sliding_window_covers_the_mask():
    shape = (40, 50, 30)
    mask = np.zeros(shape, bool)
    mask[5:20, 10:30, 3:17] = True
    patches = sliding_window_patches(shape, 16, 12, mask=mask)
    covered = np.zeros(shape, bool)
    for p in patches:
        covered[p.slices] = True
        assert mask[p.slices].any()
    assert covered[mask].all()
    everything = sliding_window_patches(shape, 16, 12)
    assert len(everything) > len(patches) and all(p.stop[a] <= shape[a] for p in everything for a in range(3))
    big = sliding_window_patches((10, 40, 40), (16, 16, 16), 8)
    assert {p.start[0] for p in big} == {-3}


def test_ramp_profile_partition_of_unity():
    a = ramp_profile(32, 8)
    assert a.min() > 0 and a[8:24].min() == 1.0 and np.allclose(a, a[::-1])
    # two windows overlapping by exactly the taper sum to one there
    total = np.zeros(56)
    total[:32] += ramp_profile(32, 8, taper_low=False)
    total[24:] += ramp_profile(32, 8, taper_high=False)
    assert np.allclose(total, 1.0)


def test_blend_weights_do_not_taper_at_the_volume_border():
    w = blend_weights(Patch((0, 10, 34), (16, 16, 16)), (50, 50, 50), 4)[0, 0].numpy()
    assert w[0, 8, 8] == 1.0          # face on the volume border: no ramp
    assert w[8, 0, 8] < 0.1           # inner face: ramp
    assert w[8, 8, 15] == 1.0         # 34 + 16 = 50: far border


def _max_jump(field: torch.Tensor) -> float:
    return max(float(field.diff(dim=d).abs().max()) for d in (2, 3, 4))


def test_blending_constant_patch_fields_is_continuous():
    shape = (48, 40, 36)
    patches = [Patch((4, 4, 4), (20, 20, 20)), Patch((14, 10, 8), (20, 20, 20)), Patch((26, 18, 14), (20, 20, 20))]
    blender = PatchBlender(shape, taper=8)
    for i, p in enumerate(patches):
        blender.add(torch.full((1, 3, 20, 20, 20), 2.0 + i), p)
    out = blender.result()
    # Patch values are 2-4 voxels: a hard paste would jump by up to 4. A raised-cosine ramp of 8
    # voxels rises by at most pi / 16 of the step per voxel: 4 * pi / 16 = 0.79.
    assert _max_jump(out) < 0.8
    assert out[0, 0, 12, 13, 13].item() == pytest.approx(2.0, abs=1e-5)   # core of patch 0 only
    assert out[0, 0, 0, 0, 0].item() == 0.0                               # uncovered: residual 0
    # Against a base field: uncovered voxels keep it, and the transition is continuous too.
    base = torch.full((1, 3, *shape), -1.0)
    with_base = blender.result(base)
    assert with_base[0, 0, 0, 0, 0].item() == -1.0 and _max_jump(with_base) < 1.2


def test_blending_a_linear_field_reproduces_it_exactly_with_the_same_base():
    """Patches cut from one linear field, blended over that field, give the field back: no seams."""
    shape = (40, 44, 36)
    idx = torch.from_numpy(np.indices(shape).astype(np.float32))
    linear = torch.stack([0.1 * idx[0] + 0.05 * idx[1], -0.07 * idx[2], 0.03 * idx[0] - 0.02 * idx[1] + 1.0])[None]
    blender = PatchBlender(shape, taper=5)
    for p in sliding_window_patches(shape, 20, 15) + [Patch((7, 9, 3), (20, 20, 20))]:
        blender.add(linear[(slice(None), slice(None), *p.slices)], p)
    out = blender.result(linear)
    assert torch.allclose(out, linear, atol=1e-5)
    # and without a base, where the windows cover everything with weight >= 1, also exactly
    core = blender.weight[0, 0] >= 1.0
    assert core.float().mean() > 0.5
    assert torch.allclose(blender.result()[0][:, core], linear[0][:, core], atol=1e-5)


def test_full_mode_windows_partition_unity():
    """Stride = patch - taper: inside the covered volume the weights sum to exactly one."""
    shape = (64, 64, 64)
    blender = PatchBlender(shape, channels=1, taper=8)
    for p in sliding_window_patches(shape, 32, 24):
        blender.add(torch.ones(1, 1, 32, 32, 32), p)
    w = blender.weight[0, 0]
    assert w.min() >= 1.0 - 1e-5
    assert torch.allclose(blender.result(), torch.ones(1, 1, *shape), atol=1e-5)


def test_blender_passes_gradients():
    field = torch.zeros(1, 3, 8, 8, 8, requires_grad=True)
    blender = PatchBlender((16, 16, 16), taper=2)
    blender.add(field + 1.0, Patch((4, 4, 4), (8, 8, 8)))
    blender.result().sum().backward()
    assert field.grad is not None and field.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- random selection (ablation)


def _hot_spot_candidates():
    """One clear hot spot (a 1/4-scale map of a 96x112x80 volume) plus low noise."""
    att = peaked_map((24, 28, 20), [((6, 7, 5), 1.0)], seed=2, sigma=2.0)
    return candidate_patches(att, patch_size=32, full_shape=(96, 112, 80))


def test_random_ranking_same_rules_differs_from_attention_and_is_reproducible():
    cands = _hot_spot_candidates()
    top = select_patches(cands, top_k=4, iou_threshold=0.5)
    best = max(cands, key=lambda c: c.score)
    assert top[0].start == best.start  # attention: the hot spot first
    draws = [select_patches(cands, top_k=4, iou_threshold=0.5, ranking="random", rng=np.random.default_rng(s))
             for s in range(6)]
    for chosen in draws:
        assert len(chosen) == 4
        assert [p.start for p in chosen] != [p.start for p in top]
        boxes = np.array([[*p.start, *p.stop] for p in chosen], float)
        for i in range(len(boxes)):  # the same NMS rule: no pair overlaps by more than the threshold
            assert np.all(box_iou(boxes[i], np.delete(boxes, i, axis=0)) <= 0.5)
        assert all(p in cands for p in chosen)  # drawn among the same candidate windows, scores kept
    # the hot spot is rarely drawn first: the draws do not follow the attention
    assert sum(d[0].start == best.start for d in draws) <= 1
    again = select_patches(cands, top_k=4, ranking="random", rng=np.random.default_rng(3))
    assert [p.start for p in again] == [p.start for p in draws[3]]
    assert [p.start for p in select_patches(cands, top_k=4, ranking="random", rng=3)] == [p.start for p in again]
    assert len({tuple(p.start for p in d) for d in draws}) > 1  # seeds differ
    with pytest.raises(ValueError, match="ranking"):
        select_patches(cands, ranking="best")


def test_random_ranking_keeps_the_mask_rule():
    cands = _hot_spot_candidates()
    mask = np.zeros((96, 112, 80), bool)
    mask[48:, :, :] = True  # the hot spot (x ~ 26 full-res) lies outside
    for s in range(4):
        chosen = select_patches(cands, top_k=5, mask=mask, min_mask_fraction=0.5, ranking="random", rng=s)
        assert chosen and all(mask[p.slices].mean() > 0.5 for p in chosen)


@pytest.mark.usefixtures("torch_one_thread")
def test_cascade_selection_option_config_checkpoint_and_seed():
    from hdar_pipeline.hdar.cascade import CascadeConfig, HDARCascade

    tiny = dict(s2_patch=16, s2_input=8, s3_patch=8, s3_input=8, top_k=3, s1_scale=0.5)
    cfg = CascadeConfig(levels=3, **tiny)
    assert cfg.selection == "attention" and cfg.selection_seed == 0
    d = CascadeConfig(selection="random", selection_seed=5, **tiny).to_dict()
    assert d["selection"] == "random" and d["selection_seed"] == 5
    assert CascadeConfig.from_dict(d).selection == "random"
    old = cfg.to_dict()
    del old["selection"], old["selection_seed"]  # configs written before the option load as "attention"
    assert CascadeConfig.from_dict(old).selection == "attention"
    with pytest.raises(ValueError, match="selection"):
        CascadeConfig(selection="shuffle")

    torch.manual_seed(0)
    model = HDARCascade(cfg).eval()
    rng = np.random.default_rng(0)
    f = torch.from_numpy(np.pad(rng.random((24, 24, 24)), 4).astype(np.float32))[None, None]
    m = torch.roll(f, 2, dims=2)
    with torch.no_grad():
        att = model(f, m)
        model.seed_selection(7)
        r1 = model(f, m, selection="random")
        r1b = model(f, m, selection="random")  # the generator advanced
        model.seed_selection(7)
        r2 = model(f, m, selection="random")
        rnd = HDARCascade.from_checkpoint(model.checkpoint(), selection="random", selection_seed=7).eval()
        r3 = rnd(f, m)
        again = model(f, m)
    assert rnd.config.selection == "random"
    for level in (2, 3):
        assert r1.patches(level) == r2.patches(level) == r3.patches(level)  # same seed, same patches
        assert 0 < len(r1.patches(level)) <= 3
    assert [r1.patches(2), r1.patches(3)] != [r1b.patches(2), r1b.patches(3)]  # the generator advanced
    assert again.patches(2) == att.patches(2) and again.patches(3) == att.patches(3)  # attention unchanged
    with pytest.raises(ValueError, match="selection"):
        model(f, m, selection="shuffle")
