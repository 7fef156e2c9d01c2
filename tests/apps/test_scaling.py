"""benchmarks/scaling.py on tiny sizes: both parts, the tables, the plot, the cache, HDAR with the shipped
weights and without any."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("NO_ET", "1")  # Pydra: no telemetry look-ups
os.environ.setdefault("MPLBACKEND", "Agg")

pytest.importorskip("pydra")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scaling.py"
SIZES = (24, 32)
VARIANTS = ("affine", "demons", "hdar-fast")
COHORT_SIZES = (1, 2)
WORKERS = (1, 2)

# The tests that use the smoke run: about 1.5 min on a busy 2-core machine (a dozen registration processes).
slow = pytest.mark.slow


def load_script():
    spec = importlib.util.spec_from_file_location("scaling_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def argv(out: Path) -> list[str]:
    return ["--sizes", *map(str, SIZES), "--variants", *VARIANTS, "--cohort-sizes", *map(str, COHORT_SIZES),
            "--workers", *map(str, WORKERS), "--cohort-size-voxels", "24", "--threads", "2", "--seed", "3",
            "-o", str(out)]


@pytest.fixture(scope="module")
def scaling_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    script = load_script()
    start = time.perf_counter()
    rc = script.main(argv(out))
    return script, out, rc, time.perf_counter() - start


@slow
def test_size_table_has_a_row_per_size_and_variant(scaling_run):
    _, out, rc, _ = scaling_run
    assert rc == 0
    rows = pd.read_csv(out / "scaling_size.csv")
    for col in ("size", "voxels", "spacing_mm", "variant", "status", "runtime_s", "peak_memory_mb", "peak_added_mb",
                "rss_before_mb", "max_rss_mb", "threads", "seed", "load_avg_1min"):
        assert col in rows.columns, col
    assert sorted(zip(rows["variant"], rows["size"])) == sorted((v, s) for v in VARIANTS for s in SIZES)
    assert (rows["voxels"] == rows["size"] ** 3).all()
    ran = rows  # affine, Demons and HDAR with the shipped weights
    assert (ran["status"] == "ok").all(), ran["status"].tolist()
    assert (ran["runtime_s"] > 0).all()
    assert (ran["peak_memory_mb"] > 0).all() and (ran["max_rss_mb"] >= ran["peak_memory_mb"] - 1).all()
    assert (ran["rss_before_mb"] > 0).all() and (ran["peak_added_mb"] >= 0).all()
    # the grid covers the brain: isotropic voxels of (largest extent) / N, so 24^3 voxels are 4/3 of 32^3 ones
    spacing = ran.groupby("size")["spacing_mm"].first()
    assert spacing[24] == pytest.approx(spacing[32] * 32 / 24)
    assert 4 < spacing[32] < 8


@slow
def test_peak_memory_is_per_process_not_the_parent_high_water_mark(scaling_run):
    """Each registration ran in its own process: its high-water mark is its own (a fresh interpreter with
    the registration libraries), not one value carried over from the parent."""
    _, out, _, _ = scaling_run
    rows = pd.read_csv(out / "scaling_size.csv")
    ran = rows[rows["status"] == "ok"]
    assert ((ran["max_rss_mb"] > 100) & (ran["max_rss_mb"] < 3000)).all()
    assert ran["max_rss_mb"].nunique() > 1  # not one shared value


@slow
def test_hdar_without_weights_is_reported_as_not_run(tmp_path, monkeypatch):
    from hdar_pipeline.hdar import weights as W

    empty = tmp_path / "no-weights"
    empty.mkdir()
    monkeypatch.setattr(W, "WEIGHTS_DIR", empty)  # the variant is built in this process: no weights here
    out = tmp_path / "out"
    assert load_script().main(["--sizes", "24", "--variants", "hdar-fast", "--skip-cohort", "--threads", "1",
                               "-o", str(out)]) == 0
    rows = pd.read_csv(out / "scaling_size.csv")
    hdar = rows[rows["variant"] == "hdar-fast"]
    assert len(hdar) == 1
    assert hdar["status"].str.startswith("not run: ").all()
    assert hdar["status"].str.contains("weights").all()
    assert hdar["runtime_s"].isna().all()
    assert "| hdar-fast | 24^3 |" in (out / "scaling.md").read_text()
    assert not list((out / "rows").glob("*hdar*"))  # not cached: weights may arrive later


@slow
def test_cohort_table_has_a_row_per_cohort_size_and_workers(scaling_run):
    _, out, _, _ = scaling_run
    rows = pd.read_csv(out / "scaling_cohort.csv")
    for col in ("cohort_size", "workers", "threads_per_job", "method", "size", "status", "wall_s",
                "registration_s_sum", "n_failed"):
        assert col in rows.columns, col
    assert sorted(zip(rows["cohort_size"], rows["workers"])) == sorted((n, k) for n in COHORT_SIZES for k in WORKERS)
    assert (rows["status"] == "ok").all(), rows["status"].tolist()
    assert (rows["wall_s"] > 0).all() and (rows["registration_s_sum"] > 0).all()
    assert (rows["n_failed"] == 0).all() and (rows["method"] == "demons").all()
    assert dict(zip(rows["workers"], rows["threads_per_job"])) == {1: 2, 2: 1}  # cores shared among workers
    assert not [p for p in (out / "work").glob("pydra-*")]  # the per-run Pydra caches are removed


@slow
def test_markdown_has_both_tables_and_the_machine(scaling_run, capsys):
    _, out, _, _ = scaling_run
    md = (out / "scaling.md").read_text()
    assert "## Time and peak memory against volume size" in md and "## Cohort wall time against cohort size" in md
    assert "| variant | size |" in md and "| subjects | workers |" in md
    assert md.count("| demons | ") == len(SIZES)
    assert "CPU:" in md and "load average" in md and "versions:" in md
    assert "--cohort-size-voxels 24" in md  # the exact command


@slow
def test_plot_is_written_and_not_blank(scaling_run):
    _, out, _, _ = scaling_run
    png = out / "scaling.png"
    assert png.stat().st_size > 10_000
    import matplotlib.image as mpimg

    pixels = mpimg.imread(png)
    assert pixels.ndim == 3 and pixels.shape[1] > 2 * pixels.shape[0]  # three panels side by side
    assert np.std(pixels[..., :3]) > 0.05


@slow
def test_rerun_uses_the_cache(scaling_run, capsys):
    script, out, _, first = scaling_run
    before_size = pd.read_csv(out / "scaling_size.csv")
    before_cohort = pd.read_csv(out / "scaling_cohort.csv")
    capsys.readouterr()
    start = time.perf_counter()
    assert script.main(argv(out)) == 0
    second = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert printed.count(": cached") == len(VARIANTS) * len(SIZES) + len(COHORT_SIZES) * len(WORKERS)
    assert "| subjects | workers |" in printed  # the tables are printed at the end
    assert second < max(20.0, first / 3), (first, second)
    after_size = pd.read_csv(out / "scaling_size.csv")
    after_cohort = pd.read_csv(out / "scaling_cohort.csv")
    assert after_size["cached"].fillna(False).astype(bool).sum() == len(VARIANTS) * len(SIZES)
    cols = [c for c in before_size.columns if c != "cached"]
    pd.testing.assert_frame_equal(before_size[cols], after_size[cols])
    cols = [c for c in before_cohort.columns if c != "cached"]
    pd.testing.assert_frame_equal(before_cohort[cols], after_cohort[cols])


@slow
def test_a_changed_parameter_makes_the_cached_row_stale(scaling_run, capsys):
    script, out, _, _ = scaling_run
    capsys.readouterr()
    # the affine 24^3 row with another seed: not the cached one (a new pair, a new measurement)
    assert script.main(["--sizes", "24", "--variants", "affine", "--skip-cohort", "--seed", "4", "--no-plot",
                        "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    stale = [line for line in printed.splitlines() if "cached row is stale (changed:" in line]
    assert len(stale) == 1 and "seed" in stale[0] and "affine 24^3" in stale[0]
    rows = pd.read_csv(out / "scaling_size.csv")
    assert len(rows) == 1 and rows["seed"].iloc[0] == 4 and rows["status"].iloc[0] == "ok"


def test_options_are_checked():
    script = load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--sizes", "0"])
    with pytest.raises(SystemExit):
        script.parse_args(["--variants", "nonsense"])
    args = script.parse_args([])
    assert args.sizes == [64, 96, 128, 160, 192] and args.workers == [1, 2] and args.cohort_sizes == [1, 2, 4, 8]
    assert args.variants == ["affine", "demons", "syn-fast", "hdar-fast"] and args.threads == 2
