"""What the methods paragraph (:mod:`hdar_pipeline.reports.methods_text`) and each method's own sentence in it
share: references, the citer that numbers them in order of first use, and how values are written.

A method's sentence is its :attr:`~hdar_pipeline.methods.registry.MethodSpec.describe` function,
``describe(params, preset, context) -> str``, next to the method in its module; the references it cites are its
spec's :attr:`~hdar_pipeline.methods.registry.MethodSpec.references` (or the shared ones here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["ALWAYS_SKIPPED", "AVANTS2011", "Citer", "Reference", "SentenceContext", "devices_text", "join",
           "other_parameters", "pick", "value_text", "version_suffix"]


@dataclass(frozen=True)
class Reference:
    """One work the methods text may cite.

    Attributes
    ----------
    key : str
        Short key, also the BibTeX key (``"avants2008"``).
    text : str
        The full citation of the reference list (Markdown: the journal in ``*...*``).
    cite : str
        How the text cites it in parentheses (``"Avants et al. 2008"``).
    bibtex_type : str
        The BibTeX entry type (``"article"``, ``"misc"``, ``"inproceedings"``).
    bibtex : mapping
        The BibTeX fields, in the order they are written.
    """

    key: str
    text: str
    cite: str
    bibtex_type: str
    bibtex: Mapping[str, str] = field(default_factory=dict)


#: ANTs (antsRegistration, N4 through ANTsPy): cited by the ANTs methods and by the preprocessing.
AVANTS2011 = Reference(
    "avants2011",
    "Avants BB, Tustison NJ, Song G, Cook PA, Klein A, Gee JC. A reproducible evaluation of ANTs "
    "similarity metric performance in brain image registration. *NeuroImage*. 2011;54(3):2033-2044. "
    "doi:10.1016/j.neuroimage.2010.09.025",
    "Avants et al. 2011", "article", {
        "author": "Avants, B. B. and Tustison, N. J. and Song, G. and Cook, P. A. and Klein, A. and Gee, J. C.",
        "title": "A reproducible evaluation of {ANTs} similarity metric performance in brain image registration",
        "journal": "NeuroImage", "year": "2011", "volume": "54", "number": "3", "pages": "2033--2044",
        "doi": "10.1016/j.neuroimage.2010.09.025"})


class Citer:
    """Collects cited references in order of first use.

    Parameters
    ----------
    references : mapping
        Key -> :class:`Reference`: every reference that may be cited.
    """

    def __init__(self, references: Mapping[str, Reference]) -> None:
        self.references = references
        self.keys: list[str] = []

    def __call__(self, *keys: str) -> str:
        """The citation in parentheses: ``(Avants et al. 2008; Avants et al. 2011)``."""
        return "(" + self.inner(*keys) + ")"

    def inner(self, *keys: str) -> str:
        """The citation without parentheses, for use inside a parenthesis."""
        for k in keys:
            if k not in self.keys:
                self.keys.append(k)
        return "; ".join(self.references[k].cite for k in keys)


@dataclass
class SentenceContext:
    """What a method's sentence may draw on besides its parameters and preset.

    Attributes
    ----------
    versions : mapping
        Package name -> version (:func:`~hdar_pipeline.core.provenance.library_versions`).
    cite : Citer
        The paragraph's citer (one numbering for the whole text).
    weights : mapping, optional
        HDAR's weights description (``name``, ``sha256``, ``data``, ``config``).
    devices : sequence of str, optional
        The devices this method's registrations ran on, as their records say.
    """

    versions: Mapping[str, str]
    cite: Citer
    weights: Mapping | None = None
    devices: Sequence[str] | None = None

    def version(self, package: str) -> str:
        """``" <version>"`` of ``package`` for the text, or ``""`` when unknown."""
        return version_suffix(self.versions, package)


#: Parameters no sentence writes out as "other settings".
ALWAYS_SKIPPED = frozenset({"preset", "seed", "name"})


def version_suffix(versions: Mapping[str, str], key: str) -> str:
    """``" <version>"`` of package ``key``, or ``""`` when it is missing or not installed."""
    v = versions.get(key)
    return f" {v}" if v and v != "not installed" else ""


def value_text(value: Any) -> str:
    """Parameter values as written in the text: sequences as 100x70x50, floats without noise."""
    if isinstance(value, (list, tuple)):
        return "x".join(value_text(v) for v in value)
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return str(value)


def join(parts: Sequence[str]) -> str:
    """``"a, b and c"`` (empty parts left out)."""
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def other_parameters(params: Mapping[str, Any], used: set[str]) -> str:
    """`` Other settings: `k=v`, ...`` for the parameters a sentence did not put in words (``""`` if none)."""
    rest = [f"`{k}={value_text(v)}`" for k, v in params.items() if k not in used and v is not None]
    return f" Other settings: {', '.join(rest)}." if rest else ""


def pick(params: Mapping[str, Any], *keys: str) -> tuple[str | None, Any]:
    """The first of ``keys`` that ``params`` holds a value for, and the value (``(None, None)`` if none)."""
    for k in keys:
        if k in params and params[k] is not None:
            return k, params[k]
    return None, None


def devices_text(requested: Any, used: Sequence[str] | None) -> str:
    """Where a method ran: the devices its records name (what was used), else the requested one; ``auto`` is
    never reported as if it were a device."""
    if used:
        names = sorted({str(d) for d in used if d})
        if names:
            return f" It ran on {join([f'`{d}`' for d in names])}."
    if requested is None:
        return ""
    if str(requested).lower() == "auto":
        return (" Device: chosen at run time (`auto`: the first CUDA GPU when one is available, otherwise the "
                "CPU).")
    return f" Device: `{requested}`."
