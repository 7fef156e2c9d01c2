"""Label tables: integer label values and their names.

Two formats are read:

* a BIDS segmentation look-up table (``*_dseg.tsv``): tab-separated, with a header that has at
  least the columns ``index`` and ``name`` (other columns such as ``abbreviation`` or ``color`` are
  ignored);
* a FreeSurfer colour look-up table (``FreeSurferColorLUT.txt`` and its relatives): whitespace-separated
  lines ``index name R G B A``, ``#`` starts a comment, blank lines are skipped.

The format is detected from the content, not the file name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

PathLike = str | os.PathLike


class LabelTableError(ValueError):
    """A label table cannot be read. The message names the file and the problem."""

    def __init__(self, source: PathLike, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class LabelTable(dict):
    """``{label: name}`` read from a file; ``format`` is ``"bids"`` (a ``dseg.tsv``, which lists the labels
    of one segmentation) or ``"freesurfer"`` (a colour LUT, which names far more labels than any one
    image holds)."""

    format: str = "bids"
    source: str = ""


def read_label_table(path: PathLike) -> LabelTable:
    """Read label names from a BIDS ``dseg.tsv`` or a FreeSurfer colour LUT.

    Parameters
    ----------
    path : path-like
        The table file.

    Returns
    -------
    LabelTable
        A dict, label value -> name, in file order, with the attributes ``format`` (``"bids"`` or
        ``"freesurfer"``) and ``source`` (the path). Label 0 is kept if the file lists it (callers decide
        whether background is evaluated; :func:`hdar_pipeline.evaluation.evaluate.evaluate` never evaluates 0).

    Raises
    ------
    LabelTableError
        Missing file, no usable rows, a non-integer index, or the same index listed twice with
        different names.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelTableError(path, "label table not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelTableError(path, f"cannot be read as text ({exc})") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise LabelTableError(path, "label table is empty")
    header = [h.strip().lower() for h in lines[0].split("\t")]
    if "index" in header and "name" in header:
        table, fmt = _parse_bids(lines, header, path), "bids"
    else:
        table, fmt = _parse_freesurfer(lines, path), "freesurfer"
    if not table:
        raise LabelTableError(path, "label table has no rows")
    out = LabelTable(table)
    out.format = fmt
    out.source = str(path)
    return out


def _add(table: dict[int, str], index: int, name: str, path: Path, lineno: int) -> None:
    if index in table and table[index] != name:
        raise LabelTableError(path, f"line {lineno}: label {index} listed twice "
                                    f"({table[index]!r} and {name!r})")
    table[index] = name


def _parse_index(value: str, path: Path, lineno: int) -> int:
    try:
        number = float(value)
    except ValueError:
        raise LabelTableError(path, f"line {lineno}: index {value!r} is not an integer") from None
    if number != int(number) or number < 0:
        raise LabelTableError(path, f"line {lineno}: index {value!r} is not a non-negative integer")
    return int(number)


def _parse_bids(lines: list[str], header: list[str], path: Path) -> dict[int, str]:
    i_index, i_name = header.index("index"), header.index("name")
    table: dict[int, str] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) <= max(i_index, i_name):
            raise LabelTableError(path, f"line {lineno}: expected {len(header)} tab-separated columns, "
                                        f"got {len(fields)}")
        _add(table, _parse_index(fields[i_index].strip(), path, lineno), fields[i_name].strip(), path, lineno)
    return table


def _parse_freesurfer(lines: list[str], path: Path) -> dict[int, str]:
    table: dict[int, str] = {}
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if len(fields) < 2:
            raise LabelTableError(path, f"line {lineno}: expected 'index name R G B A' (FreeSurfer LUT) or a "
                                        "BIDS dseg.tsv header with 'index' and 'name' columns")
        _add(table, _parse_index(fields[0], path, lineno), fields[1], path, lineno)
    return table


def label_names(labels: Iterable[int], table: Mapping[int, str] | None) -> list[str]:
    """Names of ``labels`` from ``table``; ``""`` for a label the table does not list (or no table)."""
    table = table or {}
    return [table.get(int(lab), "") for lab in labels]


def write_label_table(table: Mapping[int, str], path: PathLike) -> Path:
    """Write ``table`` as a BIDS ``dseg.tsv`` (columns ``index``, ``name``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["index\tname"] + [f"{int(k)}\t{v}" for k, v in table.items()]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path
