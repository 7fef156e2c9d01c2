"""benchmarks/hdar_ablations.py on a tiny "LPBA40-like" folder of phantoms with a tiny trained model.

Three phantom subjects (32^3, 3 mm) in LPBA40's layout (``S21/S21.delineation.skullstripped.nii.gz`` and
``S21.delineation.structure.label.nii.gz``); a 3-level cascade with tiny patches trained for a few steps and
exported with its model card; every variant on two pairs (refinement 2 steps, 2 random seeds); the
"not run" row for the missing second model; cached rows reused on a rerun; exit status 2 without weights.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import REPO, make_brain_phantom
from hdar_pipeline.core.provenance import sha256
from hdar_pipeline.hdar import weights as W
from hdar_pipeline.hdar.cascade import build_cascade
from hdar_pipeline.hdar.train import TrainConfig, export, train
from hdar_pipeline.core.synthetic import make_subject
from test_hdar_train import pair_dataset

TINY = dict(s2_patch=16, s2_input=8, s3_patch=8, s3_input=8, top_k=2, s1_scale=0.5)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("hdar_ablations", REPO / "benchmarks" / "hdar_ablations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hdar_ablations"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("hdar_ablations", None)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A 3-level tiny cascade (displacement) trained 30 + 2 + 2 steps, and an untrained diffeomorphic one."""
    out = tmp_path_factory.mktemp("ablation-run")
    cfg = TrainConfig(levels=3, steps_per_stage=(30, 2, 2), lr=3e-3, augment=False, val_every=100,
                      checkpoint_every=100, cascade=TINY, seed=0, loss_resolution="full")
    result = train(pair_dataset((32, 32, 32)), out, cfg, progress=False, device="cpu")
    pt, _ = export(result, "tiny", command="pytest", data_description={"source": "phantom"})
    other, _ = W.save_weights(build_cascade("small", 3, seed=1, diffeomorphic=True, **TINY), None,
                              {"command": "pytest (untrained)"}, out / "tiny-diffeo.pt")
    one, _ = W.save_weights(build_cascade("small", 1, seed=2, **TINY), None, {"command": "pytest (untrained)"},
                            out / "tiny-1level.pt")
    return {"pt": pt, "other": other, "one": one}


@pytest.fixture(scope="module")
def lpba_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("lpba40-like")
    phantom = make_brain_phantom(shape=(32, 32, 32), spacing=3.0, seed=3)
    for i, sub in enumerate(("S21", "S22", "S23")):
        s = make_subject(phantom.image, phantom.labels, seed=20 + i, magnitude_mm=7.0, smoothness_mm=9.0)
        (root / sub).mkdir()
        nib.save(s.image, root / sub / f"{sub}.delineation.skullstripped.nii.gz")
        nib.save(s.labels, root / sub / f"{sub}.delineation.structure.label.nii.gz")
    return root


def _args(lpba_like, out, *extra):
    return ["--lpba40", str(lpba_like), "--subjects", "S21", "S22", "S23", "--n-pairs", "2", "--refine-steps", "2",
            "--random-seeds", "2", "--threads", "1", "--device", "cpu", "--seed", "1", "-o", str(out),
            "--no-progress", *extra]


def test_every_variant_on_two_pairs_then_cached(script, tiny_weights, lpba_like, tmp_path, capsys):
    out = tmp_path / "ablations"
    t0 = time.perf_counter()
    assert script.main(_args(lpba_like, out, "--weights", str(tiny_weights["pt"]))) == 0
    first = time.perf_counter() - t0
    printed = capsys.readouterr().out
    rows = pd.read_csv(out / "ablations_pairs.csv")
    summary = pd.read_csv(out / "ablations_summary.csv").set_index("variant")
    md = (out / "ablations.md").read_text()

    ran = ["levels-1", "levels-2", "levels-3", "attention", "random", "fast", "full", "refine-0", "refine-2",
           "refine-2-level", "displacement"]
    assert list(summary.index) == ran[:-1] + ["diffeomorphic", "displacement"]
    assert set(rows["variant"]) == set(ran) and (rows["status"] == "ok").all()
    for name in ran:
        sub = rows[rows["variant"] == name]
        assert len(sub) == (4 if name == "random" else 2), name  # random: 2 pairs x 2 seeds
        assert set(zip(sub["moving"], sub["fixed"])) == {("S21", "S22"), ("S22", "S23")}
        assert ((sub["mean_dice"] > 0.3) & (sub["mean_dice"] <= 1)).all(), name
        assert ((sub["mean_target_overlap"] > 0.3) & (sub["mean_target_overlap"] <= 1)).all()
        assert ((sub["folded_percent"] >= 0) & (sub["folded_percent"] < 5)).all()
        assert (sub["std_log_jacobian"] >= 0).all() and (sub["runtime_s"] > 0).all()
        assert (sub["device"] == "cpu").all() and (sub["n_labels"] == 4).all()
        s = summary.loc[name]
        assert s["status"] == "ok" and s["n_pairs"] == 2 and s["device"] == "cpu"
        assert s["dice_mean"] == pytest.approx(sub.groupby(["moving", "fixed"])["mean_dice"].mean().mean())
    assert summary.loc["random", "n_seeds"] == 2 and sorted(set(rows.loc[rows["variant"] == "random",
                                                                        "selection_seed"])) == [1, 2]
    assert set(rows.loc[rows["variant"].str.startswith("levels"), "levels"]) == {1, 2, 3}
    assert (rows.loc[rows["variant"] == "full", "mode"] == "full").all()
    assert (rows.loc[rows["variant"] == "refine-2", "refine"] == 2).all()
    assert (rows.loc[rows["variant"] == "refine-2-level", "refine_similarity"] == "level").all()
    # one registration for identical settings, reported under each name
    base = rows[rows["variant"] == "levels-3"].set_index("moving")["mean_dice"]
    for name in ("attention", "fast", "refine-0", "displacement"):
        same = rows[rows["variant"] == name]
        assert (same["shared_with"] == "levels-3").all()
        assert np.allclose(same.set_index("moving")["mean_dice"], base)
    why = summary.loc["diffeomorphic", "status"]
    assert why.startswith("not run: needs a model trained with the other setting (hdar train --diffeomorphic)")
    assert summary.loc["diffeomorphic", "n_pairs"] == 0
    for text in ("# HDAR ablations", "| levels | levels-1 | 2 |", "2 x 2 seeds", "not run: needs a model trained",
                 "## Machine", "CPU:", "## Command", "--refine-steps 2", "VoxelMorph-like control", "± "):
        assert text in md, text
    assert "HDAR ablations" in printed and "| group | variant |" in printed and "levels-1" in printed
    assert len(list((out / "rows").glob("*.json"))) == len(rows)
    row = json.loads(next((out / "rows").glob("refine-2_S21-to-S22_*.json")).read_text())
    assert row["weights_sha256"] == sha256(tiny_weights["pt"]) and row["key"]

    # rerun: every row from the cache; then only the changed variant reruns
    t0 = time.perf_counter()
    assert script.main(_args(lpba_like, out, "--weights", str(tiny_weights["pt"]))) == 0
    again = pd.read_csv(out / "ablations_pairs.csv")
    assert again["cached"].all() and len(again) == len(rows)
    assert np.allclose(again["mean_dice"], rows["mean_dice"])
    print(f"\nablations: first run {first:.1f} s, cached rerun {time.perf_counter() - t0:.1f} s")
    args = _args(lpba_like, out, "--weights", str(tiny_weights["pt"]), "--variants", "refine-0", "refine-N")
    args[args.index("--refine-steps") + 1] = "3"
    assert script.main(args) == 0
    third = pd.read_csv(out / "ablations_pairs.csv").set_index("variant")
    assert third.loc["refine-0", "cached"].all() and not third.loc["refine-3", "cached"].any()


def test_second_model_and_separate_one_level_network(script, tiny_weights, lpba_like, tmp_path):
    out = tmp_path / "two-models"
    assert script.main(_args(lpba_like, out, "--weights", str(tiny_weights["pt"]), "--weights-other",
                             str(tiny_weights["other"]), "--weights-1level", str(tiny_weights["one"]),
                             "--variants", "levels-1", "diffeomorphic", "displacement", "--n-pairs", "1")) == 0
    rows = pd.read_csv(out / "ablations_pairs.csv").set_index("variant")
    assert list(rows.index) == ["levels-1", "diffeomorphic", "displacement"] and (rows["status"] == "ok").all()
    assert rows.loc["diffeomorphic", "weights"].endswith("tiny-diffeo.pt") and rows.loc["diffeomorphic", "diffeomorphic"]
    assert rows.loc["displacement", "weights"].endswith("tiny.pt") and not rows.loc["displacement", "diffeomorphic"]
    assert rows.loc["levels-1", "weights"].endswith("tiny-1level.pt") and rows.loc["levels-1", "levels"] == 1
    md = (out / "ablations.md").read_text()
    assert "levels-1 uses the separately trained network tiny-1level.pt" in md
    assert "compares two trained models" in md
    # --weights-other trained the same way: a "not run" row that says so
    same = tmp_path / "same"
    assert script.main(_args(lpba_like, same, "--weights", str(tiny_weights["pt"]), "--weights-other",
                             str(tiny_weights["pt"]), "--variants", "diffeomorphic", "--n-pairs", "1")) == 1
    status = pd.read_csv(same / "ablations_summary.csv").set_index("variant").loc["diffeomorphic", "status"]
    assert status.startswith("not run: --weights-other (tiny.pt) was trained with the same setting")


def test_no_weights_or_no_data_exit_2(script, lpba_like, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "shipped"
    empty.mkdir()
    monkeypatch.setattr(W, "WEIGHTS_DIR", empty)
    monkeypatch.setenv("HDAR_LPBA40_DIR", str(lpba_like))
    assert script.main(["--subjects", "S21", "S22", "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "hdar_ablations.py: error: --weights: no trained HDAR weights are shipped in this version" in err
    assert "hdar train" in err
    assert script.main(["--weights", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    pt, _ = W.save_weights(build_cascade("small", 1, seed=0, **TINY), None, {}, tmp_path / "w.pt")
    assert script.main(["--weights", str(pt), "--lpba40", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")]) == 2
    assert "LPBA40 folder not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
