"""The method registry (hdar_pipeline.methods.registry): adding a method is one module plus one registry line, and
every entry point's default method is the registry's DEFAULT_METHOD."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import textwrap

import pytest

from hdar_pipeline.methods import registry
from hdar_pipeline.methods.registry import DEFAULT_METHOD

#: A complete method module: an identity transform, two presets, one benchmark variant, its own reference.
TOY_MODULE = '''
from dataclasses import dataclass
from typing import ClassVar

from hdar_pipeline.core.images import Grid
from hdar_pipeline.core.transforms import Transform
from hdar_pipeline.methods.base import MethodBase
from hdar_pipeline.methods.registry import BenchmarkVariant, MethodSpec
from hdar_pipeline.methods.text import Reference, other_parameters


@dataclass
class IdentityMethod(MethodBase):
    name: ClassVar[str] = "toyidentity"
    preset: str = "still"
    stillness: float = 1.0
    seed: int | None = None
    threads: int | None = None

    def _register(self, fixed, moving, fixed_mask):
        return Transform.identity(fixed)


TOY2024 = Reference("toy2024", "Toy T. Doing nothing, exactly. *Journal of Null Results*. 2024;1:1.",
                    "Toy 2024", "article", {"author": "Toy, T.", "title": "Doing nothing, exactly",
                                            "journal": "Journal of Null Results", "year": "2024"})


def describe(params, preset, context):
    return ("Nothing moved: the identity transform " + context.cite("toy2024") + "."
            + (f" Preset: `{preset}`." if preset else "") + other_parameters(params, {"preset", "seed"}))


SPEC = MethodSpec(name="toyidentity", title="Toy Identity", method_class=IdentityMethod, describe=describe,
                  references=(TOY2024,), presets={"still": "no motion at all", "stiller": "even less"},
                  default_preset="still", inverse="the identity's own inverse, itself",
                  variants=(BenchmarkVariant("toyidentity", "stiller", {}, "the identity, a floor", order=5),))
'''


@pytest.fixture
def toy_registered(tmp_path, monkeypatch):
    """The toy module written under tmp_path and its line added to the registry, nothing else."""
    (tmp_path / "toy_identity_method.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "METHOD_MODULES", [*registry.METHOD_MODULES, "toy_identity_method"])
    yield
    sys.modules.pop("toy_identity_method", None)


def test_a_method_is_one_module_and_one_registry_line(toy_registered, tmp_path, capsys):
    from hdar_pipeline.apps.benchmark.runner import build_method, default_variants
    from hdar_pipeline.apps.bids_app_cli import build_bids_app_parser
    from hdar_pipeline.apps.cli import build_parser
    from hdar_pipeline.methods import get_method, method_names
    from hdar_pipeline.reports.methods_text import bibtex, cited_keys, method_title, methods_paragraph, references

    assert "toyidentity" in method_names() and method_title("toyidentity") == "Toy Identity"
    # hdar register: --method and --preset
    args = build_parser().parse_args(["register", "f.nii.gz", "m.nii.gz", "-o", str(tmp_path), "--method",
                                      "toyidentity", "--preset", "stiller"])
    assert (args.method, args.preset) == ("toyidentity", "stiller")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["register", "--help"])
    assert "toyidentity still|stiller (default still)" in " ".join(capsys.readouterr().out.split())
    # the BIDS App: --methods and its own --toyidentity-preset
    app = build_bids_app_parser()
    args = app.parse_args(["bids", "out", "participant", "--methods", "toyidentity", "--toyidentity-preset",
                           "stiller"])
    assert args.methods == ["toyidentity"] and args.toyidentity_preset == "stiller"
    assert app.parse_args(["bids", "out", "participant"]).toyidentity_preset == "still"
    with pytest.raises(SystemExit):
        app.parse_args(["bids", "out", "participant", "--toyidentity-preset", "moving"])
    assert "Toy Identity: still (default: no motion at all) or stiller (even less)" in " ".join(
        app.format_help().split())
    # get_method, with its presets and options checked
    method = get_method("toyidentity", preset="stiller", seed=2, options={"stillness": 0.5})
    assert type(method).__name__ == "IdentityMethod" and method.preset == "stiller" and method.stillness == 0.5
    assert get_method("toyidentity").preset == "still"
    with pytest.raises(ValueError, match="no option"):
        get_method("toyidentity", options={"refine": 3})
    # the benchmark: its variant, placed by its order (before affine)
    variants = default_variants()
    assert list(variants)[0] == "toyidentity" and variants["toyidentity"].method == "toyidentity"
    assert build_method(variants["toyidentity"], seed=0, threads=1).preset == "stiller"
    # the methods paragraph: its sentence, its title and its own reference
    text = methods_paragraph(methods=["toyidentity", "demons"], parameters={"toyidentity": method.parameters},
                             presets={"toyidentity": "stiller"}, atlas_description="a phantom",
                             versions={"python": "3"})
    assert "using Toy Identity and Diffeomorphic Demons." in text
    assert "Nothing moved: the identity transform (Toy 2024). Preset: `stiller`. Other settings: `stillness=0.5`" in text
    assert "1. Toy T. Doing nothing, exactly." in text
    assert ("the identity's own inverse, itself and for the other methods the displacement field inverted by "
            "Newton's method") in text
    assert cited_keys(text)[0] == "toy2024" and "toy2024" in references()
    assert "@article{toy2024," in bibtex(cited_keys(text))


def test_without_the_line_the_method_is_nowhere(tmp_path):
    from hdar_pipeline.apps.bids_app_cli import build_bids_app_parser
    from hdar_pipeline.methods import get_method

    with pytest.raises(ValueError, match="unknown method 'toyidentity'"):
        get_method("toyidentity")
    with pytest.raises(SystemExit):
        build_bids_app_parser().parse_args(["bids", "out", "participant", "--methods", "toyidentity"])


def test_two_methods_with_one_name_are_refused(monkeypatch):
    monkeypatch.setattr(registry, "METHOD_MODULES", [*registry.METHOD_MODULES, "hdar_pipeline.methods.syn"])
    with pytest.raises(ValueError, match="share a name"):
        registry.method_specs()


def test_every_default_method_is_the_registry_default():
    import attrs

    from hdar_pipeline.apps.bids_app import AppOptions
    from hdar_pipeline.apps.bids_app_cli import build_bids_app_parser
    from hdar_pipeline.apps.cli import build_parser
    from hdar_pipeline.engine.nipype_interfaces import Register as NipypeRegister
    from hdar_pipeline.engine.pydra_tasks import Register as PydraRegister
    from hdar_pipeline.pipeline.registration import register, register_files

    assert DEFAULT_METHOD == "hdar"
    assert build_parser().parse_args(["register", "f.nii.gz", "m.nii.gz", "-o", "out"]).method == DEFAULT_METHOD
    for function in (register_files, register):
        assert inspect.signature(function).parameters["method"].default == DEFAULT_METHOD
    assert {f.name: f.default for f in attrs.fields(PydraRegister)}["method"] == DEFAULT_METHOD
    assert NipypeRegister().inputs.method == DEFAULT_METHOD
    # the App runs several methods; the default one is among its defaults, first
    assert build_bids_app_parser().parse_args(["bids", "out", "participant"]).methods[0] == DEFAULT_METHOD
    assert AppOptions(bids_dir="bids", output_dir="out", analysis_level="participant").methods[0] == DEFAULT_METHOD


def test_the_app_options_have_one_preset_field_per_method_with_presets():
    from hdar_pipeline.apps.bids_app import AppOptions, method_presets

    names = [f.name for f in dataclasses.fields(AppOptions)]
    presets = [n for n in names if n.endswith("_preset")]
    assert presets == [f"{s.name}_preset" for s in registry.specs_with_presets()]
    assert names.index(presets[0]) == names.index("methods") + 1
    opts = AppOptions(bids_dir="bids", output_dir="out", analysis_level="participant")
    assert method_presets(opts) == {s.name: s.default_preset for s in registry.specs_with_presets()}


def test_building_the_parsers_and_the_registry_loads_no_ants_and_no_torch():
    code = textwrap.dedent("""
        import sys
        from hdar_pipeline.apps.bids_app_cli import build_bids_app_parser
        from hdar_pipeline.apps.cli import build_parser
        from hdar_pipeline.methods.registry import method_specs

        build_parser(); build_bids_app_parser()
        assert len(method_specs()) >= 7
        heavy = [m for m in ("ants", "torch", "SimpleITK") if m in sys.modules]
        assert not heavy, heavy
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
