"""`hdar register` end to end on a small phantom: outputs, registration.json, ANTs re-application, errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from hdar_pipeline.apps.cli import main
from hdar_pipeline.core.images import save_image
from hdar_pipeline.core.synthetic import make_subject

from test_synthetic import ball_phantom


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    image, labels = ball_phantom()
    subject = make_subject(image, labels, seed=1, magnitude_mm=8.0)
    paths = {
        "fixed": save_image(image, folder / "fixed.nii.gz"),
        "moving": save_image(subject.image, folder / "moving.nii.gz"),
        "labels": save_image(subject.labels, folder / "moving_dseg.nii.gz"),
        "fixed_labels": save_image(labels, folder / "fixed_dseg.nii.gz"),
    }
    return paths


def dice(a, b):
    labs = np.unique(a[a > 0])
    return np.array([2 * ((a == l) & (b == l)).sum() / ((a == l).sum() + (b == l).sum()) for l in labs])


# The deformable recovery is checked without the affine stage: the ball is symmetric about its slab's axis, so an
# affine fit to its non-affine deformation is ill-posed and lands by the seed (mean Dice 0.75-0.86 against 0.85
# before any registration). The affine stage runs for "affine" and for "hdar" (two transform files).
@pytest.mark.parametrize("method, extra", [("demons", ["--no-affine"]), ("affine", []),
                                           ("syn", ["--preset", "fast", "--no-affine"]), ("hdar", ["--device", "cpu"]),
                                           ("lccdemons", ["--no-affine", "--device", "cpu"]),
                                           pytest.param("fireants", ["--no-affine", "--device", "cpu"],
                                                        marks=pytest.mark.fireants)])
def test_register_writes_everything_and_ants_reapplies_it(tmp_path, pair, method, extra):
    import ants

    if method == "fireants":
        pytest.importorskip("fireants", reason="FireANTs is not installed (the fireants extra)")

    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in pair.values()}
    rc = main(["register", str(pair["fixed"]), str(pair["moving"]), "-o", str(out), "--method", method,
               "--moving-labels", str(pair["labels"]), "--seed", "1", "--threads", "1",
               "--inverse", "--fixed-labels", str(pair["fixed_labels"]), *extra])
    assert rc == 0
    record = json.loads((out / "registration.json").read_text())
    for key in ("method", "preset", "runtime_s", "peak_memory_mb", "device", "seed", "versions", "transforms"):
        assert key in record
    assert record["method"] == method and record["seed"] == 1
    assert record["runtime_s"] > 0 and record["peak_memory_mb"] > 0
    assert record["versions"]["antspyx"] != "not installed"
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "transform.h5", *record["transforms"]):
        assert (out / name).exists(), name
    ours = np.asarray(nib.load(str(out / "warped_labels.nii.gz")).dataobj)
    fixed = ants.image_read(str(pair["fixed"]))
    moving_labels = ants.image_read(str(pair["labels"]))
    theirs = ants.apply_transforms(fixed, moving_labels, transformlist=[str(out / t) for t in record["transforms"]],
                                   interpolator="nearestNeighbor").numpy()
    assert dice(ours, np.rint(theirs).astype(int)).min() >= 0.99
    # the single-file composite as well (what the BIDS App ships as xfm.h5)
    composite = ants.apply_transforms(fixed, moving_labels, transformlist=[str(out / "transform.h5")],
                                      interpolator="nearestNeighbor").numpy()
    assert dice(ours, np.rint(composite).astype(int)).min() >= 0.99
    # the inverse (moving grid, moving -> fixed points) brings the fixed labels onto the moving image as antspyx does
    native = np.asarray(nib.load(str(out / "fixed_labels_native.nii.gz")).dataobj)
    theirs = ants.apply_transforms(ants.image_read(str(pair["moving"])), ants.image_read(str(pair["fixed_labels"])),
                                   transformlist=[str(out / "inverse.h5")], interpolator="nearestNeighbor").numpy()
    assert (np.rint(theirs).astype(int) == native).mean() > 0.999
    assert record["inverse"]["consistency_mm"]["voxels"] > 0
    # Nothing was written next to the inputs, and they are unchanged.
    assert all(p.read_bytes() == before[p] for p in pair.values())
    assert sorted(p.name for p in pair["fixed"].parent.iterdir()) == sorted(p.name for p in pair.values())
    if method in ("demons", "syn", "lccdemons", "fireants"):  # recover the deformation without folding
        reference = np.asarray(nib.load(str(pair["fixed_labels"])).dataobj)
        moving = np.asarray(nib.load(str(pair["labels"])).dataobj)
        assert dice(reference, ours).mean() > dice(reference, moving).mean() + 0.03
        # and the inverse undoes it: the fixed labels on the moving grid overlap the moving labels
        assert dice(moving, native).mean() > dice(moving, reference).mean() + 0.03
        assert record["inverse"]["consistency_mm"]["mean_mm"] < 0.5
        assert record["jacobian"]["folded_percent_mask"] == record["jacobian"]["folded_percent_grid"] == 0.0
        assert record["jacobian"]["mask_voxels"] < record["jacobian"]["grid_voxels"]


def test_register_bad_input_is_one_clear_error(tmp_path, pair, capsys):
    bad = tmp_path / "nan.nii.gz"
    data = np.asarray(nib.load(str(pair["moving"])).dataobj).copy()
    data[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(data, nib.load(str(pair["moving"])).affine), str(bad))
    rc = main(["register", str(pair["fixed"]), str(bad), "-o", str(tmp_path / "o"), "--method", "demons"])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "NaN" in err
    assert not (tmp_path / "o" / "registration.json").exists()
    rc = main(["register", str(pair["fixed"]), str(pair["moving"]), "-o", str(tmp_path / "o2"),
               "--moving-labels", str(tmp_path / "missing.nii.gz")])
    assert rc == 2 and "missing.nii.gz: file not found" in capsys.readouterr().err


def test_register_labels_on_another_grid(tmp_path, pair, capsys):
    lab = nib.load(str(pair["labels"]))
    other = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj)[:-2], lab.affine), str(other))
    rc = main(["register", str(pair["fixed"]), str(pair["moving"]), "-o", str(tmp_path / "o"),
               "--moving-labels", str(other), "--method", "demons"])
    assert rc == 2 and "does not match" in capsys.readouterr().err


def _console(*argv: str, preload_torch: bool = False):
    """The ``hdar`` console entry point (:func:`hdar_pipeline.apps.cli.console_main`) in a fresh process."""
    import subprocess
    import sys

    code = ("import sys\n" + ("import torch\n" if preload_torch else "")
            + "from hdar_pipeline.apps.cli import console_main\nsys.argv = ['hdar', *sys.argv[1:]]\nconsole_main()\n")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600)


def test_the_hdar_command_ends_without_teardown_and_loses_nothing(tmp_path, pair):
    """With torch loaded the command skips the interpreter's teardown (os._exit): its exit code, its last output
    lines and every file must still be there, complete."""
    from hdar_pipeline.core.transforms import Transform

    out = tmp_path / "out"
    done = _console("register", str(pair["fixed"]), str(pair["moving"]), "-o", str(out), "--method", "hdar",
                    "--device", "cpu", "--no-affine", "--moving-labels", str(pair["labels"]), "--seed", "1")
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "registration.json").read_text())
    assert "registration.json" in done.stdout + done.stderr  # the closing line was flushed
    assert record["versions"]["torch"] != "not installed"
    assert Transform.read([out / t for t in record["transforms"]]).field is not None
    assert Transform.read(out / "transform.h5").field is not None
    for name in ("warped.nii.gz", "warped_labels.nii.gz"):
        assert np.asarray(nib.load(str(out / name)).dataobj).any(), name
    # a refusal after torch was loaded keeps its exit code and its message
    bad = _console("register", str(tmp_path / "missing.nii.gz"), str(pair["moving"]), "-o", str(tmp_path / "x"),
                   preload_torch=True)
    assert bad.returncode == 2 and "missing.nii.gz" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
