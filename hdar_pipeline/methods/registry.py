"""The method registry: the one list of registration methods, and what each says about itself.

Each method module declares a :class:`MethodSpec` named ``SPEC`` (its name, title, presets, how it is built, its
benchmark variants and its sentence in the methods paragraph); :data:`METHOD_MODULES` lists those modules, one line
per method, in the order the command lines offer them. Everything that names the methods is built from here: the
``hdar register`` and ``hdar demo`` choices and ``--preset`` help, the BIDS App's ``--methods`` and
``--<method>-preset`` options (and :class:`~hdar_pipeline.apps.bids_app.AppOptions`' preset fields),
:func:`hdar_pipeline.methods.get_method`, the Pydra task and Nipype interface, the cohort workflow's check, the
benchmark's variants and the methods paragraph. Adding a method is one module with its ``SPEC`` and one line here.

The method modules are cheap to import (no antspyx, torch or SimpleITK at module level: they import those where
they run), so the command-line parsers can read the registry.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

if TYPE_CHECKING:  # pragma: no cover
    from hdar_pipeline.methods.base import RegistrationMethod
    from hdar_pipeline.methods.text import Reference, SentenceContext

#: One line per method: the module holding its :class:`MethodSpec` (``SPEC``), in the order methods are offered.
METHOD_MODULES: list[str] = [
    "hdar_pipeline.methods.affine",
    "hdar_pipeline.methods.syn",
    "hdar_pipeline.methods.demons",
    "hdar_pipeline.methods.lcc_demons",
    "hdar_pipeline.methods.fireants",
    "hdar_pipeline.methods.hdar_method",
    "hdar_pipeline.methods.voxelmorph_method",
]

#: The method every entry point runs when none is named: the best measured (README, "Accuracy").
DEFAULT_METHOD = "hdar"


@dataclass(frozen=True)
class BenchmarkVariant:
    """One row of ``hdar benchmark``'s table for a method.

    Attributes
    ----------
    name : str
        The variant's name (``--variants``), unique over all methods.
    preset : str, optional
        The preset it runs (``None``: the method's default).
    options : mapping
        Extra constructor options (learned methods only).
    description : str
        The table's description of the variant.
    order : float
        Where the variant sits in the table (ascending; cheap methods first, the reference, SyN quality, last).
    """

    name: str
    preset: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    order: float = 80.0


#: A method's benchmark variants: a sequence, or a function of the benchmark's ``refine_steps`` (``--refine-steps``,
#: the instance-optimisation steps of the learned methods' refined variants).
Variants = Union[Sequence[BenchmarkVariant], Callable[[int], Sequence[BenchmarkVariant]]]


@dataclass(frozen=True)
class MethodSpec:
    """What a registration method says about itself (its module's ``SPEC``).

    Attributes
    ----------
    name : str
        The name every interface uses (``--method NAME``, ``get_method(NAME)``, ``desc-NAME`` in derivatives).
    title : str
        How texts and reports name it (``"ANTs SyN"``).
    method_class : type
        The :class:`~hdar_pipeline.methods.base.MethodBase` dataclass. It is built with ``seed`` and ``threads``,
        ``preset`` when the method has presets, ``device`` when it uses one, and the options given; its init
        fields are the options it accepts.
    describe : callable
        ``describe(params, preset, context) -> str``: the method's sentence in the methods paragraph, from the
        parameters it ran with (``params``), its preset (``""`` when none) and a
        :class:`~hdar_pipeline.methods.text.SentenceContext` (versions, the citer, weights, devices).
    references : tuple of Reference
        The works its sentence cites (keys the citer must know; shared ones may repeat across methods).
    presets : mapping
        Preset name -> one-line help, in display order (``--<name>-preset``'s help); empty: no presets.
    default_preset : str, optional
        The preset used when none is given (one of ``presets``).
    presets_summary : str, optional
        The method's part of ``hdar register --preset``'s help, after ``NAME p1|p2``; default
        ``"default <default_preset>"``.
    presets_note : str
        Appended to the BIDS App's ``--<name>-preset`` help after a colon (what all presets share).
    install : str
        How to install what the method needs beyond the package's dependencies, shown in the BIDS App's help.
    default_weights : str, optional
        For a learned method (trained weights, HDAR's inference options: ``--weights``, ``--refine`` ...), the
        shipped weights it loads by default; ``None`` for the classical methods.
    uses_device : bool
        Whether it runs on a ``device`` (``auto``, ``cpu``, ``cuda[:N]``; PyTorch).
    inverse : str
        How the inverse of its transform is obtained, as the methods text says it: ``"numerical"`` (the default:
        the pipeline inverts the displacement field by Newton's method, :mod:`hdar_pipeline.core.inverse`),
        ``"exact"`` (an affine, inverted exactly), or the words naming the method's own inverse
        (``"SyN's own inverse"``), for a method whose transform carries it.
    variants : sequence or callable
        Its ``hdar benchmark`` variants (:class:`BenchmarkVariant`), or a function of the benchmark's
        ``refine_steps`` returning them.
    """

    name: str
    title: str
    method_class: type
    describe: Callable[[Mapping[str, Any], str, "SentenceContext"], str]
    references: tuple["Reference", ...] = ()
    presets: Mapping[str, str] = field(default_factory=dict)
    default_preset: str | None = None
    presets_summary: str | None = None
    presets_note: str = ""
    install: str = ""
    default_weights: str | None = None
    uses_device: bool = False
    inverse: str = "numerical"
    variants: Variants = ()

    def __post_init__(self) -> None:
        if self.presets and self.default_preset not in self.presets:
            raise ValueError(f"method {self.name!r}: default preset {self.default_preset!r} is not one of its "
                             f"presets ({', '.join(self.presets)})")
        if not self.presets and self.default_preset is not None:
            raise ValueError(f"method {self.name!r} has no presets but a default preset")

    @property
    def learned(self) -> bool:
        """Whether the method loads trained weights and takes HDAR's inference options."""
        return self.default_weights is not None

    @property
    def options(self) -> list[str]:
        """The constructor options it accepts (its class's init fields)."""
        return [f.name for f in dataclasses.fields(self.method_class) if f.init]

    def build(self, *, preset: str | None = None, seed: int | None = None, threads: int | None = None,
              device: str | None = None, options: Mapping[str, Any] | None = None) -> "RegistrationMethod":
        """The method with these settings (see :func:`hdar_pipeline.methods.get_method`).

        Raises
        ------
        ValueError
            A preset for a method without presets, or an option the method does not have.
        """
        if not self.presets and preset not in (None, "default"):
            raise ValueError(f"method {self.name!r} has no presets (got preset {preset!r})")
        opts = dict(options or {})
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            raise ValueError(f"method {self.name!r} has no option(s) {', '.join(unknown)}; its options: "
                             f"{', '.join(sorted(self.options))}")
        kwargs: dict[str, Any] = {"seed": seed, "threads": threads}
        if self.presets:
            kwargs["preset"] = preset or self.default_preset
        if self.uses_device:
            kwargs["device"] = device or "auto"
        return self.method_class(**{**kwargs, **opts})

    def benchmark_variants(self, refine_steps: int) -> list[BenchmarkVariant]:
        """Its benchmark variants for this ``refine_steps``."""
        return list(self.variants(refine_steps) if callable(self.variants) else self.variants)

    def preset_help(self) -> str:
        """The BIDS App's ``--<name>-preset`` help: each preset with its help, the default marked (unless its
        name or help already says so)."""
        parts = [f"{p} ({'' if 'default' in (p + h).lower() or p != self.default_preset else 'default: '}{h})"
                 for p, h in self.presets.items()]
        listed = ", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else "".join(parts)
        return (f"{self.title}{f' ({self.install})' if self.install else ''}: {listed}"
                + (f": {self.presets_note}" if self.presets_note else ""))

    def presets_line(self) -> str:
        """The method's part of ``hdar register --preset``'s help: ``NAME p1|p2 (summary)``."""
        summary = self.presets_summary or f"default {self.default_preset}"
        return f"{self.name} {'|'.join(self.presets)} ({summary})"


def method_specs() -> list[MethodSpec]:
    """The registered methods' specs, in :data:`METHOD_MODULES` order.

    Raises
    ------
    ValueError
        Two modules declare the same method name, or :data:`DEFAULT_METHOD` is not registered.
    """
    specs = [importlib.import_module(module).SPEC for module in METHOD_MODULES]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two registered methods share a name: {', '.join(names)}")
    if DEFAULT_METHOD not in names:
        raise ValueError(f"the default method {DEFAULT_METHOD!r} is not registered")
    return specs


def method_names() -> list[str]:
    """The registered methods' names, in registry order."""
    return [s.name for s in method_specs()]


def specs_by_name() -> dict[str, MethodSpec]:
    """Name -> spec of the registered methods, in registry order."""
    return {s.name: s for s in method_specs()}


def method_spec(name: str) -> MethodSpec:
    """The spec of the method called ``name``.

    Raises
    ------
    ValueError
        No method has that name.
    """
    spec = specs_by_name().get(name)
    if spec is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(method_names())}")
    return spec


def specs_with_presets() -> list[MethodSpec]:
    """The methods that have presets (each has a ``--<name>-preset`` option in the BIDS App)."""
    return [s for s in method_specs() if s.presets]


def presets_help() -> str:
    """``hdar register --preset``'s help."""
    return "method preset: " + ", ".join(s.presets_line() for s in specs_with_presets())


def presets_text() -> str:
    """Each method's presets in one parenthesis-free phrase (for the Pydra task and Nipype interface docs):
    ``syn: fast or quality; ...``."""
    def listed(names: list[str]) -> str:
        return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)

    return "; ".join(f"{s.name}: {listed(list(s.presets))}" for s in specs_with_presets())


__all__ = ["BenchmarkVariant", "DEFAULT_METHOD", "METHOD_MODULES", "MethodSpec", "method_names", "method_spec",
           "method_specs", "presets_help", "presets_text", "specs_by_name", "specs_with_presets"]
