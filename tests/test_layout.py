"""The house rules of the package's layout (README "Layout"): layers import only the layers below them, Pydra and
Nipype only where the engine is wired, and no two modules share a name."""

import ast
from collections import Counter
from pathlib import Path

import hdar_pipeline

PACKAGE = Path(hdar_pipeline.__file__).parent

#: The layers, bottom first: a module may import its own subpackage and the layers of a lower rank, never one of the
#: same or a higher rank.
RANK = {"core": 0, "hdar": 1, "methods": 2, "evaluation": 3, "bids_io": 3, "reports": 4, "pipeline": 5, "engine": 6,
        "apps": 7}

#: Where a workflow engine may be imported: the engine wiring, and the BIDS App's runner that submits its workflow.
ENGINE_IMPORTERS = ("engine/", "apps/bids_app.py")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = set()
        for node in ast.walk(tree):  # function-level imports count too
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported |= {f"{node.module}.{a.name}" for a in node.names}
        yield rel, imported


def test_every_module_sits_in_a_layer_and_imports_only_lower_layers():
    wrong = []
    for rel, imported in _modules():
        if len(rel.parts) == 1:  # __init__.py and _version.py: the package's front door
            continue
        layer = rel.parts[0]
        assert layer in RANK, f"{rel}: in no layer (add the subpackage to RANK and README's Layout)"
        for name in imported:
            parts = name.split(".")
            if parts[0] != "hdar_pipeline" or len(parts) < 2 or parts[1] in ("_version", layer):
                continue
            if parts[1] in RANK and RANK[parts[1]] >= RANK[layer]:
                wrong.append(f"{rel} imports {name}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(set(wrong)))


def test_pydra_and_nipype_are_imported_only_where_the_engine_is_wired():
    wrong = [f"{rel} imports {name}" for rel, imported in _modules() for name in imported
             if name.split(".")[0] in ("pydra", "nipype") and not str(rel).startswith(ENGINE_IMPORTERS)]
    assert not wrong, "\n".join(wrong)


def test_no_two_modules_share_a_name():
    names = Counter(p.stem for p in PACKAGE.rglob("*.py") if p.stem != "__init__")
    packages = {p.parent.name for p in PACKAGE.rglob("__init__.py")}
    assert not [n for n, c in names.items() if c > 1], names
    assert not (set(names) & packages), set(names) & packages
    assert not (PACKAGE.parent / "workflows").exists()  # no folder outside the package remapped into it
