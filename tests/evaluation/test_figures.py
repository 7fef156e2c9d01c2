"""Every figure renders with content (PNG pixel variance and file size, a real SVG)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg

from hdar_pipeline.evaluation.figures import (
    plot_jacobian_slices,
    plot_label_boxplots,
    plot_method_boxplot,
    plot_metric_vs_runtime,
    plot_tradeoff,
)
from hdar_pipeline.core.images import Grid


def check_rendered(paths, min_png_bytes=8000):
    png, svg = paths
    assert png.suffix == ".png" and svg.suffix == ".svg"
    assert png.stat().st_size > min_png_bytes
    pixels = mpimg.imread(png)[..., :3]
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 0.05  # not a blank canvas
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # several colours (boxes, text, axes)
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text and svg.stat().st_size > 10000


@pytest.fixture(scope="module")
def tidy_table():
    rng = np.random.default_rng(0)
    rows = []
    for m, base, runtime in (("hdar", 0.75, 4.0), ("syn", 0.70, 35.0), ("demons", 0.72, 28.0)):
        for s in range(6):
            rt = runtime * (1 + 0.1 * rng.standard_normal())
            for lab in range(21, 61):  # 40 labels: two panels of box plots
                rows.append({"subject": f"sub-{s:02d}", "method": m, "label": lab, "name": f"region {lab}",
                             "dice": base + 0.03 * rng.standard_normal(), "runtime_s": rt})
    return pd.DataFrame(rows)


def test_label_boxplots(tmp_path, tidy_table):
    paths = plot_label_boxplots(tidy_table, tmp_path / "labels_dice", metric="dice", methods=["syn", "hdar"])
    check_rendered(paths)


def test_label_boxplots_tolerate_missing_values(tmp_path, tidy_table):
    table = tidy_table.copy()
    table.loc[(table["method"] == "syn") & (table["label"] == 22), "dice"] = np.nan  # a label lost by one method
    check_rendered(plot_label_boxplots(table[table["label"] < 30], tmp_path / "some", metric="dice"))
    with pytest.raises(ValueError, match="no finite"):
        plot_label_boxplots(table.assign(dice=np.nan), tmp_path / "none", metric="dice")


def test_method_boxplot_and_runtime(tmp_path, tidy_table):
    subjects = tidy_table.groupby(["subject", "method"], as_index=False)[["dice", "runtime_s"]].mean()
    check_rendered(plot_method_boxplot(subjects, tmp_path / "methods", metric="dice"))
    check_rendered(plot_metric_vs_runtime(subjects, tmp_path / "runtime.png"))  # suffix is replaced
    assert (tmp_path / "runtime.svg").exists()


def test_tradeoff_labels_every_method_and_skips_rows_without_a_time(tmp_path):
    summary = pd.DataFrame({"variant": ["a", "b", "b-twin", "not-run"], "dice_mean": [0.6, 0.7, 0.7, np.nan],
                            "dice_sd": [0.02, 0.01, np.nan, np.nan], "runtime_s_median": [1.0, 60.0, 60.0, np.nan],
                            "n_pairs": [20, 20, 2, 0]})
    paths = plot_tradeoff(summary, tmp_path / "tradeoff")
    check_rendered(paths)
    svg = paths[1].read_text()
    assert "a (20)" in svg and "b (20)" in svg and "b-twin (2)" in svg and "not-run" not in svg
    with pytest.raises(ValueError, match="positive"):
        plot_tradeoff(summary.iloc[3:], tmp_path / "none")


def test_tradeoff_names_of_crowded_points_do_not_overlap_and_none_is_dropped():
    """Points a few pixels apart (HDAR presets in the benchmark) get names on separate lines."""
    from matplotlib.figure import Figure

    from hdar_pipeline.evaluation.figures import _place_labels

    fig = Figure(figsize=(7.0, 4.8))
    ax = fig.subplots()
    points = [(f"m{k}", f"method-{k} (20)", 5.0 + 0.3 * k, 0.730 - 0.001 * (k % 3)) for k in range(6)]
    points.append(("far", "far (1)", 500.0, 0.60))
    for _, _, x, v in points:
        ax.plot(x, v, "o")
    ax.set_xscale("log")
    fig.tight_layout()
    boxes = _place_labels(ax, points, {p[0]: (0, 0, 0, 1) for p in points})
    assert len(boxes) == len(points) == len(ax.texts)
    assert {t.get_text() for t in ax.texts} == {p[1] for p in points}
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_jacobian_slices(tmp_path):
    shape = (40, 48, 36)
    ii = np.indices(shape).astype(float)
    jac = 1 + 0.4 * np.sin(ii[0] / 5) * np.cos(ii[1] / 7) + 0.2 * np.sin(ii[2] / 4)
    jac[18:21, 22:26, 16:20] = -0.3  # a fold through the centre
    mask = ((ii[0] - 20) ** 2 / 18**2 + (ii[1] - 24) ** 2 / 22**2 + (ii[2] - 18) ** 2 / 16**2) <= 1
    grid = Grid(shape, np.diag([1.0, 1.0, 1.5, 1.0]))
    paths = plot_jacobian_slices(jac, tmp_path / "jac", mask=mask, grid=grid)
    check_rendered(paths)
    pixels = mpimg.imread(paths[0])[..., :3]
    green = (pixels[..., 1] > 0.6) & (pixels[..., 0] < 0.3) & (pixels[..., 2] < 0.3)
    assert green.sum() > 20  # the folded voxels are drawn
    with pytest.raises(ValueError, match="3-D"):
        plot_jacobian_slices(jac[0], tmp_path / "bad")
