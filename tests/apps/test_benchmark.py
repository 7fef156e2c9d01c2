"""`hdar benchmark` (hdar_pipeline.apps.benchmark.runner): the method comparison on a tiny BIDS dataset of phantoms.

Three deformed phantoms (32^3, 3 mm) with their labels; the cheap variants (affine, Demons) on two
pairs, through the Python API and through ``run_benchmark_cli``; cached rows are reused; per-variant
pair limits; HDAR without weights is a "not run" row, never a crash.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import nibabel as nib
import pandas as pd
import pytest

from conftest import make_brain_phantom
from hdar_pipeline.apps import benchmark as bm
from hdar_pipeline.core.synthetic import make_subject
from hdar_pipeline.core.subject import Subject

pytest.importorskip("bids")


@pytest.fixture(scope="module")
def phantom_bids(tmp_path_factory) -> tuple[Path, Path]:
    """A BIDS raw dataset (sub-01..03 T1w) and a labels derivatives dataset (their dseg)."""
    root = tmp_path_factory.mktemp("bench")
    raw, labels = root / "raw", root / "labels"
    phantom = make_brain_phantom(shape=(32, 32, 32), spacing=3.0, seed=3)
    (raw).mkdir()
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "phantoms", "BIDSVersion": "1.8.0"}))
    labels.mkdir()
    (labels / "dataset_description.json").write_text(json.dumps(
        {"Name": "phantom labels", "BIDSVersion": "1.8.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "tests"}]}))
    for i, sub in enumerate(("01", "02", "03")):
        s = make_subject(phantom.image, phantom.labels, seed=10 + i, magnitude_mm=7.0, smoothness_mm=9.0)
        (raw / f"sub-{sub}" / "anat").mkdir(parents=True)
        (labels / f"sub-{sub}" / "anat").mkdir(parents=True)
        nib.save(s.image, raw / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz")
        nib.save(s.labels, labels / f"sub-{sub}" / "anat" / f"sub-{sub}_dseg.nii.gz")
    return raw, labels


def _config(phantom_bids, out: Path, **kw) -> bm.BenchmarkConfig:
    raw, labels = phantom_bids
    subjects, notes = bm.bids_subjects(raw, labels)
    assert [s.id for s in subjects] == ["01", "02", "03"] and not notes
    pairs = bm.make_pairs(subjects, "onto-first")
    assert [p.name for p in pairs] == ["02->01", "03->01"]
    defaults = dict(pairs=pairs, output=out, variants=["affine", "demons", "hdar-fast"], affine=False,
                    threads=1, seed=1, dataset="phantoms", command="pytest")
    defaults.update(kw)
    return bm.BenchmarkConfig(**defaults)


def test_pair_modes_and_specs():
    subs = [Subject(s, t1w=Path(s), labels=Path(s)) for s in ("S21", "S22", "S23")]
    assert [p.name for p in bm.make_pairs(subs, "consecutive")] == ["S21->S22", "S22->S23", "S23->S21"]
    assert [p.name for p in bm.make_pairs(subs, "onto-first")] == ["S22->S21", "S23->S21"]
    assert len(bm.make_pairs(subs, "all")) == 6
    assert len(bm.make_pairs(subs, "all", n_pairs=2)) == 2
    lookup = {s.id: s for s in subs}
    pairs = bm.parse_pair_specs(["22:21", "S23:S21", "S22:21"], lambda x: lookup[bm.lpba40_label(x)])
    assert [p.name for p in pairs] == ["S22->S21", "S23->S21"]  # a pair asked for twice runs once
    with pytest.raises(bm.BenchmarkInputError, match="MOVING:FIXED"):
        bm.parse_pair_specs(["22"], lambda x: lookup[x])
    assert bm.parse_max_pairs(["demons=2"]) == {"syn-quality": 1, "fireants": 2, "fireants-syn": 2, "demons": 2}
    assert bm.parse_max_pairs(["syn-quality=all"]) == {"syn-quality": None, "fireants": 2, "fireants-syn": 2}
    with pytest.raises(bm.BenchmarkInputError):
        bm.parse_max_pairs(["nonsense=1"])
    names = list(bm.default_variants(7))
    assert names == ["affine", "demons", "lccdemons", "fireants", "fireants-syn", "syn-fast", "hdar", "hdar-fast",
                     "hdar-full", "hdar-refined", "hdar-accurate", "voxelmorph", "voxelmorph-refined", "syn-quality"]
    assert bm.default_variants(7)["hdar-refined"].kwargs == {"refine": 7}


def test_benchmark_api_cache_and_limits(phantom_bids, tmp_path, capsys):
    out = tmp_path / "out"
    absent = str(tmp_path / "absent.pt")  # weights that do not exist: the "not run" path
    result = bm.run_benchmark(_config(phantom_bids, out, hdar_weights=absent), show_progress=False)
    pairs = pd.read_csv(out / "benchmark_pairs.csv")
    summary = pd.read_csv(out / "benchmark_summary.csv").set_index("variant")
    md = (out / "benchmark.md").read_text()
    assert result.paths["figure"] == out / "benchmark_dice_time.png" and result.paths["figure"].stat().st_size > 0
    assert "demons (2)" in (out / "benchmark_dice_time.svg").read_text()
    assert list(pairs.columns) == bm.PAIR_COLUMNS and list(summary.reset_index().columns) == bm.SUMMARY_COLUMNS
    assert len(pairs) == 4 and set(pairs["status"]) == {"ok"}
    assert sorted(pairs["variant"]) == ["affine", "affine", "demons", "demons"]
    assert (pairs["runtime_s"] > 0).all() and (pairs["peak_memory_mb"] > 0).all()
    assert (pairs["n_labels"] == 4).all()
    # numbers are plausible: Demons undoes the deformation that the affine stage cannot
    assert summary.loc["demons", "dice_mean"] > summary.loc["affine", "dice_mean"] + 0.03
    assert summary.loc["demons", "dice_mean"] > pairs["mean_dice_before"].mean()
    assert 0.5 < summary.loc["demons", "target_overlap_mean"] <= 1
    assert summary.loc["demons", "folded_percent_mean"] < 1
    assert summary.loc["demons", "n_pairs"] == 2 and summary.loc["affine", "n_pairs"] == 2
    # no SyN quality: the ratio column is there, NaN, with a note
    assert summary["time_ratio_to_syn_quality"].isna().all()
    assert "syn-quality did not run" in md
    # HDAR without usable weights: a "not run" row and a note, not a crash
    assert summary.loc["hdar-fast", "status"].startswith("not run:")
    assert summary.loc["hdar-fast", "n_pairs"] == 0
    assert "| hdar-fast | 0 | not run:" in md and "hdar-fast not run:" in md
    assert "| demons | 2 |" in md and " ± " in md and "## Machine" in md and "pytest" in md
    assert len(list((out / "rows").glob("*.json"))) == 4
    capsys.readouterr()

    # a second run reuses every cached row: fast, and the same numbers
    start = time.perf_counter()
    again = bm.run_benchmark(_config(phantom_bids, out, hdar_weights=absent), show_progress=False)
    assert time.perf_counter() - start < 10
    assert again.rows["cached"].all()
    cols = ["variant", "moving", "fixed", "mean_dice", "mean_target_overlap", "runtime_s", "folded_percent"]
    pd.testing.assert_frame_equal(again.rows[cols], result.rows[cols])
    assert capsys.readouterr().out.count(": cached") == 4
    assert "for 4 rows (0 from the cache)" in result.markdown and "for 4 rows (4 from the cache)" in again.markdown

    # a changed parameter (the seed) makes the rows stale
    stale = bm.run_benchmark(_config(phantom_bids, out, seed=2, variants=["affine"]), show_progress=False)
    assert not stale.rows["cached"].any()
    assert "stale" in capsys.readouterr().out

    # --max-pairs-per-variant demons=1: Demons on the first pair only, and the table says so
    limited = bm.run_benchmark(_config(phantom_bids, tmp_path / "lim", variants=["demons"],
                                       max_pairs=bm.parse_max_pairs(["demons=1"])), show_progress=False)
    s = limited.summary.set_index("variant")
    assert s.loc["demons", "n_pairs"] == 1 and s.loc["demons", "n_pairs_planned"] == 1
    assert list(limited.rows["moving"]) == ["02"]
    assert "| demons | 1 of 2 |" in limited.markdown
    assert "demons ran on 1 of 2 pairs" in limited.markdown


def test_benchmark_cli(phantom_bids, tmp_path, capsys, monkeypatch):
    raw, labels = phantom_bids
    parser = argparse.ArgumentParser()
    bm.add_benchmark_arguments(parser)
    out = tmp_path / "cli"
    argv = ["--bids-dir", str(raw), "--labels-dir", str(labels), "--pairs", "02:01", "sub-03:01",
            "--variants", "affine", "demons", "hdar-refined", "--refine-steps", "5",
            "--no-affine", "--threads", "1", "-o", str(out), "--no-progress", "--max-pairs-per-variant", "demons=1",
            "--hdar-weights", str(tmp_path / "absent.pt")]
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/hdar", "benchmark", *argv])
    assert bm.run_benchmark_cli(parser.parse_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "| method | pairs | Dice (mean ± sd)" in printed and "| demons | 1 of 2 |" in printed
    summary = pd.read_csv(out / "benchmark_summary.csv").set_index("variant")
    assert summary.loc["affine", "n_pairs"] == 2 and summary.loc["demons", "n_pairs"] == 1
    assert summary.loc["hdar-refined", "status"].startswith("not run")
    assert math.isnan(summary.loc["demons", "time_ratio_to_syn_quality"])
    md = (out / "benchmark.md").read_text()
    assert "hdar benchmark --bids-dir" in md and "absent.pt\n```" in md  # the exact command line
    assert "no affine stage" in md
    # bad input: one clear message, exit status 2
    bad = parser.parse_args(["--bids-dir", str(raw), "--labels-dir", str(labels), "--pairs", "02:09", "-o",
                             str(tmp_path / "bad")])
    assert bm.run_benchmark_cli(bad) == 2
    assert "sub-09" in capsys.readouterr().err


def test_hdar_variants_run_with_given_weights(phantom_bids, tmp_path, torch_one_thread):
    """With weights (an untrained tiny cascade here: the numbers mean nothing), every HDAR variant runs."""
    from hdar_pipeline.hdar.cascade import build_cascade
    from hdar_pipeline.hdar.weights import save_weights

    model = build_cascade("small", levels=2, seed=0, s2_patch=16, s2_input=8, s3_patch=8, s3_input=8, top_k=2,
                          s1_scale=0.5)
    pt, _ = save_weights(model, None, {"data": "none (untrained, for a test)"}, tmp_path / "w" / "tiny.pt")
    result = bm.run_benchmark(_config(phantom_bids, tmp_path / "out", variants=["hdar-fast", "hdar-full", "hdar-refined"],
                                      refine_steps=3, hdar_weights=str(pt), device="cpu"), show_progress=False)
    rows = result.rows
    assert len(rows) == 6 and set(rows["status"]) == {"ok"}, rows[["variant", "error"]]
    assert set(rows["device"]) == {"cpu"}
    params = {v: json.loads(p) for v, p in zip(rows["variant"], rows["parameters"])}
    assert params["hdar-refined"]["refine"] == 3 and params["hdar-fast"]["refine"] == 0
    assert params["hdar-full"]["mode"] == "full" and params["hdar-fast"]["weights"] == str(pt)
    assert (result.summary["n_pairs"] == 2).all()


@pytest.mark.slow
@pytest.mark.realdata
def test_compare_methods_script_on_one_lpba40_pair(lpba40_dir, tmp_path):
    """benchmarks/compare_methods.py on LPBA40's folder layout (no conversion): affine on S22->S21."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("compare_methods", REPO / "benchmarks" / "compare_methods.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "lpba40"
    assert script.main(["--lpba40", str(lpba40_dir), "--pairs", "S22:S21", "--variants", "affine", "hdar-fast",
                        "--threads", "2", "-o", str(out), "--no-progress"]) == 0
    rows = pd.read_csv(out / "benchmark_pairs.csv")
    assert rows.loc[0, "n_labels"] == 56 and rows.loc[0, "affine_stage"] == False  # noqa: E712
    assert 0.5 < rows.loc[0, "mean_dice"] < 0.7
    assert "no affine stage" in (out / "benchmark.md").read_text()


def test_paired_against_compares_each_method_with_hdar_on_the_pairs_both_registered():
    """Differences, ranges, wins, the Wilcoxon p and the time ratio over the common ok pairs only; a failed row,
    a method on fewer pairs and one with no pair in common are handled; the report gets the section."""
    from scipy.stats import wilcoxon

    pairs = [(f"S{i}", f"S{i + 1}") for i in range(21, 27)]
    hdar = [0.70, 0.72, 0.71, 0.69, 0.73, 0.70]
    demons = [0.69, 0.70, 0.72, 0.66, 0.70, 0.69]
    rows = []
    for (m, f), a, b in zip(pairs, hdar, demons):
        rows.append(dict(variant="hdar", moving=m, fixed=f, status="ok", mean_dice=a, runtime_s=7.0))
        rows.append(dict(variant="demons", moving=m, fixed=f, status="ok", mean_dice=b, runtime_s=70.0))
    rows.append(dict(variant="fireants", moving="S21", fixed="S22", status="ok", mean_dice=0.72, runtime_s=350.0))
    rows.append(dict(variant="fireants", moving="S22", fixed="S23", status="failed", mean_dice=float("nan"),
                     runtime_s=float("nan")))
    rows.append(dict(variant="syn-quality", moving="S40", fixed="S41", status="ok", mean_dice=0.7, runtime_s=3000.0))
    paired = bm.paired_against(pd.DataFrame(rows))
    assert list(paired["variant"]) == ["demons", "fireants"]  # syn-quality shares no pair with hdar
    d = paired.set_index("variant")
    diff = [a - b for a, b in zip(hdar, demons)]
    assert d.loc["demons", "n_pairs"] == 6 and d.loc["demons", "reference_higher"] == 5
    assert math.isclose(d.loc["demons", "mean_difference"], sum(diff) / 6)
    assert math.isclose(d.loc["demons", "min_difference"], min(diff))
    assert math.isclose(d.loc["demons", "max_difference"], max(diff))
    assert math.isclose(d.loc["demons", "wilcoxon_p"], wilcoxon(demons, hdar).pvalue)
    assert math.isclose(d.loc["demons", "time_ratio"], 0.1)
    assert d.loc["fireants", "n_pairs"] == 1 and math.isnan(d.loc["fireants", "wilcoxon_p"])
    assert math.isclose(d.loc["fireants", "mean_difference"], 0.70 - 0.72)
    cells = bm.paired_table_rows(paired)
    assert cells[1][6] == "0 of 1" and cells[1][7] == ""
    assert bm.paired_against(pd.DataFrame(rows).query("variant != 'hdar'")).empty
    config = bm.BenchmarkConfig(pairs=[], dataset="x", command="pytest")
    summary = pd.DataFrame(columns=["variant"])
    md = bm.markdown_report(summary, config, [], n_pairs=6, paired=paired)
    assert "## Against hdar, pair by pair" in md and "| demons | 6 |" in md
