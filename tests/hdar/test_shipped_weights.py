"""The shipped default weights: they load (hash-verified, ``weights_only``) and reproduce the validation
scores their model card reports, on the card's own held-out LPBA40 pairs."""

from __future__ import annotations

import pytest
import torch

from hdar_pipeline.core.subject import find_image_subjects
from hdar_pipeline.hdar.data import PairDataset
from hdar_pipeline.hdar.train import validate
from hdar_pipeline.hdar.weights import available_weights, load_weights


@pytest.mark.parametrize("name, network", [("default", "hdar"), ("voxelmorph", "voxelmorph")])
def test_shipped_weights_come_with_a_complete_model_card(name, network):
    assert name in available_weights()
    loaded = load_weights(name)  # raises on a hash mismatch
    card = loaded.card
    for key in ("data", "command", "seed", "commit", "hardware", "training_time_s", "validation", "config"):
        assert card.get(key) not in (None, "", {}), key
    assert "hdar train " in card["command"]
    assert card["config"]["cascade"]["levels"] == loaded.model.config.levels == card["levels_exported"]
    assert set(card["data"]["train_subjects"]).isdisjoint(card["data"]["val_subjects"])
    assert card["data"]["orientation"] == "LPS"  # LPBA40's array axes; inference reorients to them
    assert loaded.model.config.network == network
    assert "/work/" not in str(card) and "/home/" not in str(card)  # no machine paths on a shipped card


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("name", ["default", "voxelmorph"])
def test_shipped_weights_reproduce_the_model_card_on_their_validation_pairs(lpba40_dir, torch_one_thread, name):
    loaded = load_weights(name)
    card = loaded.card
    training = card["config"]["training"]
    final = card["validation"]["final"]
    names = [name.split(".")[0] for name in card["data"]["val_subjects"]]  # "S21.delineation.skullstripped"
    subjects = find_image_subjects(
        images=[lpba40_dir / n / f"{n}.delineation.skullstripped.nii.gz" for n in names],
        labels=[lpba40_dir / n / f"{n}.delineation.structure.label.nii.gz" for n in names])
    data = PairDataset.from_subjects(subjects)
    pairs = data.validation_pairs(training["val_pairs"], seed=training["seed"])
    with torch.no_grad():
        scores = validate(loaded.model, data, pairs, stage=loaded.model.config.levels,
                          mode=training["train_mode"], window=training["ncc_window"])
    assert scores["val_dice"] == pytest.approx(final["val_dice"], abs=0.005)
    assert scores["val_ncc"] == pytest.approx(final["val_ncc"], abs=0.005)
    assert scores["val_folded_percent"] == pytest.approx(final["val_folded_percent"], abs=0.05)
