"""Whether two runs wrote the same outputs: every file under A against the file of the same name under B.

    python benchmarks/same_outputs.py A B [--roots RUN_A RUN_B]

Files are first compared byte for byte. Where the bytes differ, the content is compared with what varies from run
to run taken out: ``.h5`` dataset by dataset and attribute by attribute (HDF5 headers carry timestamps); JSON and TSV
without run times, memory, dates, hosts and commits (keys or columns named so, and the rows of a ``runtime_s`` or
``peak_memory_mb`` statistic); SVG, HTML and text with UUIDs, dates and matplotlib's random ids masked. The run
folders (``--roots``, default A and B) are masked in paths, and dates in file names. It prints the counts and each
remaining difference: what a reader has to explain. Issue 18 used it on the demo and an LPBA40 pair before and after
the restructure (``results/same-outputs/v1``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

VOLATILE_KEY = re.compile(r"(runtime|wall|seconds|_s$|time|date|memory|peak|created|finished|commit|command|host|"
                          r"machine|load_avg|record_file|GeneratedBy|started|elapsed|duration|pid|cpu)", re.I)
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?|\d{8}-\d{6}")
MPL_ID = re.compile(r"\b([mp][0-9a-f]{10}|clip[0-9a-f]+)\b")
DURATION = re.compile(r"\d+(\.\d+)?\s*(s|MiB|MB|ms|min)\b")


class Masker:
    """Masks the run folders and dates in strings."""

    def __init__(self, roots: tuple[Path, Path]):
        self.roots = [str(r) for r in roots]

    def text(self, value: str) -> str:
        for root in self.roots:
            value = value.replace(root, "<RUN>")
        return DATE.sub("<DATE>", value)

    def json(self, value):
        if isinstance(value, dict):
            return {k: self.json(v) for k, v in value.items() if not VOLATILE_KEY.search(k)}
        if isinstance(value, list):
            return [self.json(v) for v in value]
        return self.text(value) if isinstance(value, str) else value


def json_differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                for d in json_differences(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}")]
    return [] if a == b else [f"{path}: {str(a)[:90]!r} != {str(b)[:90]!r}"]


def h5_differences(a: Path, b: Path) -> list[str]:
    import h5py

    out: list[str] = []

    def walk(g, h, path: str) -> None:
        if set(g) != set(h):
            out.append(f"{path}: different members")
            return
        attrs = [{k: np.asarray(v).tolist() for k, v in x.attrs.items()} for x in (g, h)]
        if attrs[0] != attrs[1]:
            out.append(f"{path}: different attributes")
        for k in g:
            if isinstance(g[k], h5py.Group):
                walk(g[k], h[k], f"{path}/{k}")
            elif not np.array_equal(g[k][()], h[k][()]):
                out.append(f"{path}/{k}: different data")

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        walk(fa, fb, "")
    return out


def stable_table(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    frame = frame[[c for c in frame.columns if not VOLATILE_KEY.search(c)]]
    timing_rows = frame.isin(["runtime_s", "peak_memory_mb"]).any(axis=1)
    return frame[~timing_rows].reset_index(drop=True)


def difference(a: Path, b: Path, mask: Masker) -> str | None:
    """``None`` when the two files hold the same content, else what differs."""
    name = a.name
    if name.endswith(".json"):
        diffs = json_differences(mask.json(json.loads(a.read_bytes())), mask.json(json.loads(b.read_bytes())))
        return "; ".join(diffs[:4]) or None
    if name.endswith(".h5"):
        return "; ".join(h5_differences(a, b)[:3]) or None
    if name.endswith(".tsv"):
        ta, tb = stable_table(a), stable_table(b)
        return None if list(ta.columns) == list(tb.columns) and ta.equals(tb) else "table content"
    if name.endswith((".svg", ".html", ".log", ".md", ".txt", ".csv", ".bib")):
        def lines(path: Path) -> list[str]:
            return MPL_ID.sub("<ID>", UUID.sub("<UUID>", mask.text(path.read_text()))).splitlines()

        la, lb = lines(a), lines(b)
        changed = [(x, y) for x, y in zip(la, lb) if x != y]
        if not changed and len(la) == len(lb):
            return None
        beyond = [(x, y) for x, y in changed if DURATION.sub("<T>", x) != DURATION.sub("<T>", y)]
        example = f", e.g. {beyond[0][0][:110]!r} -> {beyond[0][1][:110]!r}" if beyond else ""
        return f"{len(changed)} lines ({len(beyond)} beyond run times){example}"
    return "bytes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--roots", nargs=2, type=Path, default=None, help="the two run folders, masked in paths")
    args = parser.parse_args()
    mask = Masker(tuple(args.roots or (args.a, args.b)))
    files = [{DATE.sub("<DATE>", str(p.relative_to(root))): p for p in root.rglob("*") if p.is_file()}
             for root in (args.a, args.b)]
    identical = same_content = 0
    notes = []
    for key in sorted(set(files[0]) | set(files[1])):
        if key not in files[0] or key not in files[1]:
            notes.append(f"only in {'A' if key in files[0] else 'B'}: {key}")
            continue
        a, b = files[0][key], files[1][key]
        if a.read_bytes() == b.read_bytes():
            identical += 1
            continue
        what = difference(a, b, mask)
        if what is None:
            same_content += 1
        else:
            notes.append(f"{key}: {what}")
    print(f"{identical} files identical byte for byte; {same_content} with the same content once run times, "
          f"dates, ids and run folders are masked; {len(notes)} different")
    for note in notes:
        print("  " + note)


if __name__ == "__main__":
    main()
