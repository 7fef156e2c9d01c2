"""The methods paragraph ("boilerplate") of a run, with its references.

:func:`methods_paragraph` turns what actually ran (methods, their parameters, preprocessing, seed,
versions, weights, the devices used) into a Markdown paragraph with a reference list, for users to paste into a
manuscript; :func:`write_methods` writes it as ``CITATION.md``, ``CITATION.html`` and ``CITATION.bib`` (BibTeX
entries of the references cited). Only what is given is described: a parameter that is not passed in is not
mentioned, never guessed.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from hdar_pipeline._version import __version__
from hdar_pipeline.methods.registry import method_spec, method_specs, specs_by_name
from hdar_pipeline.methods.text import (ALWAYS_SKIPPED, AVANTS2011, Citer, Reference, SentenceContext, join,
                                        value_text, version_suffix)

PathLike = str | os.PathLike

__all__ = ["bibtex", "cited_keys", "method_title", "methods_paragraph", "references", "write_methods"]


def method_title(method: str) -> str:
    """The name a text or a report gives ``method`` (its key when it has none)."""
    spec = specs_by_name().get(method.lower())
    return spec.title if spec is not None else method


#: The works the text cites besides the methods' own (:attr:`~hdar_pipeline.methods.registry.MethodSpec.references`):
#: ANTs, N4, the evaluation's measures, Pydra and the MNI template.
PIPELINE_REFERENCES: tuple[Reference, ...] = (
    AVANTS2011,
    Reference(
        "tustison2010",
        "Tustison NJ, Avants BB, Cook PA, Zheng Y, Egan A, Yushkevich PA, Gee JC. N4ITK: improved N3 "
        "bias correction. *IEEE Transactions on Medical Imaging*. 2010;29(6):1310-1320. "
        "doi:10.1109/TMI.2010.2046908",
        "Tustison et al. 2010", "article", {
            "author": "Tustison, N. J. and Avants, B. B. and Cook, P. A. and Zheng, Y. and Egan, A. and "
                      "Yushkevich, P. A. and Gee, J. C.",
            "title": "{N4ITK}: improved {N3} bias correction",
            "journal": "IEEE Transactions on Medical Imaging", "year": "2010", "volume": "29", "number": "6",
            "pages": "1310--1320", "doi": "10.1109/TMI.2010.2046908"}),
    Reference(
        "klein2009",
        "Klein A, Andersson J, Ardekani BA, Ashburner J, Avants B, Chiang MC, Christensen GE, Collins DL, "
        "Gee J, Hellier P, Song JH, Jenkinson M, Lepage C, Rueckert D, Thompson P, Vercauteren T, Woods RP, "
        "Mann JJ, Parsey RV. Evaluation of 14 nonlinear deformation algorithms applied to human brain MRI "
        "registration. *NeuroImage*. 2009;46(3):786-802. doi:10.1016/j.neuroimage.2008.12.037",
        "Klein et al. 2009", "article", {
            "author": "Klein, A. and Andersson, J. and Ardekani, B. A. and Ashburner, J. and Avants, B. and "
                      "Chiang, M.-C. and Christensen, G. E. and Collins, D. L. and Gee, J. and Hellier, P. and "
                      "Song, J. H. and Jenkinson, M. and Lepage, C. and Rueckert, D. and Thompson, P. and "
                      "Vercauteren, T. and Woods, R. P. and Mann, J. J. and Parsey, R. V.",
            "title": "Evaluation of 14 nonlinear deformation algorithms applied to human brain {MRI} registration",
            "journal": "NeuroImage", "year": "2009", "volume": "46", "number": "3", "pages": "786--802",
            "doi": "10.1016/j.neuroimage.2008.12.037"}),
    Reference(
        "jarecka2020",
        "Jarecka D, Goncalves M, Markiewicz CJ, Esteban O, Lo N, Kaczmarzyk J, Ghosh S. Pydra: a "
        "flexible and lightweight dataflow engine for scientific analyses. In: *Proceedings of the 19th "
        "Python in Science Conference (SciPy 2020)*. 2020",
        "Jarecka et al. 2020", "inproceedings", {
            "author": "Jarecka, D. and Goncalves, M. and Markiewicz, C. J. and Esteban, O. and Lo, N. and "
                      "Kaczmarzyk, J. and Ghosh, S.",
            "title": "{Pydra}: a flexible and lightweight dataflow engine for scientific analyses",
            "booktitle": "Proceedings of the 19th Python in Science Conference ({SciPy} 2020)", "year": "2020"}),
    Reference(
        "fonov2009",
        "Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average "
        "age-appropriate brain templates from birth to adulthood. *NeuroImage*. 2009;47(Suppl 1):S102. "
        "doi:10.1016/S1053-8119(09)70884-5",
        "Fonov et al. 2009", "article", {
            "author": "Fonov, V. S. and Evans, A. C. and McKinstry, R. C. and Almli, C. R. and Collins, D. L.",
            "title": "Unbiased nonlinear average age-appropriate brain templates from birth to adulthood",
            "journal": "NeuroImage", "year": "2009", "volume": "47", "number": "Suppl 1", "pages": "S102",
            "doi": "10.1016/S1053-8119(09)70884-5"}),
)


def references() -> dict[str, Reference]:
    """Every reference the text may cite, by key: the registered methods' own and :data:`PIPELINE_REFERENCES`.

    Raises
    ------
    ValueError
        Two different references share a key.
    """
    out: dict[str, Reference] = {}
    for ref in [r for spec in method_specs() for r in spec.references] + list(PIPELINE_REFERENCES):
        if out.setdefault(ref.key, ref) != ref:
            raise ValueError(f"two different references have the key {ref.key!r}")
    return out


#: Package names in :func:`provenance.library_versions` and how the text names them.
_LIBRARY_NAMES = {"python": "Python", "antspyx": "ANTsPy (antspyx)", "SimpleITK": "SimpleITK", "nibabel": "NiBabel",
                  "numpy": "NumPy", "scipy": "SciPy", "torch": "PyTorch", "pydra": "Pydra", "fireants": "FireANTs"}


def _inverse_text(methods: Sequence[str]) -> str:
    """How each method's inverse was obtained (its spec's ``inverse``): its own (SyN's inverse warp, LCC-Demons'
    negated velocity), the affine's exact inverse, or the displacement field inverted by Newton's method
    (:mod:`hdar_pipeline.core.inverse`; also for a method the registry does not know)."""
    specs = specs_by_name()
    own = [s.inverse for s in method_specs() if s.name in methods and s.inverse not in ("numerical", "exact")]
    numerical = [m for m in methods if (specs[m].inverse if m in specs else "numerical") == "numerical"]
    parts = list(own)
    if numerical:
        parts.append(("for the other methods " if own else "") + "the displacement field inverted by Newton's method")
    return join(parts) if parts else "the affine inverted exactly"


def _describe_generic(method: str, params: Mapping[str, Any], preset: str) -> str:
    text = f"The `{method}` method was run"
    text += f" with preset `{preset}`" if preset else ""
    rest = [f"`{k}={value_text(v)}`" for k, v in params.items() if k not in ALWAYS_SKIPPED and v is not None]
    return text + (f" ({', '.join(rest)})." if rest else ".")


def methods_paragraph(
    *,
    methods: Sequence[str],
    parameters: Mapping[str, Mapping] | None = None,
    presets: Mapping[str, str] | None = None,
    preprocessing: Mapping | None = None,
    atlas_description: str,
    n_subjects: int | None = None,
    seed: int | None = None,
    versions: Mapping[str, str] | None = None,
    weights: Mapping | None = None,
    engine: str | None = None,
    devices: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The methods section of a manuscript, in Markdown, generated from what actually ran.

    Parameters
    ----------
    methods : sequence of str
        The methods that ran: registered ones (:mod:`hdar_pipeline.methods.registry`) in their own sentence
        (:attr:`~hdar_pipeline.methods.registry.MethodSpec.describe`), other names generically. Only these are
        described and cited.
    parameters : mapping, optional
        Per method, the parameters it ran with (e.g. ``SyNMethod(...).parameters``). Known keys are written
        out in words, unknown ones as ``key=value``; missing ones are not mentioned.
    presets : mapping, optional
        Per method, the preset name.
    preprocessing : mapping, optional
        Any of ``n4`` (bool), ``brain_extraction`` (str, e.g. ``"atlas-based"``), ``skull_stripped``
        (``"auto"``, ``"yes"``, ``"no"``), ``affine`` (bool: an affine stage before the deformable methods);
        other keys are listed as ``key=value``.
    atlas_description : str
        What the atlas is (e.g. ``"the MNI ICBM152 2009a nonlinear symmetric template"``); the MNI template
        paper is cited when it mentions MNI.
    n_subjects : int, optional
        Number of subjects registered.
    seed : int, optional
        The random seed.
    versions : mapping, optional
        Package versions; default :func:`~hdar_pipeline.core.provenance.library_versions` plus ``hdar-pipeline``.
    weights : mapping, optional
        HDAR weights description: ``name``, ``sha256`` and optionally ``data`` and ``config`` (a model card).
    engine : str, optional
        ``"pydra"`` when a Pydra workflow ran the registrations (then Pydra is cited). A ``pydra`` entry in
        ``versions`` has the same effect.
    devices : mapping, optional
        Per method, the devices its registrations ran on, as their records say (``"cpu"``, ``"cuda:0"``). The
        text reports these, not the requested ``device`` parameter (``"auto"`` is a request, not a device).

    Returns
    -------
    str
        Markdown: a ``# Methods`` heading, paragraphs, and a ``## References`` numbered list.
    """
    if versions is None:
        from hdar_pipeline.core.provenance import library_versions

        versions = {**library_versions(), "hdar-pipeline": __version__}
    versions = dict(versions)
    versions.setdefault("hdar-pipeline", __version__)
    parameters = parameters or {}
    presets = presets or {}
    prep = dict(preprocessing or {})
    cite = Citer(references())
    methods = [str(m) for m in methods]
    lower = [m.lower() for m in methods]
    uses_pydra = (engine or "").lower() == "pydra" or version_suffix(versions, "pydra") != ""

    paragraphs: list[str] = []
    # ------------------------------------------------------------------ overview
    who = (f"{n_subjects} T1-weighted (T1w) image{'s' if n_subjects != 1 else ''}" if n_subjects is not None
           else "The T1-weighted (T1w) images")
    atlas_cite = " " + cite("fonov2009") if "mni" in atlas_description.lower() else ""
    specs = specs_by_name()
    names = [specs[m.lower()].title if m.lower() in specs else f"`{m}`" for m in methods]
    intro = (f"{who[0].upper() + who[1:]} {'were' if n_subjects != 1 else 'was'} registered to "
             f"{atlas_description}{atlas_cite} with hdar-pipeline {versions['hdar-pipeline']}")
    intro += (", a Python package" + (f" (Python {versions['python']})" if versions.get("python") else "")
              + f", using {join(names)}." if names else ".")
    if uses_pydra:
        intro += (f" The processing was organised as a workflow in Pydra{version_suffix(versions, 'pydra')} "
                  + cite("jarecka2020") + ".")
    paragraphs.append(intro)

    # ------------------------------------------------------------------ preprocessing
    pre: list[str] = []
    used_prep = set()
    if "n4" in prep and prep["n4"] is not None:
        used_prep.add("n4")
        pre.append("Intensity non-uniformity was corrected with N4 (`N4BiasFieldCorrection` through ANTsPy"
                   + f"{version_suffix(versions, 'antspyx')}; " + cite.inner("tustison2010", "avants2011") + ")."
                   if prep["n4"] else "No intensity non-uniformity correction was applied.")
    if prep.get("skull_stripped") is not None:
        used_prep.add("skull_stripped")
        s = str(prep["skull_stripped"]).lower()
        if s == "auto":
            pre.append("Whether each input image was already skull-stripped was detected automatically (a zeroed "
                       "background and a brain-sized foreground); skull-stripped inputs kept their non-zero voxels "
                       "as the brain mask.")
        elif s in ("yes", "true", "1"):
            pre.append("The input images were already skull-stripped, and no brain extraction was run.")
        elif s in ("no", "false", "0"):
            pre.append("The input images were treated as whole-head images.")
        else:
            pre.append(f"Skull-stripped input: `{prep['skull_stripped']}`.")
    if prep.get("brain_extraction"):
        used_prep.add("brain_extraction")
        be = str(prep["brain_extraction"])
        if be.lower() in ("atlas-based", "atlas", "template", "template-based"):
            mni = "" if "fonov2009" in cite.keys else " " + cite("fonov2009")
            pre.append("The brain was extracted with an atlas-based procedure in the manner of "
                       "`antsBrainExtraction.sh`: the brain mask of the MNI ICBM152 2009a template" + mni
                       + " was carried onto each image through an ANTs registration (rigid, affine and a "
                       "coarse SyN stage; " + cite.inner("avants2011") + ") and refined with tissue intensities and morphology.")
        else:
            pre.append(f"The brain was extracted with {be}.")
    reuse = dict(prep.get("reused_derivatives") or {})
    if reuse:  # sMRIPrep/fMRIPrep derivatives (the BIDS App's --derivatives)
        used_prep.add("reused_derivatives")
        of, space = reuse.get("of"), reuse.get("space") or "the atlas space"

        def which(n: int | None) -> str:
            if n is None or of is None:
                return "Where an sMRIPrep/fMRIPrep derivatives dataset held one for an image"
            return "For every image" if n >= of else f"For {n} of the {of} images"

        if reuse.get("brain_mask") is None or reuse["brain_mask"] > 0:
            pre.append(f"{which(reuse.get('brain_mask'))}, no brain extraction was run: the brain mask computed by "
                       "sMRIPrep/fMRIPrep (`desc-brain_mask`, in native T1w space) was applied to the "
                       + ("N4-corrected " if prep.get("n4") else "") + "T1w image.")
        if reuse.get("affine") is None or reuse["affine"] > 0:
            pre.append(f"{which(reuse.get('affine'))}, the affine to the atlas was not registered but taken from "
                       f"sMRIPrep's spatial normalisation to `{space}` (`from-T1w_to-{space}_mode-image_xfm.h5`): its "
                       "affine part only, read with SimpleITK; its nonlinear part was not used.")
    affine_first = bool(prep.get("affine")) and "affine" not in lower
    if reuse.get("affine") is not None and reuse.get("of") and reuse["affine"] >= reuse["of"]:
        affine_first = False  # every image's affine came from sMRIPrep (said above)
    affine_method = str(prep.get("affine_method") or "ants")
    used_prep.add("affine_method")
    if "affine" in prep and prep["affine"] is not None:
        used_prep.add("affine")
        if not prep["affine"]:
            pre.append("No affine registration was run before the deformable methods; the images were already "
                       "affinely aligned on the atlas grid.")
    rest = [f"`{k}={value_text(v)}`" for k, v in prep.items() if k not in used_prep and v is not None]
    if rest:
        pre.append(f"Other preprocessing settings: {', '.join(rest)}.")
    if pre:
        paragraphs.append("*Preprocessing.* " + " ".join(pre))

    # ------------------------------------------------------------------ registration
    reg: list[str] = []
    if affine_first and affine_method == "fast":
        from hdar_pipeline.methods.fast_affine import FastAffineMethod

        fast = FastAffineMethod()  # the settings the pipeline runs it with: its defaults
        levels = " and ".join(f"{mm:g} mm" for mm in fast.levels_mm)
        reg.append("Before the deformable methods, each image was aligned to the atlas with a rigid and then an "
                   f"affine registration driven by the local normalised cross-correlation of {fast.window}-voxel "
                   f"windows, coarse to fine on {levels} isotropic grids over the atlas brain, starting from the "
                   "alignment of the intensity-weighted centres of mass, with Adam in PyTorch"
                   + version_suffix(versions, "torch") + " (hdar-pipeline's fast affine).")
    elif affine_first:  # the ANTs affine stage: the affine method's sentence
        aff = dict(parameters.get("affine", {}) or {})
        reg.append(method_spec("affine").describe(aff, str(presets.get("affine", "") or aff.get("preset") or ""),
                                                  SentenceContext(versions, cite))
                   .replace("Each image was aligned", "Before the deformable methods, each image was aligned", 1))
    for m, key in zip(methods, lower):
        params = dict(parameters.get(m, parameters.get(key, {})) or {})
        preset = str(presets.get(m, presets.get(key, "")) or params.get("preset") or "")
        if key in specs:
            context = SentenceContext(versions, cite, weights=weights,
                                      devices=(devices or {}).get(m, (devices or {}).get(key)))
            reg.append(specs[key].describe(params, preset, context))
        else:
            reg.append(_describe_generic(m, params, preset))
    if reg:
        paragraphs.append("*Registration.* " + " ".join(reg) + " All transforms map atlas points to subject "
                          "points (the ITK/ANTs convention); the subjects' images were resampled onto the atlas "
                          "grid with linear interpolation and their label maps with nearest-neighbour "
                          "interpolation. Each transform was also inverted (subject points to atlas points, stored "
                          "on the subject's grid: "
                          + _inverse_text(lower)
                          + "), its inverse consistency measured over the atlas "
                          "brain, and the atlas labels were brought onto each subject's native image with it "
                          "(nearest neighbour), from which the regional volumes were counted.")

    # ------------------------------------------------------------------ evaluation
    paragraphs.append(
        "*Evaluation.* Each subject's label map, warped onto the atlas, was compared with the atlas labels, label "
        "by label: the Dice coefficient, the target overlap " + cite("klein2009") + " and the 95th percentile of "
        "the symmetric surface distance (Hausdorff 95 %, in mm). The regularity of each deformation was "
        "measured by the Jacobian determinant of the transform: folded voxels are those with a determinant "
        "<= 0, reported as a percentage of the voxels. Runtime and peak memory were recorded for each "
        "registration.")

    # ------------------------------------------------------------------ reproducibility
    repro = []
    uses_ants = bool(set(lower) & {"affine", "syn"}) or (affine_first and affine_method != "fast") or bool(
        prep.get("n4")) or bool(prep.get("brain_extraction"))
    uses_torch = bool(set(lower) & {"hdar", "fireants"}) or (affine_first and affine_method == "fast")
    if seed is not None:
        rngs = ["Python", "NumPy"] + (["PyTorch"] if uses_torch else []) + (
            ["ANTs, through `ANTS_RANDOM_SEED`"] if uses_ants else [])
        repro.append(f"The random number generators ({join(rngs)}) were seeded with {seed}.")
    skip = {"hdar-pipeline", "hdar_pipeline"} | (set() if uses_torch else {"torch"}) | (
        set() if uses_ants else {"antspyx"}) | (set() if uses_pydra else {"pydra"}) | (
        set() if "fireants" in lower else {"fireants"})
    libs = [f"{_LIBRARY_NAMES.get(k, k)} {v}" for k, v in versions.items()
            if k not in skip and v and v != "not installed"]
    if libs:
        repro.append(f"Software versions: hdar-pipeline {versions['hdar-pipeline']}, {', '.join(libs)}.")
    if repro:
        paragraphs.append(" ".join(repro))

    refs = "\n".join(f"{i}. {cite.references[k].text}" for i, k in enumerate(cite.keys, start=1))
    note = ("*This text was generated automatically by hdar-pipeline from the settings of the run, to be copied "
            "into a manuscript; it is released under the CC0 licence.*")
    return "# Methods\n\n" + "\n\n".join(paragraphs) + f"\n\n{note}\n\n## References\n\n{refs}\n"


def _markdown_fragment(text: str, shift: int = 0) -> str:
    """The small Markdown subset :func:`methods_paragraph` writes (headings, paragraphs, a numbered list,
    ``*emphasis*`` and ```code```) as HTML elements; ``shift`` demotes the headings (``#`` -> ``<h{1+shift}>``)."""

    def inline(s: str) -> str:
        s = html.escape(s, quote=False)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        s = re.sub(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])", r"<em>\1</em>", s)
        return s

    out: list[str] = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        if block.startswith("## "):
            out.append(f"<h{2 + shift}>{inline(block[3:])}</h{2 + shift}>")
        elif block.startswith("# "):
            out.append(f"<h{1 + shift}>{inline(block[2:])}</h{1 + shift}>")
        elif all(re.match(r"\d+\. ", ln) for ln in lines):
            out.append("<ol>\n" + "\n".join(f"<li>{inline(ln.split('. ', 1)[1])}</li>" for ln in lines) + "\n</ol>")
        else:
            out.append(f"<p>{inline(' '.join(lines))}</p>")
    return "\n".join(out)


def _markdown_to_html(text: str, title: str = "Methods") -> str:
    """:func:`_markdown_fragment` as a standalone HTML page."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            "<style>body { font-family: Georgia, serif; max-width: 50em; margin: 2em auto; line-height: 1.5; "
            "padding: 0 1em; } code { font-size: .9em; }</style>\n</head>\n<body>\n" + _markdown_fragment(text)
            + "\n</body>\n</html>\n")


def cited_keys(text: str) -> list[str]:
    """The keys of :func:`references` that a methods text (:func:`methods_paragraph`) cites, in order of first
    citation."""
    found = [(text.find(ref.cite), key) for key, ref in references().items() if ref.cite in text]
    return [key for _, key in sorted(found)]


def bibtex(keys: Sequence[str]) -> str:
    """BibTeX entries of the given :func:`references` keys (the same references, the same keys)."""
    entries = []
    for key in keys:
        ref = references()[key]
        kind, fields = ref.bibtex_type, ref.bibtex
        body = ",\n".join(f"  {name} = {{{value}}}" for name, value in fields.items())
        entries.append(f"@{kind}{{{key},\n{body}\n}}\n")
    return "\n".join(entries)


def write_methods(out_dir: PathLike, **kwargs: Any) -> list[Path]:
    """Write :func:`methods_paragraph` ``(**kwargs)`` as ``CITATION.md``, ``CITATION.html`` and ``CITATION.bib``
    (BibTeX entries of every reference the text cites, keyed as :func:`references`) in ``out_dir``.

    Returns
    -------
    list of Path
        ``[CITATION.md, CITATION.html, CITATION.bib]`` (same text, references included).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = methods_paragraph(**kwargs)
    md = out / "CITATION.md"
    md.write_text(text, encoding="utf-8")
    page = out / "CITATION.html"
    page.write_text(_markdown_to_html(text), encoding="utf-8")
    bib = out / "CITATION.bib"
    bib.write_text(bibtex(cited_keys(text)), encoding="utf-8")
    return [md, page, bib]
