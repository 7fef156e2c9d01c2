"""The scripts in examples/: each one's main() on a tiny phantom cohort, so none of them rots.

The cohort: a 32^3 phantom atlas at 3 mm with labels (conftest.make_brain_phantom) and four subjects
made from it by known smooth diffeomorphisms (hdar_pipeline.core.synthetic.make_subject). The cheapest
methods run (affine, Demons), on one thread.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("NO_ET", "1")  # no telemetry look-ups (Pydra, Nipype)
os.environ.setdefault("MPLBACKEND", "Agg")

from conftest import REPO, mean_dice, write_phantom_cohort  # noqa: E402


EXAMPLES = REPO / "examples"


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Atlas image and labels, four subjects (T1w + labels), all on the atlas grid (32^3, 3 mm)."""
    return write_phantom_cohort(tmp_path_factory.mktemp("examples_cohort"), 4)


def labels_of(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj).astype(np.int64)


NAMES = ["register_pair", "pydra_cohort", "nipype_workflow", "train_hdar", "convert_and_benchmark"]


@pytest.mark.parametrize("name", NAMES)
def test_every_example_has_a_command_line_docstring_and_main(name):
    module = load_example(name)
    assert f"python examples/{name}.py" in module.__doc__
    assert callable(module.main)
    with pytest.raises(SystemExit) as exc:  # argparse: --help exits 0
        module.main(["--help"])
    assert exc.value.code == 0
    assert name in (EXAMPLES / "README.md").read_text()


@pytest.mark.parametrize("name", NAMES)
def test_every_example_refuses_a_negative_thread_count(name, capsys):
    """Counts are checked when parsed: a negative --threads is one argparse line, not a libgomp message later."""
    module = load_example(name)
    with pytest.raises(SystemExit) as exc:
        module.main(["--threads", "-2"])
    assert exc.value.code == 2
    assert "--threads" in capsys.readouterr().err


def test_register_pair(tmp_path, cohort, capsys):
    example = load_example("register_pair")
    out = tmp_path / "pair"
    rc = example.main([str(cohort["atlas"]), str(cohort["t1w"][0]), "-o", str(out), "--method", "demons",
                       "--moving-labels", str(cohort["labels"][0]), "--fixed-labels", str(cohort["atlas_labels"]),
                       "--threads", "1", "--seed", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "transform_warp.nii.gz", "transform_affine.mat",
                 "transform.h5", "registration.json", "evaluation.csv", "evaluation_summary.csv",
                 "evaluation_jacobian.csv", "ants_agreement.json"):
        assert (out / name).is_file(), name
        assert f"wrote {out / name}" in printed

    # the evaluation: Demons recovers the known deformation well, and better than no registration
    ref = labels_of(cohort["atlas_labels"])
    after = mean_dice(ref, labels_of(out / "warped_labels.nii.gz"))
    before = mean_dice(ref, labels_of(cohort["labels"][0]))
    assert after > 0.8 and after > before, (before, after)
    summary = pd.read_csv(out / "evaluation_summary.csv").iloc[0]
    assert summary["mean_dice"] == pytest.approx(after)
    assert f"mean Dice {after:.3f}" in printed
    assert len(pd.read_csv(out / "evaluation.csv")) == 4  # one row per label

    # ants.apply_transforms with the written transforms reproduces our warp
    agreement = json.loads((out / "ants_agreement.json").read_text())
    # measured: one background voxel at the field of view's edge (0.011 of the range) of 32^3
    assert agreement["image_fraction_differing"] <= 1e-4 and agreement["image_max_abs_diff_relative"] < 0.05
    assert sorted(agreement["label_dice"]) == ["1", "2", "3", "4"]
    assert min(agreement["label_dice"].values()) >= 0.99


def test_register_pair_without_labels_only_registers(tmp_path, cohort, capsys):
    example = load_example("register_pair")
    out = tmp_path / "affine"
    assert example.main([str(cohort["atlas"]), str(cohort["t1w"][1]), "-o", str(out), "--method", "affine",
                         "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "mean Dice" not in printed and not (out / "evaluation.csv").exists()
    agreement = json.loads((out / "ants_agreement.json").read_text())
    assert "label_dice" not in agreement and agreement["image_max_abs_diff_relative"] < 1e-3
    record = json.loads((out / "registration.json").read_text())
    assert record["method"] == "affine" and record["transforms"] == ["transform_affine.mat"]


def test_pydra_cohort(tmp_path, cohort, capsys):
    example = load_example("pydra_cohort")
    bad = tmp_path / "sub-03_T1w.nii.gz"
    bad.write_bytes(b"\x1f\x8b truncated gzip, not an image")
    out = tmp_path / "cohort"
    common = ["--atlas", str(cohort["atlas"]), "--atlas-labels", str(cohort["atlas_labels"]),
              "--methods", "affine", "demons", "-o", str(out), "--threads", "1", "--seed", "1"]
    # a corrupt subject fails alone: a row with status=error, exit status 1
    rc = example.main([*common, "--t1w", str(cohort["t1w"][0]), str(cohort["t1w"][1]), str(bad),
                       "--labels", str(cohort["labels"][0]), str(cohort["labels"][1]), str(cohort["labels"][2])])
    assert rc == 1
    printed = capsys.readouterr().out
    group = pd.read_csv(out / "group.tsv", sep="\t").assign(subject=lambda g: g["participant_id"].str[4:])
    assert sorted(zip(group["subject"], group["method"])) == [
        ("01", "affine"), ("01", "demons"), ("02", "affine"), ("02", "demons"), ("03", "affine"), ("03", "demons")]
    failed = group[group["subject"] == "03"]
    assert (failed["status"] == "error").all()
    assert "sub-03 affine failed" in printed and "sub-03 demons failed" in printed
    assert (out / "cache").is_dir() and (out / "group_labels.tsv").is_file()

    ok = group[group["status"] == "ok"].set_index(["subject", "method"])
    for sub in ("01", "02"):
        before = mean_dice(labels_of(cohort["atlas_labels"]), labels_of(cohort["labels"][int(sub) - 1]))
        assert ok.loc[(sub, "demons"), "mean_dice"] > max(0.8, before)
    for method in ("affine", "demons"):
        m = re.search(rf"^{method}: mean Dice ([0-9.]+) over 2 subject", printed, re.M)
        assert m, printed
        assert float(m.group(1)) == pytest.approx(ok.xs(method, level="method")["mean_dice"].mean(), abs=5e-4)

    # the good subjects alone: exit status 0, and Pydra's cache answers
    rc = example.main([*common, "--t1w", str(cohort["t1w"][0]), str(cohort["t1w"][1]),
                       "--labels", str(cohort["labels"][0]), str(cohort["labels"][1])])
    assert rc == 0
    again = pd.read_csv(out / "group.tsv", sep="\t").assign(subject=lambda g: g["participant_id"].str[4:])
    assert len(again) == 4 and (again["status"] == "ok").all()
    pd.testing.assert_series_equal(again.set_index(["subject", "method"])["runtime_s"],
                                   ok["runtime_s"].sort_index(), check_names=False)  # cached: same run


def test_nipype_workflow(tmp_path, cohort, capsys):
    pytest.importorskip("nipype")
    example = load_example("nipype_workflow")
    assert "hdar demo -o demo" in example.__doc__ and "demo/rawdata/" in example.__doc__
    out = tmp_path / "nipype"
    rc = example.main(["--atlas", str(cohort["atlas"]), "--atlas-labels", str(cohort["atlas_labels"]),
                       "--t1w", str(cohort["t1w"][0]), "--labels", str(cohort["labels"][0]),
                       "--method", "demons", "--threads", "1", "--seed", "1", "--out", str(out)])
    assert rc == 0
    folder = out / "results" / "01"
    summary = pd.read_csv(folder / "evaluation_summary.csv", dtype={"subject": str}).iloc[0]
    ref = labels_of(cohort["atlas_labels"])
    assert summary["mean_dice"] == pytest.approx(mean_dice(ref, labels_of(folder / "warped_labels.nii.gz")))
    assert summary["mean_dice"] > 0.8
    assert f"01: mean Dice {summary['mean_dice']:.3f}" in capsys.readouterr().out


@pytest.mark.usefixtures("torch_one_thread")
def test_train_hdar(tmp_path, cohort, capsys):
    example = load_example("train_hdar")
    out = tmp_path / "run"
    rc = example.main(["--images", *map(str, cohort["t1w"]), "--labels", *map(str, cohort["labels"]),
                       "-o", str(out), "--width", "small", "--steps", "2", "--s2-patch", "16", "--s3-patch", "8",
                       "--top-k", "2", "--name", "tiny", "--threads", "1", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    # 2 steps x 3 stages, logged; checkpoint and the exported weights with their model card
    log = pd.read_csv(out / "train_log.csv")
    assert list(log["stage"]) == [1, 1, 2, 2, 3, 3]
    assert log["val_dice"].notna().any()  # two of the four subjects held out for validation
    assert (out / "checkpoints" / "last.pt").is_file()
    card = json.loads((out / "tiny.json").read_text())
    assert card["steps"] == 6 and card["completed"] and card["name"] == "tiny"
    assert set(card["data"]["val_subjects"]).isdisjoint(card["data"]["train_subjects"])
    assert f"wrote {out / 'tiny.pt'}" in printed

    # the exported weights loaded by HDARMethod registered a held-out pair
    pair = out / "example_pair"
    for name in ("transform_warp.nii.gz", "warped.nii.gz", "warped_labels.nii.gz"):
        assert (pair / name).is_file(), name
    assert "with HDAR on cpu" in printed
    m = re.search(r"mean Dice ([0-9.]+) before, ([0-9.]+) after", printed)
    assert m and 0 < float(m.group(2)) <= 1
    from hdar_pipeline.methods.hdar_method import HDARMethod

    method = HDARMethod(weights=out / "tiny.pt", device="cpu", threads=1)
    transform = method.register(nib.load(str(cohort["t1w"][0])), nib.load(str(cohort["t1w"][1])))
    assert transform.grid.shape == (32, 32, 32)


def test_convert_and_benchmark(tmp_path, cohort, capsys):
    example = load_example("convert_and_benchmark")
    # a folder layout of three subjects: the atlas first (so "onto-first" pairs are subject -> atlas)
    src = tmp_path / "mine"
    images = [cohort["atlas"], cohort["t1w"][0], cohort["t1w"][1]]
    labels = [cohort["atlas_labels"], cohort["labels"][0], cohort["labels"][1]]
    for i, (img, lab) in enumerate(zip(images, labels), start=1):
        (src / "img").mkdir(parents=True, exist_ok=True)
        (src / "seg").mkdir(parents=True, exist_ok=True)
        (src / "img" / f"case{i}_T1.nii.gz").write_bytes(img.read_bytes())
        (src / "seg" / f"case{i}_seg.nii.gz").write_bytes(lab.read_bytes())
    dest, bench = tmp_path / "mine-bids", tmp_path / "bench"
    rc = example.main([str(src), str(dest), "--preset", "folder", "--images", "img/*_T1.nii.gz",
                       "--labels", "seg/*_seg.nii.gz", "-o", str(bench), "--variants", "affine", "demons",
                       "--pairs-from", "onto-first", "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out

    # the BIDS dataset and its labels derivatives
    for sub in ("01", "02", "03"):
        assert (dest / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz").is_file()
        dseg = dest / "derivatives" / "labels" / f"sub-{sub}" / "anat" / f"sub-{sub}_dseg.nii.gz"
        assert np.array_equal(labels_of(dseg), labels_of(labels[int(sub) - 1]))
    assert (dest / "participants.tsv").read_text().count("sub-0") == 3

    # the benchmark: both variants on both pairs; Demons improves on the unregistered overlap
    summary = pd.read_csv(bench / "benchmark_summary.csv").set_index("variant")
    assert list(summary.index) == ["affine", "demons"]
    assert (summary["n_pairs"] == 2).all() and (summary["status"] == "ok").all()
    assert summary.loc["demons", "dice_mean"] > max(0.8, summary.loc["demons", "dice_before_mean"])
    pairs = pd.read_csv(bench / "benchmark_pairs.csv", dtype={"moving": str, "fixed": str})
    assert sorted(zip(pairs["variant"], pairs["moving"], pairs["fixed"])) == [
        ("affine", "02", "01"), ("affine", "03", "01"), ("demons", "02", "01"), ("demons", "03", "01")]
    assert "| demons | 2 |" in printed and (bench / "benchmark.md").read_text() in printed


@pytest.mark.slow
def test_nipype_workflow_docstring_command_on_the_demo_layout(tmp_path, capsys):
    """The docstring's command line, run as written on what ``hdar demo -o demo`` writes (its dataset part)."""
    pytest.importorskip("nipype")
    import glob
    import shlex

    from hdar_pipeline.apps.demo_dataset import write_demo_dataset

    example = load_example("nipype_workflow")
    demo = tmp_path / "demo"
    write_demo_dataset(demo, n_subjects=3)
    doc = example.__doc__
    block = doc[doc.index("take one subject as the atlas::"):].split("::", 1)[1]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:2] == ["python", "examples/nipype_workflow.py"]
    argv = []
    for w in words[2:]:
        if w.startswith("demo/"):
            argv += sorted(glob.glob(str(tmp_path / w))) or [str(tmp_path / w)]
        elif w == "nipype-out":
            argv.append(str(tmp_path / "nipype-out"))
        else:
            argv.append(w)
    assert example.main([*argv, "--threads", "1", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "02: mean Dice" in printed and "03: mean Dice" in printed
    for sub in ("02", "03"):
        assert (tmp_path / "nipype-out" / "results" / sub / "evaluation_summary.csv").is_file()
