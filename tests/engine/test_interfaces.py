"""Nipype interfaces (hdar_pipeline.engine.nipype_interfaces) in a tiny Nipype workflow, and the example script."""

from __future__ import annotations

import importlib.util
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("NO_ET", "1")  # no telemetry look-ups

pytest.importorskip("nipype")

from conftest import REPO, mean_dice, write_phantom_cohort  # noqa: E402
from nipype import Node, Workflow  # noqa: E402

from hdar_pipeline.core.images import Grid  # noqa: E402
from hdar_pipeline.engine.nipype_interfaces import ApplyTransform, Evaluate, Register  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_phantom_cohort(tmp_path_factory.mktemp("nipype_phantom"), 2)


def test_interfaces_in_a_nipype_workflow(tmp_path, data):
    wf = Workflow(name="tiny", base_dir=str(tmp_path))
    register = Node(Register(method="syn", seed=1, num_threads=1, use_gpu=False), name="register")
    register.inputs.fixed_image = str(data["atlas"])
    register.inputs.moving_image = str(data["t1w"][0])
    register.inputs.moving_labels = str(data["labels"][0])
    warp = Node(ApplyTransform(interpolation="nearest", reference_image=str(data["atlas"]),
                               input_image=str(data["labels"][0])), name="warp_labels")
    evaluate = Node(Evaluate(reference_labels=str(data["atlas_labels"]), subject="01", method="syn"),
                    name="evaluate")
    wf.connect([(register, warp, [("composite_transform", "transforms")]),
                (warp, evaluate, [("output_image", "labels")]),
                (register, evaluate, [("composite_transform", "transforms")])])
    wf.config["execution"]["remove_unnecessary_outputs"] = False
    graph = wf.run()
    nodes = {n.name: n for n in graph.nodes()}

    reg = nodes["register"].result.outputs
    assert reg.composite_transform.endswith("transform.h5") and os.path.exists(reg.record)
    assert reg.runtime_s > 0 and all(os.path.exists(p) for p in reg.transforms)
    assert Grid.of(nib.load(reg.warped_image)).same_as(Grid.of(nib.load(data["atlas"])))
    # ApplyTransform with the composite transform reproduces Register's own label warp.
    warped = np.asarray(nib.load(nodes["warp_labels"].result.outputs.output_image).dataobj)
    assert np.array_equal(warped, np.asarray(nib.load(reg.warped_labels).dataobj))

    ev = nodes["evaluate"].result.outputs
    table = pd.read_csv(ev.labels_csv, dtype={"subject": str})
    assert sorted(table["label"]) == [1, 2, 3, 4] and set(table["subject"]) == {"01"}
    ref = np.asarray(nib.load(data["atlas_labels"]).dataobj)
    assert ev.mean_dice == pytest.approx(mean_dice(ref, warped)) and os.path.exists(ev.jacobian_csv)


def test_register_interface_has_a_use_gpu_switch():
    spec = Register().inputs
    assert spec.use_gpu is False  # CPU unless asked
    assert "GPU" in Register.input_spec().traits()["use_gpu"].desc


def test_apply_transform_linear_output_name(tmp_path, data):
    from hdar_pipeline.core.transforms import Transform

    xfm = Transform.identity(nib.load(data["atlas"])).write_composite(tmp_path / "identity.h5")
    node = Node(ApplyTransform(reference_image=str(data["atlas"]), input_image=str(data["t1w"][0]),
                               transforms=[str(xfm)]), name="apply", base_dir=str(tmp_path))
    out = node.run().outputs.output_image
    assert out.endswith("warped.nii.gz")
    original = np.asarray(nib.load(data["t1w"][0]).dataobj)
    assert np.allclose(np.asarray(nib.load(out).dataobj), original, atol=1e-4)


def test_example_nipype_workflow_runs_on_command_line_files(tmp_path, data, capsys):
    spec = importlib.util.spec_from_file_location("nipype_workflow_example", REPO / "examples" / "nipype_workflow.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--atlas", str(data["atlas"]), "--atlas-labels", str(data["atlas_labels"]),
            "--t1w", *map(str, data["t1w"]), "--labels", *map(str, data["labels"]),
            "--method", "affine", "--threads", "1", "--seed", "1", "--out", str(tmp_path / "out")]
    assert example.main(argv) == 0
    printed = capsys.readouterr().out
    assert "01: mean Dice" in printed and "02: mean Dice" in printed
    for sub in ("01", "02"):
        folder = tmp_path / "out" / "results" / sub
        for name in ("warped.nii.gz", "transform.h5", "warped_labels.nii.gz", "evaluation.csv",
                     "evaluation_summary.csv", "registration.json"):
            assert (folder / name).exists(), folder / name
