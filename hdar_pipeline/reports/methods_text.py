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

import numpy as np

from hdar_pipeline._version import __version__

PathLike = str | os.PathLike

__all__ = ["METHOD_TITLES", "REFERENCES", "bibtex", "cited_keys", "method_title", "methods_paragraph", "write_methods"]

#: How the text and the reports name each method.
METHOD_TITLES = {"hdar": "HDAR", "syn": "ANTs SyN", "demons": "Diffeomorphic Demons", "lccdemons": "LCC-Demons",
                 "fireants": "FireANTs", "voxelmorph": "VoxelMorph", "affine": "Affine (ANTs)"}


def method_title(method: str) -> str:
    """The name a text or a report gives ``method`` (its key when it has none)."""
    return METHOD_TITLES.get(method.lower(), method)


#: Full citations, keyed by the short key used in :func:`methods_paragraph`.
REFERENCES: dict[str, str] = {
    "huang2021": "Huang Y, Ahmad S, Fan J, Shen D, Yap PT. Difficulty-aware hierarchical convolutional neural "
                 "networks for deformable registration of brain MR images. *Medical Image Analysis*. "
                 "2021;67:101817. doi:10.1016/j.media.2020.101817",
    "avants2008": "Avants BB, Epstein CL, Grossman M, Gee JC. Symmetric diffeomorphic image registration with "
                  "cross-correlation: evaluating automated labeling of elderly and neurodegenerative brain. "
                  "*Medical Image Analysis*. 2008;12(1):26-41. doi:10.1016/j.media.2007.06.004",
    "avants2011": "Avants BB, Tustison NJ, Song G, Cook PA, Klein A, Gee JC. A reproducible evaluation of ANTs "
                  "similarity metric performance in brain image registration. *NeuroImage*. 2011;54(3):2033-2044. "
                  "doi:10.1016/j.neuroimage.2010.09.025",
    "lorenzi2013": "Lorenzi M, Ayache N, Frisoni GB, Pennec X. LCC-Demons: a robust and accurate symmetric "
                   "diffeomorphic registration algorithm. *NeuroImage*. 2013;81:470-483. "
                   "doi:10.1016/j.neuroimage.2013.04.114",
    "jena2024": "Jena R, Chaudhari P, Gee JC. FireANTs: Adaptive Riemannian Optimization for Multi-Scale "
                "Diffeomorphic Registration. arXiv:2404.01249. 2024",
    "balakrishnan2019": "Balakrishnan G, Zhao A, Sabuncu MR, Guttag J, Dalca AV. VoxelMorph: a learning framework "
                        "for deformable medical image registration. *IEEE Transactions on Medical Imaging*. "
                        "2019;38(8):1788-1800. doi:10.1109/TMI.2019.2897538",
    "dalca2019": "Dalca AV, Balakrishnan G, Guttag J, Sabuncu MR. Unsupervised learning of probabilistic "
                 "diffeomorphic registration for images and surfaces. *Medical Image Analysis*. 2019;57:226-236. "
                 "doi:10.1016/j.media.2019.07.006",
    "vercauteren2009": "Vercauteren T, Pennec X, Perchant A, Ayache N. Diffeomorphic demons: efficient "
                       "non-parametric image registration. *NeuroImage*. 2009;45(1 Suppl):S61-S72. "
                       "doi:10.1016/j.neuroimage.2008.10.040",
    "lowekamp2013": "Lowekamp BC, Chen DT, Ibáñez L, Blezek D. The design of SimpleITK. *Frontiers in "
                    "Neuroinformatics*. 2013;7:45. doi:10.3389/fninf.2013.00045",
    "tustison2010": "Tustison NJ, Avants BB, Cook PA, Zheng Y, Egan A, Yushkevich PA, Gee JC. N4ITK: improved N3 "
                    "bias correction. *IEEE Transactions on Medical Imaging*. 2010;29(6):1310-1320. "
                    "doi:10.1109/TMI.2010.2046908",
    "klein2009": "Klein A, Andersson J, Ardekani BA, Ashburner J, Avants B, Chiang MC, Christensen GE, Collins DL, "
                 "Gee J, Hellier P, Song JH, Jenkinson M, Lepage C, Rueckert D, Thompson P, Vercauteren T, Woods RP, "
                 "Mann JJ, Parsey RV. Evaluation of 14 nonlinear deformation algorithms applied to human brain MRI "
                 "registration. *NeuroImage*. 2009;46(3):786-802. doi:10.1016/j.neuroimage.2008.12.037",
    "jarecka2020": "Jarecka D, Goncalves M, Markiewicz CJ, Esteban O, Lo N, Kaczmarzyk J, Ghosh S. Pydra: a "
                   "flexible and lightweight dataflow engine for scientific analyses. In: *Proceedings of the 19th "
                   "Python in Science Conference (SciPy 2020)*. 2020",
    "fonov2009": "Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average "
                 "age-appropriate brain templates from birth to adulthood. *NeuroImage*. 2009;47(Suppl 1):S102. "
                 "doi:10.1016/S1053-8119(09)70884-5",
}

_CITE_TEXT = {
    "huang2021": "Huang et al. 2021", "avants2008": "Avants et al. 2008", "avants2011": "Avants et al. 2011",
    "vercauteren2009": "Vercauteren et al. 2009", "lowekamp2013": "Lowekamp et al. 2013",
    "lorenzi2013": "Lorenzi et al. 2013", "jena2024": "Jena et al. 2024", "balakrishnan2019": "Balakrishnan et al. 2019",
    "dalca2019": "Dalca et al. 2019",
    "tustison2010": "Tustison et al. 2010", "klein2009": "Klein et al. 2009", "jarecka2020": "Jarecka et al. 2020",
    "fonov2009": "Fonov et al. 2009",
}

#: BibTeX entries of :data:`REFERENCES` (same keys, same facts): key -> (entry type, fields).
_BIBTEX: dict[str, tuple[str, dict[str, str]]] = {
    "huang2021": ("article", {
        "author": "Huang, Y. and Ahmad, S. and Fan, J. and Shen, D. and Yap, P.-T.",
        "title": "Difficulty-aware hierarchical convolutional neural networks for deformable registration of brain "
                 "{MR} images",
        "journal": "Medical Image Analysis", "year": "2021", "volume": "67", "pages": "101817",
        "doi": "10.1016/j.media.2020.101817"}),
    "avants2008": ("article", {
        "author": "Avants, B. B. and Epstein, C. L. and Grossman, M. and Gee, J. C.",
        "title": "Symmetric diffeomorphic image registration with cross-correlation: evaluating automated labeling "
                 "of elderly and neurodegenerative brain",
        "journal": "Medical Image Analysis", "year": "2008", "volume": "12", "number": "1", "pages": "26--41",
        "doi": "10.1016/j.media.2007.06.004"}),
    "avants2011": ("article", {
        "author": "Avants, B. B. and Tustison, N. J. and Song, G. and Cook, P. A. and Klein, A. and Gee, J. C.",
        "title": "A reproducible evaluation of {ANTs} similarity metric performance in brain image registration",
        "journal": "NeuroImage", "year": "2011", "volume": "54", "number": "3", "pages": "2033--2044",
        "doi": "10.1016/j.neuroimage.2010.09.025"}),
    "lorenzi2013": ("article", {
        "author": "Lorenzi, M. and Ayache, N. and Frisoni, G. B. and Pennec, X.",
        "title": "{LCC-Demons}: a robust and accurate symmetric diffeomorphic registration algorithm",
        "journal": "NeuroImage", "year": "2013", "volume": "81", "pages": "470--483",
        "doi": "10.1016/j.neuroimage.2013.04.114"}),
    "jena2024": ("misc", {
        "author": "Jena, R. and Chaudhari, P. and Gee, J. C.",
        "title": "{FireANTs}: Adaptive {Riemannian} Optimization for Multi-Scale Diffeomorphic Registration",
        "year": "2024", "eprint": "2404.01249", "archiveprefix": "arXiv"}),
    "balakrishnan2019": ("article", {
        "author": "Balakrishnan, G. and Zhao, A. and Sabuncu, M. R. and Guttag, J. and Dalca, A. V.",
        "title": "{VoxelMorph}: a learning framework for deformable medical image registration",
        "journal": "IEEE Transactions on Medical Imaging", "year": "2019", "volume": "38", "number": "8",
        "pages": "1788--1800", "doi": "10.1109/TMI.2019.2897538"}),
    "dalca2019": ("article", {
        "author": "Dalca, A. V. and Balakrishnan, G. and Guttag, J. and Sabuncu, M. R.",
        "title": "Unsupervised learning of probabilistic diffeomorphic registration for images and surfaces",
        "journal": "Medical Image Analysis", "year": "2019", "volume": "57", "pages": "226--236",
        "doi": "10.1016/j.media.2019.07.006"}),
    "vercauteren2009": ("article", {
        "author": "Vercauteren, T. and Pennec, X. and Perchant, A. and Ayache, N.",
        "title": "Diffeomorphic demons: efficient non-parametric image registration",
        "journal": "NeuroImage", "year": "2009", "volume": "45", "number": "1 Suppl", "pages": "S61--S72",
        "doi": "10.1016/j.neuroimage.2008.10.040"}),
    "lowekamp2013": ("article", {
        "author": "Lowekamp, B. C. and Chen, D. T. and Ib{\\'a}{\\~n}ez, L. and Blezek, D.",
        "title": "The design of {SimpleITK}",
        "journal": "Frontiers in Neuroinformatics", "year": "2013", "volume": "7", "pages": "45",
        "doi": "10.3389/fninf.2013.00045"}),
    "tustison2010": ("article", {
        "author": "Tustison, N. J. and Avants, B. B. and Cook, P. A. and Zheng, Y. and Egan, A. and Yushkevich, P. A. "
                  "and Gee, J. C.",
        "title": "{N4ITK}: improved {N3} bias correction",
        "journal": "IEEE Transactions on Medical Imaging", "year": "2010", "volume": "29", "number": "6",
        "pages": "1310--1320", "doi": "10.1109/TMI.2010.2046908"}),
    "klein2009": ("article", {
        "author": "Klein, A. and Andersson, J. and Ardekani, B. A. and Ashburner, J. and Avants, B. and Chiang, M.-C. "
                  "and Christensen, G. E. and Collins, D. L. and Gee, J. and Hellier, P. and Song, J. H. and "
                  "Jenkinson, M. and Lepage, C. and Rueckert, D. and Thompson, P. and Vercauteren, T. and Woods, R. P. "
                  "and Mann, J. J. and Parsey, R. V.",
        "title": "Evaluation of 14 nonlinear deformation algorithms applied to human brain {MRI} registration",
        "journal": "NeuroImage", "year": "2009", "volume": "46", "number": "3", "pages": "786--802",
        "doi": "10.1016/j.neuroimage.2008.12.037"}),
    "jarecka2020": ("inproceedings", {
        "author": "Jarecka, D. and Goncalves, M. and Markiewicz, C. J. and Esteban, O. and Lo, N. and Kaczmarzyk, J. "
                  "and Ghosh, S.",
        "title": "{Pydra}: a flexible and lightweight dataflow engine for scientific analyses",
        "booktitle": "Proceedings of the 19th Python in Science Conference ({SciPy} 2020)", "year": "2020"}),
    "fonov2009": ("article", {
        "author": "Fonov, V. S. and Evans, A. C. and McKinstry, R. C. and Almli, C. R. and Collins, D. L.",
        "title": "Unbiased nonlinear average age-appropriate brain templates from birth to adulthood",
        "journal": "NeuroImage", "year": "2009", "volume": "47", "number": "Suppl 1", "pages": "S102",
        "doi": "10.1016/S1053-8119(09)70884-5"}),
}

#: Package names in :func:`provenance.library_versions` and how the text names them.
_LIBRARY_NAMES = {"python": "Python", "antspyx": "ANTsPy (antspyx)", "SimpleITK": "SimpleITK", "nibabel": "NiBabel",
                  "numpy": "NumPy", "scipy": "SciPy", "torch": "PyTorch", "pydra": "Pydra", "fireants": "FireANTs"}


class _Citer:
    """Collects cited references in order of first use."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def __call__(self, *keys: str) -> str:
        for k in keys:
            if k not in self.keys:
                self.keys.append(k)
        return "(" + self.inner(*keys) + ")"

    def inner(self, *keys: str) -> str:
        """The citation without parentheses, for use inside a parenthesis."""
        for k in keys:
            if k not in self.keys:
                self.keys.append(k)
        return "; ".join(_CITE_TEXT[k] for k in keys)


def _value_text(value: Any) -> str:
    """Parameter values as written in the text: sequences as 100x70x50, floats without noise."""
    if isinstance(value, (list, tuple)):
        return "x".join(_value_text(v) for v in value)
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return str(value)


def _join(parts: Sequence[str]) -> str:
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _other_parameters(params: Mapping[str, Any], used: set[str]) -> str:
    rest = [f"`{k}={_value_text(v)}`" for k, v in params.items() if k not in used and v is not None]
    return f" Other settings: {', '.join(rest)}." if rest else ""


def _pick(params: Mapping[str, Any], *keys: str) -> tuple[str | None, Any]:
    for k in keys:
        if k in params and params[k] is not None:
            return k, params[k]
    return None, None


_ALWAYS_SKIPPED = {"preset", "seed", "name"}


def _describe_affine(params: Mapping[str, Any], preset: str, version: str, cite: _Citer) -> str:
    used = set(_ALWAYS_SKIPPED)
    details = []
    for key, what in (("rigid_iterations", "rigid iterations"), ("affine_iterations", "affine iterations"),
                      ("shrink_factors", "shrink factors"), ("smoothing_sigmas_vox", "smoothing sigmas (voxels)")):
        if params.get(key) is not None:
            details.append(f"{what} {_value_text(params[key])}")
            used.add(key)
    if params.get("sampling_rate") is not None:
        details.append(f"{100 * float(params['sampling_rate']):g} % of the voxels sampled for the metric")
        used.add("sampling_rate")
    text = ("Each image was aligned to the atlas with a rigid and then an affine registration, both driven by "
            f"Mattes mutual information, with `antsRegistration` through ANTsPy{version}")
    text += (f" ({'; '.join(details)}; {cite.inner('avants2011')})." if details else f" {cite('avants2011')}.")
    if preset:
        text += f" Preset: `{preset}`."
    return text + _other_parameters(params, used)


def _describe_syn(params: Mapping[str, Any], preset: str, version: str, cite: _Citer) -> str:
    used = set(_ALWAYS_SKIPPED)
    text = ("Deformable registration with symmetric image normalisation (SyN; " + cite.inner("avants2008")
            + f") used the SyN stage of `antsRegistration` through ANTsPy{version} " + cite("avants2011"))
    details = []
    mk, metric = _pick(params, "syn_metric", "metric")
    sk, sampling = _pick(params, "syn_sampling", "sampling", "radius")
    if metric is not None:
        used.add(mk)
        m = str(metric).lower()
        if m in ("cc", "ants_cc", "neighborhood_cc"):
            name = "local (neighbourhood) cross-correlation"
            if sampling is not None:
                name += f" with a radius of {_value_text(sampling)} voxels"
                used.add(sk)
        elif m in ("mattes", "mi"):
            name = "Mattes mutual information"
            if sampling is not None:
                name += f" with {_value_text(sampling)} histogram bins"
                used.add(sk)
        else:
            name = f"the `{metric}` metric"
            if sampling is not None:
                name += f" (sampling parameter {_value_text(sampling)})"
                used.add(sk)
        details.append(f"similarity metric {name}")
    elif sampling is not None:
        details.append(f"metric sampling parameter {_value_text(sampling)}")
        used.add(sk)
    ik, iterations = _pick(params, "reg_iterations", "iterations")
    if iterations is not None:
        used.add(ik)
        details.append(f"{_value_text(iterations)} iterations (coarse to fine)")
    if params.get("grad_step") is not None:
        used.add("grad_step")
        details.append(f"gradient step {_value_text(params['grad_step'])}")
    if params.get("flow_sigma") is not None:
        used.add("flow_sigma")
        details.append(f"update-field smoothing (flow sigma) {_value_text(params['flow_sigma'])}")
    if params.get("total_sigma") is not None:
        used.add("total_sigma")
        details.append(f"total-field smoothing (total sigma) {_value_text(params['total_sigma'])}")
    text += f", with {_join(details)}." if details else "."
    if preset:
        text += f" Preset: `{preset}`."
    return text + _other_parameters(params, used)


def _describe_demons(params: Mapping[str, Any], preset: str, version: str, cite: _Citer) -> str:
    used = set(_ALWAYS_SKIPPED)
    text = ("Diffeomorphic Demons registration " + cite("vercauteren2009") + " used SimpleITK" + version + "'s "
            "`DiffeomorphicDemonsRegistrationFilter` " + cite("lowekamp2013"))
    details = []
    shrink, iters = params.get("shrink_factors"), params.get("iterations")
    if shrink is not None and iters is not None and np.ndim(shrink) == 1 and np.ndim(iters) == 1:
        used |= {"shrink_factors", "iterations"}
        details.append(f"{len(shrink)} resolution levels (shrink factors {_value_text(shrink)}; "
                       f"{_value_text(iters)} iterations per level)")
    else:
        if shrink is not None:
            used.add("shrink_factors")
            details.append(f"shrink factors {_value_text(shrink)}")
        if iters is not None:
            used.add("iterations")
            details.append(f"{_value_text(iters)} iterations per level")
    if params.get("smoothing_sigmas_vox") is not None:
        used.add("smoothing_sigmas_vox")
        details.append(f"image smoothing {_value_text(params['smoothing_sigmas_vox'])} voxels per level")
    sk, sigma = _pick(params, "smoothing_sigma_vox", "sigma", "field_sigma")
    if sigma is not None:
        used.add(sk)
        details.append(f"the displacement field regularised after every iteration by a Gaussian of standard "
                       f"deviation {_value_text(sigma)} voxels")
    if params.get("update_sigma_vox") is not None:
        used.add("update_sigma_vox")
        u = float(params["update_sigma_vox"])
        details.append("no update-field smoothing" if u == 0 else
                       f"update-field smoothing of {_value_text(u)} voxels")
    if params.get("max_step_length") is not None:
        used.add("max_step_length")
        details.append(f"a maximum step of {_value_text(params['max_step_length'])} voxels per iteration")
    text += f", with {_join(details)}." if details else "."
    if "histogram_matching" in params and params["histogram_matching"] is not None:
        used.add("histogram_matching")
        text += (" The moving image's histogram was matched to the atlas's first." if params["histogram_matching"]
                 else " No histogram matching was applied.")
    if preset:
        text += f" Preset: `{preset}`."
    return text + _other_parameters(params, used)


def _inverse_text(methods: Sequence[str]) -> str:
    """How each method's inverse was obtained: its own (SyN's inverse warp, LCC-Demons' negated velocity) or the
    displacement field inverted by Newton's method (:mod:`hdar_pipeline.core.inverse`)."""
    own = [t for m, t in (("syn", "SyN's own inverse"), ("lccdemons", "LCC-Demons' negated velocity"))
           if m in methods]
    numerical = [m for m in methods if m not in ("syn", "lccdemons", "affine")]
    parts = list(own)
    if numerical:
        parts.append(("for the other methods " if own else "") + "the displacement field inverted by Newton's method")
    return _join(parts) if parts else "the affine inverted exactly"


def _describe_lccdemons(params: Mapping[str, Any], preset: str, version: str, cite: _Citer) -> str:
    used = set(_ALWAYS_SKIPPED) | {"device", "threads"}
    text = ("LCC-Demons registration " + cite("lorenzi2013") + " used hdar-pipeline's PyTorch" + version
            + " implementation of symmetric log-domain diffeomorphic Demons with local correlation coefficient "
              "forces")
    details = []
    if params.get("sigma_lcc") is not None:
        used.add("sigma_lcc")
        details.append(f"a Gaussian correlation window of {_value_text(params['sigma_lcc'])} voxels")
    if params.get("sigma_i") is not None:
        used.add("sigma_i")
        details.append(f"step trade-off sigma_i {_value_text(params['sigma_i'])}")
    if params.get("sigma_fluid") is not None:
        used.add("sigma_fluid")
        details.append(f"each update smoothed by a Gaussian of {_value_text(params['sigma_fluid'])} voxels "
                       "(fluid-like)")
    if params.get("sigma_diff") is not None:
        used.add("sigma_diff")
        details.append(f"the stationary velocity field by one of {_value_text(params['sigma_diff'])} voxels "
                       "(diffusion-like)")
    shrink, iters = params.get("shrink_factors"), params.get("iterations")
    if shrink is not None and iters is not None:
        used |= {"shrink_factors", "iterations"}
        details.append(f"{_value_text(iters)} iterations at shrink factors {_value_text(shrink)}")
    text += (" (" + "; ".join(details) + ")") if details else ""
    text += (", the transformation being the velocity field's exponential computed by scaling and squaring, "
             "and the inverse that of the negated velocity.")
    if preset:
        text += f" Preset: `{preset}`."
    return text + _other_parameters(params, used)


def _describe_fireants(params: Mapping[str, Any], preset: str, version: str, cite: _Citer) -> str:
    used = set(_ALWAYS_SKIPPED) | {"device", "threads", "loss"}
    algorithm = params.get("algorithm")
    used.add("algorithm")
    text = ("Deformable registration used FireANTs" + version + " " + cite("jena2024") + ": "
            + ("symmetric (SyN) " if algorithm == "syn" else "greedy " if algorithm == "greedy" else "")
            + "diffeomorphic registration with compositive warps, adaptive Riemannian optimisation (Adam) and local "
              "normalised cross-correlation")
    details = []
    if params.get("cc_kernel_size") is not None:
        used.add("cc_kernel_size")
        details.append(f"a correlation window of {_value_text(params['cc_kernel_size'])} voxels")
    scales, iters = params.get("scales"), params.get("iterations")
    if scales is not None and iters is not None:
        used |= {"scales", "iterations"}
        details.append(f"{_value_text(iters)} iterations at scales {_value_text(scales)}")
    for key, what in (("smooth_grad_sigma", "gradients smoothed by a Gaussian of {} voxels"),
                      ("smooth_warp_sigma", "the warp by one of {} voxels"), ("optimizer_lr", "learning rate {}")):
        if params.get(key) is not None:
            used.add(key)
            details.append(what.format(_value_text(params[key])))
    text += (" (" + "; ".join(details) + ")") if details else ""
    text += "."
    if preset:
        text += f" Preset: `{preset}`."
    return text + _other_parameters(params, used)


def _devices_text(requested: Any, used: Sequence[str] | None) -> str:
    """Where a method ran: the devices its records name (what was used), else the requested one; ``auto`` is
    never reported as if it were a device."""
    if used:
        names = sorted({str(d) for d in used if d})
        if names:
            return f" It ran on {_join([f'`{d}`' for d in names])}."
    if requested is None:
        return ""
    if str(requested).lower() == "auto":
        return (" Device: chosen at run time (`auto`: the first CUDA GPU when one is available, otherwise the "
                "CPU).")
    return f" Device: `{requested}`."


def _describe_hdar(params: Mapping[str, Any], preset: str, version: str, weights: Mapping | None,
                   cite: _Citer, devices: Sequence[str] | None = None) -> str:
    used = set(_ALWAYS_SKIPPED) | {"weights", "weights_sha256"}
    card_cfg: Mapping[str, Any] = {}
    if weights and isinstance(weights.get("config"), Mapping):
        cfg = weights["config"]
        card_cfg = cfg.get("cascade", cfg) if isinstance(cfg.get("cascade", cfg), Mapping) else {}

    def get(*keys: str) -> Any:
        k, v = _pick(params, *keys)
        if k is not None:
            used.add(k)
            return v
        k, v = _pick(card_cfg, *keys)
        return v

    text = ("Deformable registration with HDAR, the hierarchical difficulty-aware registration network "
            + cite("huang2021") + f", used the PyTorch{version} implementation in hdar-pipeline")
    details = []
    levels = get("levels", "n_levels", "num_levels")
    if levels is not None:
        details.append(f"{_value_text(levels)} cascaded sub-network level" + ("s" if str(levels) != "1" else ""))
    width = get("width", "widths")
    if width is not None:
        details.append(f"network width `{_value_text(width)}`")
    mode = get("mode")
    mode = mode if mode is not None else (preset if preset in ("fast", "full") else None)
    k = get("top_k", "K", "k", "patches", "n_patches")
    if mode is not None:
        if str(mode) == "fast":
            details.append("*fast* mode (the first level on the whole image pair, the finer levels on the "
                           + (f"K = {_value_text(k)} " if k is not None else "")
                           + "hardest patches selected by the difficulty-aware attention)")
        elif str(mode) == "full":
            details.append("*full* mode (the finer levels on a sliding window covering the brain, blended "
                           "without seams)")
        else:
            details.append(f"mode `{_value_text(mode)}`")
    elif k is not None:
        details.append(f"K = {_value_text(k)} patches per level")
    if mode is not None and str(mode) != "fast" and k is not None:
        details.append(f"K = {_value_text(k)}")
    diffeo = get("diffeomorphic")
    if diffeo is not None:
        details.append("diffeomorphic (stationary velocity fields integrated by scaling and squaring)" if diffeo
                       else "non-diffeomorphic displacement fields")
    text += f", with {_join(details)}." if details else "."
    prealign = get("prealign")
    if prealign:
        text += (" Before the network, a 12-parameter affine map was fitted on local normalised cross-correlation "
                 "at a quarter of the image resolution (Adam).")
    refine = get("refine", "refine_steps", "refinement_steps")
    if refine is not None:
        if int(refine) > 0:
            extra = []
            lr = get("refine_lr")
            if lr is not None:
                extra.append(f"learning rate {_value_text(lr)}")
            levels = get("refine_levels")
            if levels:
                extra.append("on each of the resolutions " + ", ".join(_value_text(x) for x in levels)
                             + " times the image size, coarse to fine")
            if get("refine_similarity") == "full":
                extra.append("the finest level's similarity computed on the full-resolution images, linearised "
                             "around the current warp and re-warped every few steps")
            full_res = get("refine_full_resolution")
            if full_res:
                extra.append(f"then {int(full_res)} step{'s' if int(full_res) != 1 else ''} on a correction at the "
                             "full resolution of the image, "
                             "restricted to the brain's bounding box")
            if get("refine_diffeomorphic"):
                extra.append("each correction integrated from a stationary velocity field by scaling and squaring "
                             "and composed with the field")
            text += (f" The network's field was refined by {int(refine)} steps per level of instance optimisation (Adam on "
                     "local normalised cross-correlation plus an anti-folding smoothness term"
                     + (f"; {', '.join(extra)}" if extra else "") + ").")
        else:
            text += " No instance-optimisation refinement was applied."
    name = params.get("weights") or (weights or {}).get("name") or (weights or {}).get("model")
    sha = params.get("weights_sha256") or (weights or {}).get("sha256")
    if name is not None or sha is not None:
        text += " Network weights: " + (f"`{name}`" if name is not None else "") + (
            f" (SHA-256 `{sha}`)" if sha is not None else "")
        if weights and weights.get("data"):
            text += f", trained on {weights['data']}"
        text += "."
    text += _devices_text(get("device"), devices)
    if preset and not (mode is not None and preset == str(mode)):
        text += f" Preset: `{preset}`."
    elif preset:
        used.add("mode")
    return text + _other_parameters(params, used)


def _describe_voxelmorph(params: Mapping[str, Any], preset: str, version: str, cite: _Citer,
                         devices: Sequence[str] | None = None) -> str:
    """The VoxelMorph sentence: the network (its diffeomorphic variant), how it was trained (HDAR's pipeline), the
    pre-alignment and the refinement it ran with, and its weights (name and SHA-256 from ``params``)."""
    used = set(_ALWAYS_SKIPPED) | {"weights", "weights_sha256", "device", "threads", "diffeomorphic"}
    diffeomorphic = params.get("diffeomorphic", True)
    text = ("Deformable registration with VoxelMorph " + cite("balakrishnan2019")
            + (", in its diffeomorphic variant " + cite("dalca2019") if diffeomorphic else "")
            + f", used hdar-pipeline's PyTorch{version} implementation of the network (a U-Net predicting a "
            + ("stationary velocity field, integrated by scaling and squaring" if diffeomorphic
               else "displacement field")
            + "), trained with the package's training pipeline on local normalised cross-correlation, diffusion "
            "regularisation and an auxiliary Dice loss (the settings are in the weights' model card), and HDAR's "
            "inference around it.")
    if params.get("prealign"):
        used.add("prealign")
        text += (" Before the network, a 12-parameter affine map was fitted on local normalised cross-correlation "
                 "at a quarter of the image resolution (Adam).")
    refine = params.get("refine")
    if refine is not None:
        used |= {"refine", "refine_levels", "refine_lr", "refine_similarity", "refine_full_resolution",
                 "refine_diffeomorphic", "refine_gradient_sigma", "refine_smooth_weight"}
        if int(refine) > 0:
            levels = params.get("refine_levels")
            full_res = params.get("refine_full_resolution")
            text += (f" The network's field was refined by {int(refine)} steps per level of instance optimisation "
                     "(Adam on local normalised cross-correlation plus an anti-folding smoothness term"
                     + (", on each of the resolutions " + ", ".join(_value_text(x) for x in levels)
                        + " times the image size" if levels else "")
                     + (f", then {int(full_res)} step{'s' if int(full_res) != 1 else ''} at full resolution"
                        if full_res else "")
                     + (", each correction integrated from a stationary velocity field and composed with the field"
                        if params.get("refine_diffeomorphic") else "") + "), as in HDAR.")
        else:
            text += " No instance-optimisation refinement was applied."
    name, sha = params.get("weights"), params.get("weights_sha256")
    if name is not None or sha is not None:
        text += (" Network weights: " + (f"`{name}`" if name is not None else "")
                 + (f" (SHA-256 `{sha}`)" if sha is not None else "") + ".")
    text += _devices_text(params.get("device"), devices)
    if preset:
        text += f" Preset: `{preset}`."
    return text + _other_parameters(params, used)


def _describe_generic(method: str, params: Mapping[str, Any], preset: str) -> str:
    text = f"The `{method}` method was run"
    text += f" with preset `{preset}`" if preset else ""
    rest = [f"`{k}={_value_text(v)}`" for k, v in params.items() if k not in _ALWAYS_SKIPPED and v is not None]
    return text + (f" ({', '.join(rest)})." if rest else ".")


def _version_suffix(versions: Mapping[str, str], key: str) -> str:
    v = versions.get(key)
    return f" {v}" if v and v != "not installed" else ""


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
        The methods that ran (``"affine"``, ``"syn"``, ``"demons"``, ``"hdar"``; other names are described
        generically). Only these are described and cited.
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
    cite = _Citer()
    methods = [str(m) for m in methods]
    lower = [m.lower() for m in methods]
    uses_pydra = (engine or "").lower() == "pydra" or _version_suffix(versions, "pydra") != ""

    paragraphs: list[str] = []
    # ------------------------------------------------------------------ overview
    who = (f"{n_subjects} T1-weighted (T1w) image{'s' if n_subjects != 1 else ''}" if n_subjects is not None
           else "The T1-weighted (T1w) images")
    atlas_cite = " " + cite("fonov2009") if "mni" in atlas_description.lower() else ""
    names = [method_title(m) if m.lower() in METHOD_TITLES else f"`{m}`" for m in methods]
    intro = (f"{who[0].upper() + who[1:]} {'were' if n_subjects != 1 else 'was'} registered to "
             f"{atlas_description}{atlas_cite} with hdar-pipeline {versions['hdar-pipeline']}")
    intro += (", a Python package" + (f" (Python {versions['python']})" if versions.get("python") else "")
              + f", using {_join(names)}." if names else ".")
    if uses_pydra:
        intro += (f" The processing was organised as a workflow in Pydra{_version_suffix(versions, 'pydra')} "
                  + cite("jarecka2020") + ".")
    paragraphs.append(intro)

    # ------------------------------------------------------------------ preprocessing
    pre: list[str] = []
    used_prep = set()
    if "n4" in prep and prep["n4"] is not None:
        used_prep.add("n4")
        pre.append("Intensity non-uniformity was corrected with N4 (`N4BiasFieldCorrection` through ANTsPy"
                   + f"{_version_suffix(versions, 'antspyx')}; " + cite.inner("tustison2010", "avants2011") + ")."
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
    rest = [f"`{k}={_value_text(v)}`" for k, v in prep.items() if k not in used_prep and v is not None]
    if rest:
        pre.append(f"Other preprocessing settings: {', '.join(rest)}.")
    if pre:
        paragraphs.append("*Preprocessing.* " + " ".join(pre))

    # ------------------------------------------------------------------ registration
    reg: list[str] = []
    ants_v = _version_suffix(versions, "antspyx")
    if affine_first and affine_method == "fast":
        from hdar_pipeline.methods.fast_affine import FastAffineMethod

        fast = FastAffineMethod()  # the settings the pipeline runs it with: its defaults
        levels = " and ".join(f"{mm:g} mm" for mm in fast.levels_mm)
        reg.append("Before the deformable methods, each image was aligned to the atlas with a rigid and then an "
                   f"affine registration driven by the local normalised cross-correlation of {fast.window}-voxel "
                   f"windows, coarse to fine on {levels} isotropic grids over the atlas brain, starting from the "
                   "alignment of the intensity-weighted centres of mass, with Adam in PyTorch"
                   + _version_suffix(versions, "torch") + " (hdar-pipeline's fast affine).")
    elif affine_first:
        aff = dict(parameters.get("affine", {}) or {})
        reg.append(_describe_affine(aff, str(presets.get("affine", "") or aff.get("preset") or ""), ants_v, cite)
                   .replace("Each image was aligned", "Before the deformable methods, each image was aligned", 1))
    for m, key in zip(methods, lower):
        params = dict(parameters.get(m, parameters.get(key, {})) or {})
        preset = str(presets.get(m, presets.get(key, "")) or params.get("preset") or "")
        if key == "affine":
            reg.append(_describe_affine(params, preset, ants_v, cite))
        elif key == "syn":
            reg.append(_describe_syn(params, preset, ants_v, cite))
        elif key == "demons":
            reg.append(_describe_demons(params, preset, _version_suffix(versions, "SimpleITK"), cite))
        elif key == "lccdemons":
            reg.append(_describe_lccdemons(params, preset, _version_suffix(versions, "torch"), cite))
        elif key == "fireants":
            reg.append(_describe_fireants(params, preset, _version_suffix(versions, "fireants"), cite))
        elif key == "hdar":
            reg.append(_describe_hdar(params, preset, _version_suffix(versions, "torch"), weights, cite,
                                      (devices or {}).get(m, (devices or {}).get(key))))
        elif key == "voxelmorph":
            reg.append(_describe_voxelmorph(params, preset, _version_suffix(versions, "torch"), cite,
                                            (devices or {}).get(m, (devices or {}).get(key))))
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
        repro.append(f"The random number generators ({_join(rngs)}) were seeded with {seed}.")
    skip = {"hdar-pipeline", "hdar_pipeline"} | (set() if uses_torch else {"torch"}) | (
        set() if uses_ants else {"antspyx"}) | (set() if uses_pydra else {"pydra"}) | (
        set() if "fireants" in lower else {"fireants"})
    libs = [f"{_LIBRARY_NAMES.get(k, k)} {v}" for k, v in versions.items()
            if k not in skip and v and v != "not installed"]
    if libs:
        repro.append(f"Software versions: hdar-pipeline {versions['hdar-pipeline']}, {', '.join(libs)}.")
    if repro:
        paragraphs.append(" ".join(repro))

    refs = "\n".join(f"{i}. {REFERENCES[k]}" for i, k in enumerate(cite.keys, start=1))
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
    """The keys of :data:`REFERENCES` that a methods text (:func:`methods_paragraph`) cites, in order of first
    citation."""
    found = [(text.find(cite), key) for key, cite in _CITE_TEXT.items() if cite in text]
    return [key for _, key in sorted(found)]


def bibtex(keys: Sequence[str]) -> str:
    """BibTeX entries of the given :data:`REFERENCES` keys (the same references, the same keys)."""
    entries = []
    for key in keys:
        kind, fields = _BIBTEX[key]
        body = ",\n".join(f"  {name} = {{{value}}}" for name, value in fields.items())
        entries.append(f"@{kind}{{{key},\n{body}\n}}\n")
    return "\n".join(entries)


def write_methods(out_dir: PathLike, **kwargs: Any) -> list[Path]:
    """Write :func:`methods_paragraph` ``(**kwargs)`` as ``CITATION.md``, ``CITATION.html`` and ``CITATION.bib``
    (BibTeX entries of every reference the text cites, keyed as :data:`REFERENCES`) in ``out_dir``.

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
