"""The BIDS App's command-line conventions (issue 15): ``--random-seed``, ``--skull-strip-t1w``, ``--mem-mb``,
``--boilerplate-only``, ``--derivatives`` (sMRIPrep's brain mask and affine reused), and help texts.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

os.environ.setdefault("NO_ET", "1")
pytest.importorskip("pydra")
pytest.importorskip("bids")

from conftest import make_brain_phantom, write_json  # noqa: E402

from hdar_pipeline.apps.bids_app_cli import bids_app_main, build_bids_app_parser  # noqa: E402
from hdar_pipeline.core.images import ImageError, new_image, save_image  # noqa: E402
from hdar_pipeline.core.synthetic import make_subject  # noqa: E402
from hdar_pipeline.apps import bids_app  # noqa: E402

SPACE = "MNI152NLin2009cAsym"


# ----------------------------------------------------------------------------- help texts and parsing


def test_every_option_has_help_and_flags_print_no_boolean_default():
    parser = build_bids_app_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:  # every group's actions are the parser's
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, f"{name} has no help"
        text = formatter._expand_help(action) if action.help else ""
        if action.nargs == 0:  # store_true / store_false / count / help / version
            assert "(default:" not in text, f"{name}: {text}"
    page = parser.format_help()
    assert "(default: True)" not in page and "(default: False)" not in page and "(default: None)" not in page
    for option in ("--random-seed", "--skull-strip-t1w", "--mem-mb", "--boilerplate-only", "--derivatives"):
        assert option in page
    assert "(default: auto)" in page  # real defaults are still shown


@pytest.fixture
def parsed(monkeypatch):
    """Run ``bids_app_main`` up to :func:`bids_app.run` and return the AppOptions it got."""
    seen = []
    monkeypatch.setattr(bids_app, "run", lambda opts, *a, **k: seen.append(opts) or 0)

    def parse(*extra: str) -> bids_app.AppOptions:
        assert bids_app_main(["in", "out", "participant", *extra]) == 0
        return seen[-1]

    return parse


def test_options_reach_app_options(parsed, capsys):
    opts = parsed()
    assert (opts.seed, opts.skull_stripped, opts.mem_mb, opts.boilerplate_only, opts.derivatives) == \
        (None, "auto", None, False, [])
    assert parsed("--random-seed", "7").seed == 7
    assert parsed("--seed", "8").seed == 8  # the old name, same dest
    assert parsed("--skull-strip-t1w", "skip").skull_stripped == "yes"
    assert parsed("--skull-strip-t1w", "force").skull_stripped == "no"
    assert parsed("--skull-strip-t1w", "auto").skull_stripped == "auto"
    capsys.readouterr()
    assert parsed("--skull-stripped", "no").skull_stripped == "no"  # deprecated, still works
    assert "--skull-stripped is deprecated; use --skull-strip-t1w force" in capsys.readouterr().err
    assert parsed("--mem-mb", "6000").mem_mb == 6000
    assert parsed("--boilerplate-only").boilerplate_only is True
    opts = parsed("--derivatives", "a", "b", "--derivatives", "c")
    assert opts.derivatives == [Path("a"), Path("b"), Path("c")]


@pytest.mark.parametrize("argv", [["--mem-mb", "0"], ["--random-seed", "-1"], ["--skull-strip-t1w", "yes"]])
def test_bad_values_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_bids_app_parser().parse_args(["in", "out", "participant", *argv])
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


# ----------------------------------------------------------------------------- --mem-mb


def test_memory_caps_the_parallel_jobs():
    plan = bids_app.plan_jobs(cpus=8, jobs=12)
    assert (plan.nprocs, plan.threads, plan.notes) == (8, 1, [])
    plan = bids_app.plan_jobs(cpus=8, jobs=12, mem_mb=5000, job_mb=2500)
    assert (plan.nprocs, plan.threads) == (2, 4)  # fewer processes, the cores shared among them
    assert "2 process(es) instead of 8" in plan.notes[0]
    plan = bids_app.plan_jobs(cpus=8, jobs=12, nprocs=6, mem_mb=3000, job_mb=1000)
    assert plan.nprocs == 3  # memory overrules --nprocs
    plan = bids_app.plan_jobs(cpus=8, jobs=12, mem_mb=100, job_mb=2500)
    assert plan.nprocs == 1 and "below one job's estimated peak" in plan.notes[0]
    plan = bids_app.plan_jobs(cpus=8, jobs=2, mem_mb=100_000, job_mb=2500)
    assert plan.nprocs == 2 and plan.threads == 4  # enough memory: the job count decides
    assert bids_app.plan_jobs(cpus=8, jobs=12, omp_nthreads=3, mem_mb=5000, job_mb=2500).threads == 3


def test_job_memory_is_estimated_from_the_work_folder(tmp_path):
    assert bids_app.job_memory_estimate(tmp_path / "none") == (bids_app.JOB_MEMORY_MB, pytest.approx(
        bids_app.job_memory_estimate(None)[1]))
    for i, peak in enumerate((600.0, 800.0, None)):
        write_json(tmp_path / f"job{i}" / "register_record.json", {"peak_memory_mb": peak})
    mb, why = bids_app.job_memory_estimate(tmp_path)
    assert mb == pytest.approx(800 * bids_app.MEASURED_HEADROOM) and "2 job(s)" in why


def test_slurm_jobs_get_the_memory_unless_slurm_args_set_it():
    assert bids_app.slurm_sbatch_args("--partition=cpu", 4000) == "--partition=cpu --mem=4000M"
    assert bids_app.slurm_sbatch_args("", 4000) == "--mem=4000M"
    assert bids_app.slurm_sbatch_args("--mem=8G", 4000) == "--mem=8G"
    assert bids_app.slurm_sbatch_args("-p cpu --mem-per-cpu 2G", 4000) == "-p cpu --mem-per-cpu 2G"
    assert bids_app.slurm_sbatch_args("--partition=cpu", None) == "--partition=cpu"


# ----------------------------------------------------------------------------- a phantom dataset with sMRIPrep outputs


def smriprep_composite(path: Path, matrix_lps: np.ndarray, grid_img: nib.Nifti1Image) -> Path:
    """An sMRIPrep-like ``xfm.h5``: an ITK composite of an affine (``matrix_lps``, atlas -> T1w points, applied
    last) and a displacement field (applied first), as antsRegistration writes it."""
    import SimpleITK as sitk

    affine = sitk.AffineTransform(3)
    affine.SetMatrix(matrix_lps[:3, :3].ravel().tolist())
    affine.SetTranslation(matrix_lps[:3, 3].tolist())
    field = np.zeros((*grid_img.shape[::-1], 3))
    field[..., 0] = 1.5  # a nonlinear part that must not be used
    field_img = sitk.GetImageFromArray(field, isVector=True)
    field_img.SetSpacing([float(s) for s in grid_img.header.get_zooms()[:3]])
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    composite.AddTransform(sitk.DisplacementFieldTransform(field_img))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(composite, str(path))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Raw BIDS (sub-01 with one session, sub-02 with two), an atlas, and an sMRIPrep derivatives dataset with
    brain masks (sub-02: per session and subject-level) and a transform to ``SPACE``."""
    root = tmp_path_factory.mktemp("conventions")
    raw, deriv = root / "rawdata", root / "smriprep"
    write_json(raw / "dataset_description.json", {"Name": "conventions", "BIDSVersion": "1.9.0"})
    write_json(deriv / "dataset_description.json", {"Name": "sMRIPrep", "BIDSVersion": "1.9.0",
                                                    "DatasetType": "derivative",
                                                    "GeneratedBy": [{"Name": "sMRIPrep"}]})
    atlas = make_brain_phantom((32, 32, 32), 3.0)
    atlas_img = save_image(atlas.image, root / "atlas" / "atlas_T1w.nii.gz")
    atlas_labels = save_image(atlas.labels, root / "atlas" / "atlas_dseg.nii.gz")
    s = make_subject(atlas.image, atlas.labels, seed=3, magnitude_mm=6.0, smoothness_mm=15.0)
    t1w = save_image(s.image, raw / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    for ses in ("1", "2"):
        save_image(s.image, raw / "sub-02" / f"ses-{ses}" / "anat" / f"sub-02_ses-{ses}_T1w.nii.gz")
    # a mask that brain extraction would not find: the subject's brain grown by one voxel, with a flat cut
    mask = ndimage.binary_dilation(np.asarray(s.labels.dataobj) > 0)
    mask[:, :, :6] = False
    mask_file = save_image(new_image(mask.astype(np.uint8), s.image),
                           deriv / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz")
    matrix = np.eye(4)
    matrix[:3, 3] = (2.0, -1.0, 1.5)  # atlas -> T1w points, LPS mm
    xfm = smriprep_composite(deriv / "sub-01" / "anat" / f"sub-01_from-T1w_to-{SPACE}_mode-image_xfm.h5",
                             matrix, s.image)
    # sub-02: a session mask, a subject-level mask, another acquisition's mask (never used)
    for name in ("sub-02/ses-1/anat/sub-02_ses-1_desc-brain_mask.nii.gz", "sub-02/anat/sub-02_desc-brain_mask.nii.gz",
                 "sub-02/ses-2/anat/sub-02_ses-2_acq-other_desc-brain_mask.nii.gz"):
        save_image(new_image(mask.astype(np.uint8), s.image), deriv / name)
    return {"root": root, "raw": raw, "deriv": deriv, "atlas": atlas_img, "atlas_labels": atlas_labels,
            "t1w": t1w, "mask": mask_file, "mask_array": mask, "xfm": xfm, "matrix": matrix}


def test_find_anat_derivatives_handles_sessions_spaces_and_entities(dataset):
    from hdar_pipeline.bids_io.anat_derivatives import derivative_layouts, find_anat_derivatives

    layouts = derivative_layouts([dataset["deriv"]])
    found = find_anat_derivatives(layouts, "01", t1w=dataset["t1w"], space=SPACE)
    assert (found.brain_mask, found.xfm) == (dataset["mask"], dataset["xfm"])
    assert find_anat_derivatives(layouts, "01", t1w=dataset["t1w"], space="other").xfm is None
    raw = dataset["raw"] / "sub-02"
    ses1 = find_anat_derivatives(layouts, "02", "1", t1w=raw / "ses-1/anat/sub-02_ses-1_T1w.nii.gz", space=SPACE)
    assert ses1.brain_mask.name == "sub-02_ses-1_desc-brain_mask.nii.gz"
    ses2 = find_anat_derivatives(layouts, "02", "2", t1w=raw / "ses-2/anat/sub-02_ses-2_T1w.nii.gz", space=SPACE)
    assert ses2.brain_mask.name == "sub-02_desc-brain_mask.nii.gz"  # subject-level; acq-other is another image
    assert find_anat_derivatives(layouts, "03", t1w=None, space=SPACE).brain_mask is None


def test_linear_part_is_the_composites_affine(dataset):
    from hdar_pipeline.bids_io.anat_derivatives import linear_part

    assert np.allclose(linear_part(dataset["xfm"]), dataset["matrix"])
    with pytest.raises(ImageError, match="sub-01_desc-brain_mask.nii.gz: cannot be read as an ITK transform"):
        linear_part(dataset["mask"])


def test_a_mask_on_another_grid_is_refused_naming_the_file(dataset, tmp_path):
    from hdar_pipeline.pipeline.subject_steps import preprocess_files

    img = nib.load(str(dataset["t1w"]))
    other = save_image(new_image(np.ones((16, 16, 16), np.uint8), nib.Nifti1Image(np.zeros((16, 16, 16)),
                                                                                    img.affine)),
                       tmp_path / "sub-01_desc-brain_mask.nii.gz")
    with pytest.raises(ImageError, match=f"{other}: brain mask is not on the grid of the T1w"):
        preprocess_files(dataset["t1w"], dataset["atlas"], tmp_path / "prep", brain_mask=other, n4=False, seed=1)
    assert not (tmp_path / "prep").exists()


def app(dataset, out: Path, work: Path, *extra: str) -> list[str]:
    return [str(dataset["raw"]), str(out), "participant", "--participant-label", "01", "--atlas",
            str(dataset["atlas"]), "--atlas-labels", str(dataset["atlas_labels"]), "--atlas-space", SPACE,
            "--methods", "demons", "--work-dir", str(work), "--nprocs", "1", "--omp-nthreads", "1",
            "--random-seed", "1", "--no-progress", "--skip-bids-validation", *extra]


def test_derivatives_replace_brain_extraction_and_the_affine(dataset, tmp_path):
    """--skull-strip-t1w force would run brain extraction: with sMRIPrep's mask it does not, the mask written
    is the given one, the affine is the composite's linear part, and the records and methods text say so."""
    from hdar_pipeline.core.transforms import Transform

    out, work = tmp_path / "out", tmp_path / "work"
    code = bids_app_main(app(dataset, out, work, "--derivatives", str(dataset["deriv"]), "--skull-strip-t1w",
                             "force", "--no-n4"))
    assert code == 0
    (record_file,) = list((work / "pydra").glob("*/preprocess_record.json"))
    record = json.loads(record_file.read_text())
    assert record["status"] == "ok"
    assert record["reused_derivatives"] == {"brain_mask": str(dataset["mask"]), "anat_xfm": str(dataset["xfm"])}
    steps = " | ".join(record["preprocess_steps"])
    assert f"the given brain mask {dataset['mask']}" in steps and str(dataset["xfm"]) in steps
    assert "brain extraction: MNI" not in steps and "registered (affine + SyN" not in steps
    assert "affine registration to the atlas" not in steps
    prep = json.loads(Path(record["preprocess_json"]).read_text())
    native_mask = np.asarray(nib.load(prep["native_mask"]).dataobj) > 0
    assert np.array_equal(native_mask, dataset["mask_array"])
    native_brain = np.asarray(nib.load(prep["native_brain"]).dataobj)
    assert np.array_equal(native_brain != 0, dataset["mask_array"])
    to_atlas = Transform.read(prep["to_atlas_files"], grid=nib.load(str(dataset["atlas"])))
    assert np.allclose(to_atlas.matrix, dataset["matrix"], atol=1e-5)
    # the report: the brain mask on the T1w as given, and the affine-only image before the deformable one
    report = (out / "sub-01.html").read_text()
    figures = {p.name for p in (out / "sub-01" / "figures").iterdir()}
    assert "sub-01_desc-brain_mask.svg" in figures and "sub-01_desc-brain_mask.svg" in report
    assert any(name.endswith("_beforeafter.svg") for name in figures) and "Before / after" in report
    methods = (out / "logs" / "CITATION.md").read_text()
    assert "For every image, no brain extraction was run" in methods
    assert f"sMRIPrep's spatial normalisation to `{SPACE}`" in methods
    assert "antsBrainExtraction" not in methods


def test_the_given_mask_wins_over_the_skull_strip_setting(dataset):
    """On the library: with a mask, ``skull_stripped=False`` (force) runs no brain extraction and the mask is the
    given one; without it, the same (skull-stripped) T1w keeps its own non-zero voxels, another mask."""
    from hdar_pipeline.pipeline.preprocess import prepare_brain

    with_mask = prepare_brain(dataset["t1w"], skull_stripped=False, n4=False, brain_mask=dataset["mask"])
    assert not any("registered (affine + SyN" in s for s in with_mask.steps)
    assert with_mask.brain_mask_source == str(dataset["mask"])
    stripped = prepare_brain(dataset["t1w"], skull_stripped=True, n4=False)
    assert any("brain extraction: skipped (input is skull-stripped" in s for s in stripped.steps)
    assert not np.array_equal(np.asarray(stripped.native_mask.dataobj) > 0, dataset["mask_array"])


# ----------------------------------------------------------------------------- --boilerplate-only


def test_boilerplate_only_writes_the_methods_text_and_nothing_else(dataset, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    code = bids_app_main(app(dataset, out, work, "--boilerplate-only", "--derivatives", str(dataset["deriv"]),
                             "--skull-strip-t1w", "skip", "--methods", "syn", "demons"))
    assert code == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["logs", "logs/CITATION.bib",
                                                                       "logs/CITATION.html", "logs/CITATION.md"]
    assert not work.exists()
    text = (out / "logs" / "CITATION.md").read_text()
    assert "ANTs SyN" in text and "Demons" in text and "atlas_T1w.nii.gz" in text
    assert "already skull-stripped" in text
    assert "Where an sMRIPrep/fMRIPrep derivatives dataset held one" in text
    assert "CITATION.md" in capsys.readouterr().out


def test_boilerplate_only_prepares_no_atlas(dataset, tmp_path):
    """With the embedded template (normally written into the work folder) and an atlas participant (normally
    preprocessed there), nothing is written but the methods text."""
    raw = dataset["raw"]
    for extra in ([], ["--atlas-participant", "01"]):
        out, work = tmp_path / f"out{len(extra)}", tmp_path / f"work{len(extra)}"
        code = bids_app_main([str(raw), str(out), "participant", "--work-dir", str(work), "--boilerplate-only",
                              "--skip-bids-validation", "--methods", "demons", *extra])
        assert code == 0 and not work.exists()
        assert {p.name for p in out.rglob("*")} == {"logs", "CITATION.md", "CITATION.html", "CITATION.bib"}
        text = (out / "logs" / "CITATION.md").read_text()
        assert ("MNI ICBM152" in text) if not extra else ("participant sub-01" in text)


def test_a_derivatives_folder_that_is_not_a_dataset_is_refused_up_front(dataset, tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    for folder, needle in ((tmp_path / "plain", "no dataset_description.json"), (tmp_path / "absent", "not found")):
        code = bids_app_main(app(dataset, tmp_path / "out", tmp_path / "work", "--derivatives", str(folder)))
        err = capsys.readouterr().err
        assert code == 2 and "--derivatives" in err and needle in err, err
    assert not (tmp_path / "work").exists()
