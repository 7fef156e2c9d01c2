"""hdar/inference.py's settings object and how the methods build it; core/runtime.py's device resolution."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from conftest import REPO
from hdar_pipeline.core.runtime import resolve_device
from hdar_pipeline.hdar.inference import InferenceSettings
from hdar_pipeline.methods import get_method
from hdar_pipeline.methods.hdar_method import ACCURATE_FULL_RESOLUTION_STEPS, ACCURATE_STEPS, REFINED_STEPS


def test_settings_are_frozen_and_normalised():
    s = InferenceSettings(refine="7", refine_levels=[0.25, "0.5"], refine_full_resolution=1.0)
    assert s.refine == 7 and s.refine_full_resolution == 1 and s.refine_levels == (0.25, 0.5)
    assert isinstance(s.refine_levels, tuple) and all(isinstance(x, float) for x in s.refine_levels)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.refine = 3  # type: ignore[misc]
    assert InferenceSettings() == InferenceSettings(mode="fast", prealign=True, refine=0, refine_levels=(0.25, 0.5))
    assert hash(InferenceSettings(refine=2)) == hash(InferenceSettings(refine=2.0))


@pytest.mark.parametrize("options, message", [
    ({"mode": "slow"}, "mode must be 'fast' or 'full', got 'slow'"),
    ({"levels": 4}, "levels must be 1, 2 or 3, got 4"),
    ({"selection": "best"}, "selection must be 'attention' or 'random', got 'best'"),
    ({"refine": -1}, "refine must be >= 0"),
    ({"refine": 3, "refine_full_resolution": -1}, "refine_full_resolution must be >= 0"),
    ({"refine_full_resolution": 2}, "refine_full_resolution needs refine > 0 and refine_similarity='full'"),
    ({"refine": 2, "refine_similarity": "level", "refine_full_resolution": 2},
     "refine_full_resolution needs refine > 0 and refine_similarity='full'"),
    ({"refine_levels": ()}, "refine_levels must be scales in (0, 1], got ()"),
    ({"refine_levels": (0.0, 0.5)}, "refine_levels must be scales in (0, 1], got (0.0, 0.5)"),
    ({"refine_similarity": "half"}, "refine_similarity must be 'full' or 'level', got 'half'"),
    ({"refine": 2, "refine_levels": (0.3,)}, "similarity='full' needs a scale of 1/b"),
    ({"refine": 2, "refine_levels": (0.5, 1.0), "refine_full_resolution": 1},
     "a full-resolution level follows the scales"),
])
def test_settings_refuse_what_cannot_run(options, message):
    with pytest.raises(ValueError) as info:
        InferenceSettings(**options)
    assert message in str(info.value)


def test_a_coarse_level_scale_that_is_not_1_over_b_is_fine_with_level_similarity():
    assert InferenceSettings(refine=2, refine_levels=(0.3,), refine_similarity="level").refine_levels == (0.3,)


@pytest.mark.parametrize("name, preset, want", [
    ("hdar", "fast", InferenceSettings(mode="fast")),
    ("hdar", "full", InferenceSettings(mode="full")),
    ("hdar", "refined", InferenceSettings(refine=REFINED_STEPS)),
    ("hdar", "accurate", InferenceSettings(refine=ACCURATE_STEPS,
                                           refine_full_resolution=ACCURATE_FULL_RESOLUTION_STEPS)),
    ("voxelmorph", "fast", InferenceSettings()),
    ("voxelmorph", "refined", InferenceSettings(refine=ACCURATE_STEPS,
                                                refine_full_resolution=ACCURATE_FULL_RESOLUTION_STEPS)),
])
def test_the_methods_build_one_settings_object_from_preset_and_fields(name, preset, want):
    assert get_method(name, preset=preset).inference_settings == want
    # an option the preset would fill in is the user's; options with no room for the full-resolution level drop it
    method = get_method(name, preset=preset, options={"refine": 4, "refine_lr": 0.1, "prealign": False})
    assert method.inference_settings == dataclasses.replace(want, refine=4, refine_lr=0.1, prealign=False)
    level = get_method(name, preset=preset, options={"refine_similarity": "level"}).inference_settings
    assert level.refine_similarity == "level" and level.refine_full_resolution == 0


def test_hdar_parameters_keep_their_keys_order_and_values():
    params = get_method("hdar", seed=1, threads=1).parameters
    assert params == {"preset": "accurate", "prealign": True, "refine": ACCURATE_STEPS, "refine_levels": (0.25, 0.5),
                      "refine_lr": 0.2, "refine_similarity": "full", "refine_diffeomorphic": True,
                      "refine_smooth_weight": None, "refine_gradient_sigma": 1.0,
                      "refine_full_resolution": ACCURATE_FULL_RESOLUTION_STEPS, "weights": "default",
                      "device": "auto", "seed": 1, "threads": 1, "mode": "fast"}
    assert list(params) == ["preset", "prealign", "refine", "refine_levels", "refine_lr", "refine_similarity",
                            "refine_diffeomorphic", "refine_smooth_weight", "refine_gradient_sigma",
                            "refine_full_resolution", "weights", "device", "seed", "threads", "mode"]
    with pytest.raises(ValueError, match="refine must be >= 0"):
        get_method("hdar", options={"refine": -1})
    with pytest.raises(ValueError, match="unknown HDAR preset 'slow'"):
        get_method("hdar", preset="slow")


def test_resolve_device(monkeypatch):
    import torch

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'cuda:0' requested but CUDA is not available"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_runtime_and_inference_modules_do_not_import_torch():
    code = ("import sys; import hdar_pipeline.core.runtime, hdar_pipeline.hdar.inference, "
            "hdar_pipeline.methods.hdar_method; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"
