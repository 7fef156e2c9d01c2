"""The per-subject HTML QC report and the methods paragraph (hdar_pipeline.reports)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import sys
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import imread

from hdar_pipeline import __version__
from hdar_pipeline.core.images import Grid, new_image
from hdar_pipeline.evaluation.metrics import jacobian_statistics
from hdar_pipeline.reports.methods_text import cited_keys, methods_paragraph, references, write_methods
from hdar_pipeline.reports.subject_report import METRIC_LABELS, N_CUTS, ReportEntry, write_subject_report
from hdar_pipeline.core.transforms import Transform

SHAPE = (24, 28, 20)
SVG = "{http://www.w3.org/2000/svg}"
#: A record's metrics, as the evaluation writes them (every key a report must show by name, never raw).
METRICS = {"mean_dice": 0.81234567, "mean_mean_overlap": 0.81234567, "mean_jaccard": 0.7, "mean_hd95_mm": float("nan"),
           "mean_target_overlap": None, "mean_msd_mm": 1.25, "n_labels": 3, "n_labels_evaluated": 3,
           "n_labels_missing": 0, "folded_percent": 0.0, "folded_percent_mask": 0.0, "log_jacobian_std": 0.0123,
           "log_jacobian_std_mask": 0.0456, "jacobian_min": 0.9, "jacobian_max": 1.1, "jacobian_mean": 1.0,
           "n_voxels": 13440, "mask_voxels": 3000}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """An ellipsoid 'brain' with 3 labels, a shifted 'warped subject' and a more shifted 'affine only' one, a smooth
    and a folding transform, a native T1w (another grid) with its brain mask, and a methods text."""
    tmp_path = tmp_path_factory.mktemp("reports")
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
    nib.save(new_image(np.roll(image, 3, axis=1), grid), d / "affine.nii.gz")
    smooth = np.zeros((*SHAPE, 3), np.float32)
    smooth[..., 0] = 1.5 * np.sin(ijk[1] / 5)  # a shear: det J = 1 everywhere
    smooth[..., 2] = 0.8 * np.sin(ijk[2] / 4)
    Transform(grid, field=smooth).write_composite(d / "smooth.h5")
    folding = np.zeros((*SHAPE, 3), np.float32)
    bump = np.exp(-((ijk - centre[:, None, None, None]) ** 2).sum(axis=0) / 8.0)
    folding[..., 0] = -6.0 * bump * (ijk[0] - centre[0])  # du/dx < -1 near the centre: folds
    Transform(grid, field=folding).write_composite(d / "folding.h5")
    jac = np.ones(SHAPE, np.float32)
    jac[10:13, 12:14, 9] = -0.5  # 6 folded voxels, inside the labels
    nib.save(new_image(jac, grid), d / "jacobian.nii.gz")
    native_grid = Grid((30, 30, 26), np.diag([1.5, 1.5, 1.8, 1.0]))
    nijk = np.indices(native_grid.shape).astype(np.float64)
    nr = np.sqrt(sum(((nijk[a] - (native_grid.shape[a] - 1) / 2) / (0.35 * native_grid.shape[a])) ** 2
                     for a in range(3)))
    head = np.where(nr < 1, 0.8, np.where(nr < 1.3, 0.3, 0.0)).astype(np.float32)  # brain and 'skull'
    nib.save(new_image(head, native_grid), d / "t1w.nii.gz")
    nib.save(new_image((nr < 1).astype(np.uint8), native_grid), d / "brain_mask.nii.gz")
    logs = tmp_path / "logs"
    write_methods(logs, methods=["syn", "demons"], atlas_description="a phantom atlas", seed=1)
    return {"dir": d, "atlas": d / "atlas.nii.gz", "labels": d / "atlas_dseg.nii.gz", "warped": d / "warped.nii.gz",
            "affine": d / "affine.nii.gz", "smooth": d / "smooth.h5", "folding": d / "folding.h5",
            "jacobian": d / "jacobian.nii.gz", "t1w": d / "t1w.nii.gz", "mask": d / "brain_mask.nii.gz",
            "methods": logs / "CITATION.md", "grid": grid}


def _entries(data) -> list[ReportEntry]:
    return [
        ReportEntry("syn", preset="fast", warped=data["warped"], affine=data["affine"], transform=data["smooth"],
                    metrics=METRICS, runtime_s=12.345, peak_memory_mb=812.4, device="cpu"),
        ReportEntry("demons", warped=data["warped"], transform=data["folding"], runtime_s=301.0, device="cpu"),
        ReportEntry("hdar", status="error", failed_step="register",
                    error='weights missing <script>alert("x")</script> & more'),
        ReportEntry("affine", warped=data["warped"], jacobian=data["jacobian"]),
    ]


PROVENANCE = {"command": "hdar-pipeline /data/raw /data/out participant --methods syn demons hdar --device auto",
              "options": {"methods": ["syn", "demons", "hdar"], "device": "auto"}, "version": __version__,
              "time": "2026-01-02T03:04:05+0000", "host": "node7"}


def _report(data, out: Path, **kwargs) -> str:
    args = dict(subject="01", session="pre", atlas=data["atlas"], atlas_labels=data["labels"],
                entries=_entries(data), atlas_name="MNI152NLin2009aSym", t1w=data["t1w"], brain_mask=data["mask"],
                provenance=PROVENANCE, methods_file=data["methods"])
    write_subject_report(out, **{**args, **kwargs})
    return out.read_text()


@pytest.fixture(scope="module")
def drawn(data, tmp_path_factory) -> tuple[Path, str]:
    """One report of every kind of entry, drawn once for the tests that read it: (the HTML file, its text)."""
    out = tmp_path_factory.mktemp("drawn") / "out" / "sub-01_ses-pre.html"
    return out, _report(data, out)


def _section(page: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', page, flags=re.S)
    assert match, f"no section {anchor}"
    return match.group(1)


def _objects(page: str) -> list[str]:
    return re.findall(r'<object class="svg-reportlet" type="image/svg\+xml" data="([^"]+)"', page)


def _rows(svg: Path) -> dict[str, list[ET.Element]]:
    """The row groups of a composed reportlet: background (shown) and foreground (alternating on hover)."""
    root = ET.parse(svg).getroot()
    groups = {g.get("class"): list(g) for g in root.iter(f"{SVG}g") if g.get("class") in ("background-svg",
                                                                                           "foreground-svg")}
    if not groups:  # a still (nireports' compose_view without a foreground): the rows in the top group
        groups = {"still": list(root.find(f"{SVG}g"))}
    return groups


def _cuts(row: ET.Element) -> list[str]:
    """The slice positions a row is annotated with (nilearn's ``x=12`` labels)."""
    return [t.text for t in row.iter(f"{SVG}text") if t.text and re.fullmatch(r"[xyz]=-?\d+", t.text.strip())]


def _images(row: ET.Element) -> list[tuple[ET.Element, np.ndarray]]:
    """The images embedded in a row: (the element, its pixels as RGBA floats)."""
    out = []
    for image in row.iter(f"{SVG}image"):
        href = image.get("{http://www.w3.org/1999/xlink}href") or image.get("href") or ""
        pixels = imread(io.BytesIO(base64.b64decode(href.split("base64,", 1)[1])))
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        if pixels.shape[-1] == 3:
            pixels = np.concatenate([pixels, np.ones((*pixels.shape[:2], 1))], axis=-1)
        out.append((image, pixels))
    return out


def _red_pixels(row: ET.Element) -> int:
    """Pixels of the row's embedded images that are red (the atlas boundaries drawn over the grey image)."""
    return sum(int(((p[..., 0] > 0.8) & (p[..., 1] < 0.4) & (p[..., 3] > 0.5)).sum()) for _, p in _images(row))


def test_report_has_svg_reportlets_with_a_flicker_and_several_slices_per_axis(drawn, tmp_path):
    shutil.copytree(drawn[0].parent, tmp_path / "out")
    out, page = tmp_path / "out" / drawn[0].name, drawn[1]
    assert "sub-01" in page and "ses-pre" in page
    assert re.search(r"<title>[^<]*sub-01[^<]*ses-pre", page)

    fig_dir = tmp_path / "out" / "sub-01" / "figures"
    stem = "sub-01_ses-pre_space-MNI152NLin2009aSym"
    expected = {f"{stem}_desc-syn_flicker.svg", f"{stem}_desc-syn_beforeafter.svg", f"{stem}_desc-syn_jacobian.svg",
                f"{stem}_desc-demons_flicker.svg", f"{stem}_desc-demons_jacobian.svg",
                f"{stem}_desc-affine_flicker.svg", f"{stem}_desc-affine_jacobian.svg",
                "sub-01_ses-pre_desc-brain_mask.svg"}
    assert {p.name for p in fig_dir.iterdir()} == expected  # none for the failed method, no PNG
    # the fixed/moving flicker: nireports' two groups of three rows (axial, sagittal, coronal), the foreground
    # alternating with the background while the pointer is over it; several slices in every row
    flicker = fig_dir / f"{stem}_desc-syn_flicker.svg"
    text = flicker.read_text()
    assert "@keyframes flickerAnimation" in text and ".foreground-svg:hover" in text
    groups = _rows(flicker)
    assert set(groups) == {"background-svg", "foreground-svg"}
    for rows in groups.values():
        assert len(rows) == 3
        for row, axis in zip(rows, "zxy"):
            cuts = _cuts(row)
            assert len(cuts) == N_CUTS >= 5 and {c[0] for c in cuts} == {axis}, cuts
            assert len(set(cuts)) >= N_CUTS - 1  # distinct slices (two may round to the same mm)
            assert _red_pixels(row) > 20  # the atlas label boundaries, on the atlas and on the subject
    # the before/after view: the method's warped subject shown, the affine-only one on hover
    before_after = _rows(fig_dir / f"{stem}_desc-syn_beforeafter.svg")
    assert set(before_after) == {"background-svg", "foreground-svg"}
    assert [len(_cuts(r)) for r in before_after["foreground-svg"]] == [N_CUTS] * 3
    assert "subject, affine only" in (fig_dir / f"{stem}_desc-syn_beforeafter.svg").read_text()
    # the brain mask on the native T1w, and the Jacobian map: stills with the same slices per axis
    for still in ("sub-01_ses-pre_desc-brain_mask.svg", f"{stem}_desc-demons_jacobian.svg"):
        groups = _rows(fig_dir / still)
        assert list(groups) == ["still"] and len(groups["still"]) == 3  # three rows, nothing alternating
        assert [len(_cuts(row)) for row in groups["still"]] == [N_CUTS] * 3
    assert "Before / after" in _section(page, "method-syn") and "Before / after" not in _section(page, "method-demons")
    assert "no before/after figure" in _section(page, "method-demons")
    assert "sub-01_ses-pre_desc-brain_mask.svg" in _section(page, "brain-mask")

    # embedded as the NiPreps reports do (an <object>, so that the animation runs), relative links only
    sources = _objects(page)
    assert len(sources) == len(expected)
    for src in sources:
        assert not src.startswith(("/", "file:", "http")), src
        assert (out.parent / urllib.parse.unquote(src)).resolve() == (fig_dir / Path(src).name).resolve()
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<img" not in page
    # The output folder can be moved: the links still resolve.
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "out"), moved)
    for src in sources:
        assert (moved / urllib.parse.unquote(src)).is_file()


def test_rows_show_the_slices_in_ras_at_the_voxels_resolution_and_aspect():
    """A row is one image, a pixel per voxel, drawn without smoothing: the slices side by side on black, in
    nilearn's layout (left on the left in the axial and coronal rows, anterior on the right in the sagittal one,
    superior and anterior up), each the voxel nearest its cut; drawn with the voxels' aspect ratio, its cut
    positions below it and its L/R sides above it."""
    from hdar_pipeline.reports.subject_report import _mosaic

    shape, affine = (20, 24, 16), np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-10.0, -12.0, -16.0]
    data = np.zeros(shape, np.float32)
    data[:5, 19:, 13:] = 1.0  # a block in the left, anterior, superior corner
    edge = np.zeros(shape, np.uint8)
    edge[0, 23, 14] = 1  # one boundary voxel, in the corner of the axial slice k = 14
    edges = {m: nib.Nifti1Image(edge if m == "z" else np.zeros(shape, np.uint8), affine) for m in "xyz"}
    index = {"x": [0, 2, 4, 6, 8, 10, 12], "y": [5, 10, 15, 19, 20, 21, 23], "z": [2, 4, 6, 8, 13, 14, 15]}
    axis = {"x": 0, "y": 1, "z": 2}
    cuts = {m: [float(affine[axis[m], axis[m]] * i + affine[axis[m], 3]) for i in index[m]] for m in "xyz"}
    # per row: (slice height, width), the voxel sizes across and up, the block's rows and columns, the slices
    # holding it
    expect = {"z": ((24, 20), (1.0, 1.0), (slice(0, 5), slice(0, 5)), {4, 5, 6}),
              "x": ((16, 24), (1.0, 2.0), (slice(0, 3), slice(19, 24)), {0, 1, 2}),
              "y": ((16, 20), (1.0, 2.0), (slice(0, 3), slice(0, 5)), {3, 4, 5, 6})}
    rows = _mosaic(nib.Nifti1Image(data, affine), cuts, div_id="test", label="a title", limits=(0.0, 1.0),
                   edges=edges)
    assert len(rows) == 3
    for svg, mode in zip(rows, "zxy"):
        root = ET.fromstring(svg)
        ((element, pixels),) = _images(root)  # one image per row
        (height, width), (across, up), block, holding = expect[mode]
        gap = (pixels.shape[1] - N_CUTS * width) / (N_CUTS - 1)
        assert pixels.shape[0] == height and gap == int(gap) and gap >= 1, (pixels.shape, gap)
        assert "pixelated" in element.get("style", "")
        drawn = float(element.get("width")) / float(element.get("height"))
        assert drawn == pytest.approx(pixels.shape[1] * across / (pixels.shape[0] * up), rel=1e-3)
        white = (pixels[..., :3] > 0.95).all(axis=-1)
        red = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.4)
        step = width + int(gap)
        for t in range(N_CUTS):
            tile, expected = white[:, t * step:t * step + width], np.zeros((height, width), bool)
            if t in holding:
                expected[block] = True
            if mode == "z" and t == 5:  # the boundary voxel, drawn over the image
                expected[0, 0] = False
                assert red[:, t * step:t * step + width].sum() == 1 and red[0, t * step]
            np.testing.assert_array_equal(tile, expected, err_msg=f"{mode} slice {t}")
            assert not pixels[:, t * step + width:(t + 1) * step, :3].any()  # black between the slices
        assert _cuts(root) == [f"{mode}={int(c)}" for c in cuts[mode]]
        texts = [t.text for t in root.iter(f"{SVG}text")]
        assert texts.count("L") == texts.count("R") == (0 if mode == "x" else N_CUTS)
        assert ("a title" in texts) == (mode == "z")  # the title over the first row


def test_jacobian_figure_colours_folds_and_colour_bar(data, drawn):
    """det J in RdBu_r over 1 +- spread (the 99.5th percentile of |det J - 1| in the brain, at least 0.25), folded
    voxels in green, the brain outline in grey, one colour bar (by the axial row) with its range."""
    fig_dir = drawn[0].parent / "sub-01" / "figures"
    rows = _rows(fig_dir / "sub-01_ses-pre_space-MNI152NLin2009aSym_desc-demons_jacobian.svg")["still"]
    assert [len(_images(r)) for r in rows] == [2, 1, 1]  # the colour bar, in the first row only
    brain = np.asarray(nib.load(data["labels"]).dataobj) > 0
    jac = Transform.read(data["folding"], grid=nib.load(data["atlas"])).jacobian_determinant()
    spread = min(max(float(np.percentile(np.abs(jac[brain] - 1), 99.5)), 0.25), 0.999)
    ticks = [t.text for t in rows[0].iter(f"{SVG}text")]
    assert f"{1 - spread:.2g}" in ticks and f"{1 + spread:.2g}" in ticks and "1" in ticks
    slices = np.concatenate([_images(r)[0][1].reshape(-1, 4) for r in rows])  # the slices: each row's first image
    green = (slices[:, 1] > 0.7) & (slices[:, 0] < 0.1) & (slices[:, 2] < 0.1)
    grey = (np.abs(slices[:, :3] - 128 / 255) < 0.01).all(axis=1)
    assert green.sum() > 0 and grey.sum() > 20


def test_summary_and_one_clean_metrics_table_per_method(drawn):
    page = drawn[1]
    summary = re.search(r'<section id="summary"><h2>Summary</h2>\s*<table>(.*?)</table>', page, flags=re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", summary, flags=re.S)[1:]  # header row first
    assert len(rows) == 4
    for row, title in zip(rows, ["ANTs SyN", "Diffeomorphic Demons", "HDAR", "Affine"]):
        assert title in row
    assert "0.8123" in rows[0] and "12.3 s" in rows[0] and "0.0456" in rows[0] and "cpu" in rows[0]
    assert "error" in rows[2] and "register" in rows[2]
    for method in ("syn", "demons", "affine"):
        section = _section(page, f"method-{method}")
        assert section.count('<table class="metrics">') == 1
        names = [n.removesuffix(" \u2020") for n in re.findall(r"<th>([^<]*)</th>", section)]
        assert len(names) == len(set(names)), names  # one row per statistic
        assert names.count("SD of log det J, brain") == 1 and not any("log|J|" in n for n in names)
        assert "Device (as run)" in names
    assert '<table class="metrics">' not in _section(page, "method-hdar")
    syn = _section(page, "method-syn")
    assert "Mean Dice" in syn and "0.8123" in syn and "Mean surface distance" in syn and "1.25 mm" in syn
    assert "Mean Hausdorff distance, 95th percentile" in syn and "3 of 3" in syn
    assert "0.0456" in syn and "0.0123" in syn  # the brain and the whole-grid SD, each once and named apart
    assert "Mean mean overlap" not in syn  # the same statistic as the Dice coefficient: not listed twice
    # no raw keys anywhere on the page
    for key in [*METRICS, *METRIC_LABELS]:
        assert key not in page, key


def test_failed_method_gets_an_error_box_with_its_step_and_no_figures(drawn):
    out, page = drawn
    assert "<script>" not in page
    hdar = _section(page, "method-hdar")
    assert 'class="error"' in hdar and "<object" not in hdar
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in hdar
    assert "at the <strong>register</strong> step" in hdar
    assert not list((out.parent / "sub-01" / "figures").glob("*desc-hdar*"))
    # the other methods are still reported in full
    assert "<object" in _section(page, "method-syn") and "<object" in _section(page, "method-demons")


def test_jacobian_statistics_missing_from_the_record_come_from_the_map_with_the_same_definition(data, drawn):
    page = drawn[1]
    brain = np.asarray(nib.load(data["labels"]).dataobj) > 0  # the evaluation's mask: the atlas labels
    jac = Transform.read(data["folding"], grid=nib.load(data["atlas"])).jacobian_determinant()
    expected = jacobian_statistics(jac, brain)
    assert expected["folded_percent_mask"] > 0
    demons = _section(page, "method-demons")
    folded = int(round(expected["folded_percent_mask"] * brain.sum() / 100))
    assert f"({folded:,} of {int(brain.sum()):,} voxels)" in demons and "\u2020" in demons
    affine = _section(page, "method-affine")  # the precomputed map: 6 folded voxels in the brain
    assert f"(6 of {int(brain.sum()):,} voxels)" in affine
    assert "\u2020" not in _section(page, "method-syn")  # the record's own statistics


def test_provenance_command_line_device_and_methods_text(data, drawn, tmp_path):
    page = drawn[1]
    prov = _section(page, "provenance")
    assert "hdar-pipeline /data/raw /data/out participant --methods syn demons hdar --device auto" in prov
    assert "Device, ANTs SyN (as run)</th><td>cpu" in prov and "node7" in prov and __version__ in prov
    assert "<code>auto</code>" in prov  # the requested device, among the options
    methods = _section(page, "methods")
    assert "Diffeomorphic Demons" in methods and "Vercauteren" in methods
    for name in ("CITATION.md", "CITATION.html", "CITATION.bib"):
        assert f">{name}</a>" in methods
    page = _report(data, tmp_path / "bare.html", provenance=None, methods_file=None,
                   entries=[ReportEntry("demons", status="error", error="x")])
    assert "No command line was recorded" in page and "No methods text was found" in page


def test_without_labels_the_atlas_brain_outline_is_drawn(data, tmp_path):
    out = tmp_path / "plain" / "r.html"
    entries = [ReportEntry("syn", warped=data["warped"], transform=data["smooth"])]
    page = _report(data, out, subject="04", session="", atlas_labels=None, entries=entries)
    assert "no label map" in page
    flicker = next((tmp_path / "plain" / "sub-04" / "figures").glob("*_flicker.svg"))
    for row in _rows(flicker)["background-svg"]:
        assert _red_pixels(row) > 10


def test_missing_inputs_give_warnings_not_failures_and_custom_figures_dir(data, tmp_path):
    out = tmp_path / "html" / "report.html"
    figs = tmp_path / "elsewhere" / "figs"
    entries = [ReportEntry("syn", warped=data["warped"]),
               ReportEntry("demons", warped=data["dir"] / "does_not_exist.nii.gz", transform=data["folding"])]
    with pytest.warns(UserWarning, match="registration figure"):
        write_subject_report(out, subject="05", atlas=data["atlas"], atlas_labels=data["labels"], entries=entries,
                             figures_dir=figs, title_extra="demo <cohort>")
    page = out.read_text()
    assert "no transform" in _section(page, "method-syn").lower()
    assert "file not found" in _section(page, "method-demons")
    assert "demo &lt;cohort&gt;" in page
    names = sorted(p.name for p in figs.glob("*.svg"))
    assert names == ["sub-05_space-atlas_desc-demons_jacobian.svg", "sub-05_space-atlas_desc-syn_flicker.svg"]
    for src in _objects(page):
        assert src.startswith("../elsewhere/figs/")
        assert (out.parent / src).is_file()


def test_drawing_the_report_needs_no_templateflow_no_nipype_and_no_nilearn(data, tmp_path):
    """nireports depends on TemplateFlow, whose downloads fail here, and on nipype (the library never imports a
    workflow engine): drawing a report must import neither; nor nilearn (seconds to import and to plot) nor
    matplotlib's pyplot (global state)."""
    import subprocess

    code = ("import sys; from hdar_pipeline.reports.subject_report import write_subject_report, ReportEntry; "
            f"write_subject_report({str(tmp_path / 'r.html')!r}, subject='01', atlas={str(data['atlas'])!r}, "
            f"atlas_labels={str(data['labels'])!r}, entries=[ReportEntry('syn', warped={str(data['warped'])!r}, "
            f"affine={str(data['affine'])!r}, transform={str(data['folding'])!r})], t1w={str(data['t1w'])!r}, "
            f"brain_mask={str(data['mask'])!r}); "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'templateflow', 'nipype', 'pydra', 'nilearn'}); "
            "bad += [m for m in sys.modules if m.startswith('matplotlib.pyplot')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert len(list((tmp_path / "sub-01" / "figures").glob("*.svg"))) == 4  # every kind of reportlet was drawn


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


def test_write_methods_writes_markdown_html_and_bibtex(tmp_path):
    paths = write_methods(tmp_path / "derivatives", methods=["demons", "hdar"], atlas_description="the MNI template",
                          seed=3, parameters={"demons": {"iterations": (10, 5)}}, preprocessing={"n4": True},
                          engine="pydra")
    assert [p.name for p in paths] == ["CITATION.md", "CITATION.html", "CITATION.bib"]
    md, page, bib = (p.read_text() for p in paths)
    assert "Vercauteren" in md and "seeded with 3" in md and "10x5" in md
    assert page.startswith("<!DOCTYPE html>") and "<ol>" in page and "<h2>References</h2>" in page
    n_refs = len(re.findall(r"^\d+\. ", md, flags=re.M))
    assert page.count("<li>") == n_refs >= 6
    assert "Diffeomorphic demons: efficient non-parametric image registration" in page
    assert "<em>NeuroImage</em>" in page and "<code>" in page
    # one BibTeX entry for every reference the text cites, under the reference's key, with its DOI
    keys = cited_keys(md)
    assert len(keys) == n_refs and set(keys) <= set(references())
    entries = re.findall(r"^@(\w+)\{(\w+),$", bib, flags=re.M)
    assert [k for _, k in entries] == keys
    for key in keys:
        doi = re.search(r"doi:(\S+)$", references()[key].text)
        block = bib.split(f"{{{key},", 1)[1].split("\n}", 1)[0]
        if doi:
            assert f"doi = {{{doi.group(1)}}}" in block, key
        assert re.search(r"^  (title|author|year) = \{.+\}", block, flags=re.M)
    assert bib.count("{") == bib.count("}")


def test_methods_text_names_the_device_used_not_the_requested_auto():
    kwargs = dict(methods=["hdar"], parameters={"hdar": {"refine": 5, "device": "auto"}},
                  atlas_description="a study template", versions={"hdar-pipeline": "1", "torch": "2"})
    used = methods_paragraph(**kwargs, devices={"hdar": ["cpu"]})
    assert "It ran on `cpu`." in used and "`auto`" not in used and "device=" not in used
    both = methods_paragraph(**kwargs, devices={"hdar": ["cuda:0", "cpu"]})
    assert "It ran on `cpu` and `cuda:0`." in both
    planned = methods_paragraph(**kwargs)  # --boilerplate-only: nothing ran yet
    assert "chosen at run time (`auto`" in planned and "Device: `auto`." not in planned
