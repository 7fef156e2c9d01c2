"""hdar/weights.py: model cards, SHA-256 verification before loading, weights_only loading, no network,
and the clear error when no weights are shipped."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from hdar_pipeline.core.provenance import sha256
from hdar_pipeline.hdar import weights as W
from hdar_pipeline.hdar.cascade import build_cascade

TINY = dict(s2_patch=16, s2_input=8, s3_patch=8, s3_input=8, top_k=2)


@pytest.fixture()
def model():
    m = build_cascade("small", 2, seed=0, **TINY)
    with torch.no_grad():
        for net in m.nets:
            net.flow.weight.normal_(0, 0.01)  # a non-trivial field, so loading is checked by the output
    return m


@pytest.fixture()
def saved(model, tmp_path):
    card = {"data": {"source": "phantom"}, "command": "pytest", "seed": 0, "commit": "abc",
            "hardware": {"device": "cpu"}, "training_time_s": 1.0, "validation": {"final": {"val_dice": 0.5}},
            "config": {"training": {"lr": 1e-4}}}
    pt, card_path = W.save_weights(model, model.config, card, tmp_path / "mymodel")
    return pt, card_path


@pytest.fixture()
def no_shipped(tmp_path, monkeypatch):
    """An empty weights folder in place of the package's (so these tests hold once weights ship)."""
    empty = tmp_path / "shipped"
    empty.mkdir()
    monkeypatch.setattr(W, "WEIGHTS_DIR", empty)
    return empty


def test_save_writes_pt_and_card_and_load_reproduces_the_model(model, saved):
    pt, card_path = saved
    assert pt.name == "mymodel.pt" and card_path.name == "mymodel.json"
    card = json.loads(card_path.read_text())
    assert card["sha256"] == sha256(pt) and card["name"] == "mymodel" and card["format"] == W.WEIGHTS_FORMAT
    for key in ("data", "command", "seed", "commit", "hardware", "training_time_s", "validation", "created"):
        assert key in card
    assert card["config"]["cascade"]["levels"] == 2 and card["config"]["training"] == {"lr": 1e-4}
    assert card["parameters"]["total"] == model.parameter_counts()["total"]
    loaded = W.load_weights(pt, device="cpu")
    assert loaded.sha256 == card["sha256"] and loaded.name == "mymodel" and not loaded.model.training
    assert loaded.model.config == model.config
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x, x.roll(2, 2)).flow, model.eval()(x, x.roll(2, 2)).flow)
    assert W.load_weights(card_path).sha256 == loaded.sha256  # the card's path works too
    # inference-only overrides
    assert W.load_weights(pt, mode="full", top_k=1).model.config.top_k == 1


def test_loading_uses_weights_only(saved, monkeypatch):
    pt, _ = saved
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    W.load_weights(pt)
    assert calls == [True]


class _Evil:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_a_pickle_with_code_is_refused_even_with_a_matching_hash(tmp_path):
    pt = tmp_path / "evil.pt"
    torch.save({"format": W.WEIGHTS_FORMAT, "config": {}, "state_dict": {}, "x": _Evil()}, pt)
    (tmp_path / "evil.json").write_text(json.dumps({"sha256": sha256(pt)}))
    with pytest.raises(W.WeightsError, match="cannot be loaded"):
        W.load_weights(pt)


def test_a_tampered_file_is_rejected_before_unpickling(saved, monkeypatch):
    pt, _ = saved
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not run on a bad hash"))
    with pytest.raises(W.WeightsError, match="SHA-256 mismatch") as err:
        W.load_weights(pt)
    assert str(pt) in str(err.value) and "corrupt or was modified" in str(err.value)


def test_missing_card_and_missing_file(saved, tmp_path):
    pt, card_path = saved
    with pytest.raises(W.NoWeightsError, match="not found"):
        W.load_weights(tmp_path / "absent.pt")
    card_path.unlink()
    with pytest.raises(W.WeightsError, match="model card mymodel.json is missing"):
        W.load_weights(pt)
    card_path.write_text("{not json")
    with pytest.raises(W.WeightsError, match="cannot be read"):
        W.load_weights(pt)


def test_no_shipped_weights_gives_the_clear_message(no_shipped):
    assert W.available_weights() == []
    with pytest.raises(W.NoWeightsError, match="no trained HDAR weights are shipped in this version; train with "
                                               "`hdar train`"):
        W.load_weights()
    assert issubclass(W.NoWeightsError, ValueError)  # the CLIs report ValueErrors as clean errors


def test_shipped_name_resolution_and_no_network(model, saved, no_shipped, monkeypatch):
    pt, card_path = saved
    (no_shipped / "default.pt").write_bytes(pt.read_bytes())
    (no_shipped / "default.json").write_text(card_path.read_text())
    assert W.available_weights() == ["default"]

    def no_network(*args, **kwargs):
        raise AssertionError("load_weights tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    loaded = W.load_weights("default")
    assert loaded.path == no_shipped / "default.pt" and loaded.sha256 == sha256(pt)
    with pytest.raises(W.NoWeightsError, match="no shipped HDAR weights named 'other'; shipped: default"):
        W.load_weights("other")


def test_the_pt_file_holds_only_tensors_and_plain_values(saved):
    pt, _ = saved
    payload = torch.load(pt, weights_only=True)
    assert set(payload) == {"format", "config", "state_dict"}
    assert all(isinstance(v, torch.Tensor) and (not v.is_floating_point() or v.dtype == torch.float32)
               for v in payload["state_dict"].values())
    json.dumps(payload["config"])  # plain values


def test_identity_of_the_shipped_weights_does_not_import_torch():
    """A workflow's cache keys name the weights (model_identity): resolving and hashing them must not import torch
    in the App's own process, which never runs a network (about 2 s of its start-up)."""
    import subprocess
    import sys

    code = ("import sys; from hdar_pipeline.methods import model_identity; "
            "ident = model_identity('hdar'); assert ident.startswith('default@sha256:'), ident; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
