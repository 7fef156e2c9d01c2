"""The per-subject HTML QC report and the methods paragraph (hdar_pipeline.reports)."""

from __future__ import annotations

import re
import shutil
import urllib.parse
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import imread

from hdar_pipeline import __version__
from hdar_pipeline.images import Grid, new_image
from hdar_pipeline.reports import ReportEntry, methods_paragraph, write_methods, write_subject_report
from hdar_pipeline.transforms import Transform

SHAPE = (24, 28, 20)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    """An ellipsoid 'brain' with 3 labels, a shifted 'warped subject', a smooth and a folding transform."""
    d = tmp_path / "inputs"
    d.mkdir()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-24.0, -28.0, -20.0]
    grid = Grid(SHAPE, affine)
    ijk = np.indices(SHAPE).astype(np.float64)
    centre = (np.asarray(SHAPE) - 1) / 2
    r = np.sqrt(sum(((ijk[a] - centre[a]) / (0.42 * SHAPE[a])) ** 2 for a in range(3)))
    image = np.where(r < 1, 0.35 + 0.6 * (r < 0.6) + 0.05 * np.cos(ijk[1] / 2), 0.0).astype(np.float32)
    labels = np.zeros(SHAPE, np.int16)
    labels[r < 1] = 1
    labels[r < 0.6] = 2
    labels[(r < 0.6) & (ijk[0] > centre[0])] = 3
    nib.save(new_image(image, grid), d / "atlas.nii.gz")
    nib.save(new_image(labels, grid), d / "atlas_dseg.nii.gz")
    nib.save(new_image(np.roll(image, 1, axis=1), grid), d / "warped.nii.gz")
    smooth = np.zeros((*SHAPE, 3), np.float32)
    smooth[..., 0] = 1.5 * np.sin(ijk[1] / 5)  # a shear: det J = 1 everywhere
    smooth[..., 2] = 0.8 * np.sin(ijk[2] / 4)
    Transform(grid, field=smooth).write_composite(d / "smooth.h5")
    folding = np.zeros((*SHAPE, 3), np.float32)
    bump = np.exp(-((ijk - centre[:, None, None, None]) ** 2).sum(axis=0) / 8.0)
    folding[..., 0] = -6.0 * bump * (ijk[0] - centre[0])  # du/dx < -1 near the centre: folds
    Transform(grid, field=folding).write_composite(d / "folding.h5")
    jac = np.ones(SHAPE, np.float32)
    jac[10:13, 12:14, 9] = -0.5  # 6 folded voxels
    nib.save(new_image(jac, grid), d / "jacobian.nii.gz")
    return {"dir": d, "atlas": d / "atlas.nii.gz", "labels": d / "atlas_dseg.nii.gz", "warped": d / "warped.nii.gz",
            "smooth": d / "smooth.h5", "folding": d / "folding.h5", "jacobian": d / "jacobian.nii.gz",
            "grid": grid}


def _entries(data) -> list[ReportEntry]:
    return [
        ReportEntry("syn", preset="fast", warped=data["warped"], transform=data["smooth"],
                    metrics={"mean_dice": 0.81234567, "mean_hd95_mm": float("nan"), "mean_target_overlap": None},
                    runtime_s=12.345, peak_memory_mb=812.4, device="cpu"),
        ReportEntry("demons", warped=data["warped"], transform=data["folding"], runtime_s=301.0),
        ReportEntry("hdar", status="error", error='weights missing <script>alert("x")</script> & more'),
        ReportEntry("affine", warped=data["warped"], jacobian=data["jacobian"]),
    ]


def _section(page: str, method: str) -> str:
    match = re.search(rf'<section id="method-{method}">(.*?)</section>', page, flags=re.S)
    assert match, f"no section for {method}"
    return match.group(1)


def _folded_from_jacobian(section: str) -> int:
    match = re.search(r"Folded voxels, from the Jacobian map.*?<td[^>]*>([\d,]+) of", section, flags=re.S)
    assert match, "no folded-voxel row"
    return int(match.group(1).replace(",", ""))


def _img_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def _check_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 300
    assert float(pixels[..., :3].std()) > 0.05, f"{path.name} looks blank"
    return pixels


def test_report_lists_every_method_with_figures_and_relative_links(data, tmp_path):
    out = tmp_path / "out" / "sub-01_ses-pre_report.html"
    result = write_subject_report(out, subject="01", session="pre", atlas=data["atlas"], atlas_labels=data["labels"],
                                  entries=_entries(data), atlas_name="MNI152NLin2009aSym")
    assert result == out and out.exists()
    page = out.read_text()
    assert "sub-01" in page and "ses-pre" in page
    assert re.search(r"<title>[^<]*sub-01[^<]*ses-pre", page)

    summary = re.search(r"<h2>Summary</h2>\s*<table>(.*?)</table>", page, flags=re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", summary, flags=re.S)[1:]  # header row first
    assert len(rows) == 4
    for row, title in zip(rows, ["ANTs SyN", "Diffeomorphic Demons", "HDAR", "Affine"]):
        assert title in row
    assert "0.8123" in rows[0] and "12.3 s" in rows[0]
    assert "error" in rows[2]

    fig_dir = tmp_path / "out" / "sub-01" / "figures"
    stem = "sub-01_ses-pre_space-MNI152NLin2009aSym"
    expected = {f"{stem}_desc-syn_contours.png", f"{stem}_desc-syn_jacobian.png",
                f"{stem}_desc-demons_contours.png", f"{stem}_desc-demons_jacobian.png",
                f"{stem}_desc-affine_contours.png", f"{stem}_desc-affine_jacobian.png"}
    assert {p.name for p in fig_dir.glob("*.png")} == expected  # none for the failed method
    for name in expected:
        _check_png(fig_dir / name)

    sources = _img_sources(page)
    assert len(sources) == 6
    for src in sources:
        assert not src.startswith(("/", "file:", "http")), src
        assert (out.parent / urllib.parse.unquote(src)).resolve() == (fig_dir / Path(src).name).resolve()
    assert "http://" not in page and "https://" not in page and "<script" not in page

    # The output folder can be moved: the links still resolve.
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "out"), moved)
    for src in sources:
        assert (moved / urllib.parse.unquote(src)).is_file()


def test_error_entry_is_escaped_and_has_no_figures(data, tmp_path):
    out = tmp_path / "report.html"
    write_subject_report(out, subject="sub-02", atlas=data["atlas"], atlas_labels=data["labels"], entries=_entries(data))
    page = out.read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in page
    hdar = _section(page, "hdar")
    assert 'class="error"' in hdar and "<img" not in hdar
    assert not list((tmp_path / "sub-02" / "figures").glob("*desc-hdar*"))
    # the other methods are still reported in full
    assert "<img" in _section(page, "syn") and "<img" in _section(page, "demons")


def test_folded_voxels_are_counted_from_the_transform_and_the_jacobian_map(data, tmp_path):
    out = tmp_path / "report.html"
    write_subject_report(out, subject="03", atlas=data["atlas"], atlas_labels=data["labels"], entries=_entries(data))
    page = out.read_text()
    expected_demons = int((Transform.read(data["folding"], grid=data["grid"]).jacobian_determinant() <= 0).sum())
    assert expected_demons > 0
    assert _folded_from_jacobian(_section(page, "demons")) == expected_demons
    assert _folded_from_jacobian(_section(page, "syn")) == 0
    assert _folded_from_jacobian(_section(page, "affine")) == 6  # the precomputed map
    # the summary table falls back on the Jacobian when no folded_percent metric is given
    summary = re.search(r"<h2>Summary</h2>\s*<table>(.*?)</table>", page, flags=re.S).group(1)
    demons_row = [r for r in re.findall(r"<tr>(.*?)</tr>", summary, flags=re.S) if "Demons" in r][0]
    folded_cell = re.findall(r'<td class="num">([^<]*)</td>', demons_row)[1]
    assert float(folded_cell) > 0


def test_contours_are_drawn_in_colour_over_the_grey_image(data, tmp_path):
    out = tmp_path / "report.html"
    entries = [ReportEntry("syn", warped=data["warped"], transform=data["smooth"])]
    write_subject_report(out, subject="04", atlas=data["atlas"], atlas_labels=data["labels"], entries=entries)
    with_labels = imread(next((tmp_path / "sub-04" / "figures").glob("*_contours.png")))[..., :3]
    write_subject_report(tmp_path / "plain" / "r.html", subject="04", atlas=data["atlas"], atlas_labels=None,
                         entries=entries)
    plain = _check_png(next((tmp_path / "plain" / "sub-04" / "figures").glob("*_contours.png")))[..., :3]
    # The underlay is grey (R = G = B); the label boundaries are coloured pixels.
    def coloured(pixels):
        return int(((pixels.max(axis=-1) - pixels.min(axis=-1)) > 0.25).sum())
    assert coloured(with_labels) > 500
    assert coloured(plain) > 100  # without labels: the atlas intensity edges
    assert "no label map" in (tmp_path / "plain" / "r.html").read_text()


def test_missing_transform_and_custom_figures_dir(data, tmp_path):
    out = tmp_path / "html" / "report.html"
    figs = tmp_path / "elsewhere" / "figs"
    entries = [ReportEntry("syn", warped=data["warped"]),
               ReportEntry("demons", warped=data["dir"] / "does_not_exist.nii.gz", transform=data["folding"])]
    with pytest.warns(UserWarning, match="contour"):
        write_subject_report(out, subject="05", atlas=data["atlas"], atlas_labels=data["labels"], entries=entries,
                             figures_dir=figs, title_extra="demo <cohort>")
    page = out.read_text()
    assert "no transform" in _section(page, "syn").lower()
    assert "file not found" in _section(page, "demons")
    assert "demo &lt;cohort&gt;" in page
    names = sorted(p.name for p in figs.glob("*.png"))
    assert names == ["sub-05_space-atlas_desc-demons_jacobian.png", "sub-05_space-atlas_desc-syn_contours.png"]
    for src in _img_sources(page):
        assert src.startswith("../elsewhere/figs/")
        assert (out.parent / src).is_file()


# ---------------------------------------------------------------------------- methods paragraph

SYN_QUALITY = dict(syn_metric="CC", syn_sampling=4, reg_iterations=(100, 70, 50, 20), grad_step=0.1, flow_sigma=3.0,
                   total_sigma=0.0)


def test_methods_paragraph_describes_only_what_ran():
    text = methods_paragraph(methods=["syn"], parameters={"syn": {**SYN_QUALITY, "threads": 2}},
                             presets={"syn": "quality"}, atlas_description="LPBA40 subject S01", n_subjects=39,
                             seed=1234, versions={"hdar-pipeline": "9.8.7", "antspyx": "0.6.3", "numpy": "2.0"})
    for absent in ("Demons", "demons", "HDAR", "Vercauteren et al.", "Vercauteren T, Pennec X", "Huang", "Lowekamp", "Fonov", "Tustison et al.", "N4ITK", "N4",
                   "Pydra", "Jarecka", "PyTorch"):
        assert absent not in text, absent
    for present in ("SyN", "Avants et al. 2008", "Avants et al. 2011", "Klein et al. 2009", "radius of 4",
                    "100x70x50x20", "gradient step 0.1", "flow sigma) 3", "total sigma) 0", "`quality`",
                    "threads=2", "1234", "9.8.7", "ANTsPy (antspyx) 0.6.3", "39", "Dice", "target overlap",
                    "Hausdorff 95", "<= 0"):
        assert present in text, present
    refs = text.split("## References", 1)[1]
    assert "Symmetric diffeomorphic image registration" in refs and "12(1):26-41" in refs
    assert "54(3):2033-2044" in refs and "46(3):786-802" in refs
    assert len(re.findall(r"^\d+\. ", refs, flags=re.M)) == 3


def test_methods_paragraph_all_methods_and_preprocessing():
    text = methods_paragraph(
        methods=["demons", "hdar"],
        parameters={"demons": dict(shrink_factors=(4, 2, 1), iterations=(150, 100, 30), smoothing_sigma_vox=1.5,
                                   histogram_matching=True, mystery_knob=7),
                    "hdar": dict(refine=25, device="cuda:0")},
        presets={"hdar": "fast"}, preprocessing={"n4": True, "skull_stripped": "yes"},
        atlas_description="the MNI ICBM152 2009a nonlinear symmetric template", seed=None,
        versions={"hdar-pipeline": __version__, "SimpleITK": "2.5.7", "torch": "2.13.0"},
        weights={"name": "lpba40-v1", "sha256": "ab" * 32,
                 "config": {"cascade": {"levels": 3, "width": "paper", "top_k": 6, "diffeomorphic": True}}},
        engine="pydra")
    for present in ("Diffeomorphic Demons", "Vercauteren et al. 2009", "Lowekamp et al. 2013", "SimpleITK 2.5.7",
                    "150x100x30", "1.5 voxels", "histogram", "mystery_knob=7", "HDAR", "Huang et al. 2021",
                    "PyTorch 2.13.0", "3 cascaded", "`paper`", "K = 6", "25 steps", "diffeomorphic", "lpba40-v1",
                    "ab" * 32, "cuda:0", "N4", "Tustison et al. 2010", "already skull-stripped", "Fonov et al. 2009",
                    "Jarecka et al. 2020", "Pydra: a flexible and lightweight dataflow engine", "SciPy 2020",
                    "Medical Image Analysis*. 2021;67:101817", "45(1 Suppl):S61-S72", "29(6):1310-1320", "7:45",
                    "47(Suppl 1):S102"):
        assert present in text, present
    assert "SyN" not in text.split("## References")[0].replace("coarse SyN", "")
    assert "seeded" not in text  # no seed given: none claimed
    assert "brain was extracted" not in text  # not given: not described


def test_methods_paragraph_never_invents_parameters():
    text = methods_paragraph(methods=["syn"], atlas_description="a study template")
    body = text.split("## References")[0]
    assert "iterations (coarse to fine)" not in body and "gradient step" not in body and "radius" not in body
    assert __version__ in body  # default versions: the installed package


def test_write_methods_writes_markdown_and_html(tmp_path):
    paths = write_methods(tmp_path / "derivatives", methods=["demons"], atlas_description="LPBA40 S01", seed=3,
                          parameters={"demons": {"iterations": (10, 5)}})
    assert [p.name for p in paths] == ["CITATION.md", "CITATION.html"]
    md, page = paths[0].read_text(), paths[1].read_text()
    assert "Vercauteren" in md and "seeded with 3" in md and "10x5" in md
    assert page.startswith("<!DOCTYPE html>") and "<ol>" in page and "<h2>References</h2>" in page
    assert page.count("<li>") == len(re.findall(r"^\d+\. ", md, flags=re.M)) >= 3
    assert "Diffeomorphic demons: efficient non-parametric image registration" in page
    assert "<em>NeuroImage</em>" in page and "<code>" in page
