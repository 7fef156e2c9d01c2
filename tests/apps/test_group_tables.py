"""The BIDS App's group level on constructed participant-level results (no registration runs).

The derivatives are written by :func:`hdar_pipeline.bids_io.outputs.write_subject_derivatives` from records whose
metrics are chosen: six participants, methods hdar and syn, sub-03's syn folds 0.5 % of the brain,
sub-06's hdar has a low Dice (an outlier), sub-05's demons failed. The input dataset's participants.tsv
has age (integer), sex (string) and a group column with a missing value.
"""

from __future__ import annotations

import html.parser
import json
import os
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("NO_ET", "1")
pytest.importorskip("pydra")

from conftest import write_json  # noqa: E402


from hdar_pipeline.bids_io import outputs as bids_out  # noqa: E402
from hdar_pipeline.apps.bids_app_cli import bids_app_main  # noqa: E402
from hdar_pipeline.evaluation.group_tables import qc_flags, read_group_table  # noqa: E402
from hdar_pipeline.evaluation.stats import read_group_table as stats_reader  # noqa: E402

SPACE = "test"
SUBJECTS = ["01", "02", "03", "04", "05", "06"]
NAMES = {1: "outer", 2: "middle", 3: "inner"}


def _dice(sub: str, method: str) -> float:
    base = {"hdar": 0.80, "syn": 0.75}[method] + 0.01 * SUBJECTS.index(sub)
    return 0.30 if (sub, method) == ("06", "hdar") else base


def make_dataset(root: Path, *, names: bool = True) -> tuple[Path, Path]:
    """(bids_dir, output_dir) with the participant-level results described in the module docstring."""
    bids_dir, out, work = root / "rawdata", root / "derivatives", root / "records"
    write_json(bids_dir / "dataset_description.json", {"Name": "constructed", "BIDSVersion": "1.9.0"})
    (bids_dir / "participants.tsv").write_text(
        "participant_id\tage\tsex\tgroup\n" + "".join(
            f"sub-{s}\t{30 + i}\t{'F' if i % 2 else 'M'}\t{'n/a' if s == '04' else 'patient'}\n"
            for i, s in enumerate(SUBJECTS)))
    write_json(bids_dir / "participants.json", {"age": {"Description": "age at the scan", "Units": "year"},
                                                "sex": {"Description": "sex", "Levels": {"F": "female",
                                                                                        "M": "male"}}})
    for sub in SUBJECTS:
        for method in ("hdar", "syn"):
            dice = _dice(sub, method)
            table = work / f"{sub}_{method}.csv"
            table.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame({"subject": sub, "session": "", "method": method, "label": [1, 2, 3],
                          "name": [NAMES[k] if names else "" for k in (1, 2, 3)],
                          "dice": [dice - 0.02, dice, dice + 0.02], "hd95_mm": [2.0, 3.0, float("nan")],
                          "flag": "", "runtime_s": 10.0}).to_csv(table, index=False)
            folded = 0.5 if (sub, method) == ("03", "syn") else 0.01
            bids_out.write_subject_derivatives(
                {"subject": sub, "session": "", "method": method, "status": "ok", "evaluated": True,
                 "labels_csv": str(table), "runtime_s": 10.0, "folded_percent": folded / 2,
                 "metrics": {"mean_dice": dice, "mean_hd95_mm": 2.5, "folded_percent": folded / 2,
                             "folded_percent_mask": folded}}, out, space=SPACE)
    bids_out.write_subject_derivatives({"subject": "05", "session": "", "method": "demons", "status": "error",
                                    "error": "sub-05_T1w.nii.gz:\tcannot be read\nsecond line",
                                    "failed_step": "register"}, out, space=SPACE)
    for sub in SUBJECTS[:-1]:  # sub-06 has no report
        (out / f"sub-{sub}.html").write_text("<html>report</html>")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / "CITATION.md").write_text("Registered with hdar and syn.\n")
    return bids_dir, out


def run_group(bids_dir: Path, out: Path, *extra: str) -> int:
    return bids_app_main([str(bids_dir), str(out), "group", "--work-dir", str(out.parent / "work"), *extra])


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    bids_dir, out = make_dataset(root)
    legacy = out / "group" / "group.csv"  # an earlier version's table
    legacy.parent.mkdir(parents=True)
    legacy.write_text("subject,method\n01,hdar\n")
    code = run_group(bids_dir, out)
    return {"code": code, "bids": bids_dir, "out": out, "group": out / "group"}


def test_per_subject_tables_are_tsv(grouped):
    anat = grouped["out"] / "sub-02" / "anat"
    tsv = anat / f"sub-02_space-{SPACE}_desc-hdar_metrics.tsv"
    assert tsv.is_file() and not tsv.with_suffix(".csv").exists()
    table = pd.read_csv(tsv, sep="\t")
    assert list(table["label"]) == [1, 2, 3] and table["hd95_mm"].isna().iloc[-1]
    assert "n/a" in tsv.read_text().splitlines()[-1].split("\t")
    assert json.loads(tsv.with_suffix(".json").read_text())["files"]["metrics_tsv"] == tsv.name
    failed = anat.parent.parent / "sub-05" / "anat" / f"sub-05_space-{SPACE}_desc-demons_metrics.tsv"
    assert not failed.exists() and failed.with_suffix(".json").is_file()


def test_plain_pandas_reads_ids_as_strings_and_labels_as_integers(grouped):
    assert grouped["code"] == 0
    group = pd.read_csv(grouped["group"] / "group.tsv", sep="\t")
    labels = pd.read_csv(grouped["group"] / "group_labels.tsv", sep="\t")
    for table in (group, labels):
        assert list(table.columns[:3]) == ["participant_id", "session_id", "method"]
        assert table["participant_id"].map(type).eq(str).all()
        assert table["session_id"].isna().all()  # n/a: no sessions
    assert sorted(group["participant_id"].unique()) == [f"sub-{s}" for s in SUBJECTS]
    assert labels["label"].dtype == np.int64 and sorted(labels["label"].unique()) == [1, 2, 3]
    assert len(labels) == len(SUBJECTS) * 2 * 3  # the failed demons row has no label rows
    assert group["qc_folding"].dtype == bool and group["age"].dtype == np.int64
    # one format: no CSV left in the group folder, the earlier version's included
    assert not list(grouped["group"].glob("*.csv"))
    # a failed row's message keeps one line and one cell
    error = group.loc[group["method"] == "demons", "error"].iloc[0]
    assert error == "sub-05_T1w.nii.gz: cannot be read second line"


def test_read_group_table_restores_the_types_from_the_dictionary(grouped):
    group = stats_reader(grouped["group"] / "group.tsv")
    assert stats_reader is read_group_table
    assert group["participant_id"].tolist()[0] == "sub-01"
    assert group["evaluated"].dtype == bool and group["qc_dice_outlier"].dtype == bool
    assert group["sex"].map(type).eq(str).all() and group["age"].dtype == np.int64
    assert group.loc[group["participant_id"] == "sub-04", "group"].isna().all()
    assert pd.api.types.is_string_dtype(group["group"].dropna())
    labels = read_group_table(grouped["group"] / "group_labels.tsv")
    assert labels["label"].dtype == np.int64 and labels["dice"].dtype == float
    assert labels["name"].dropna().isin(NAMES.values()).all()


def test_dictionary_describes_every_column(grouped):
    for stem in ("group", "group_labels"):
        table = pd.read_csv(grouped["group"] / f"{stem}.tsv", sep="\t", nrows=1)
        dictionary = json.loads((grouped["group"] / f"{stem}.json").read_text())
        assert list(dictionary) == list(table.columns)
        assert all(entry["Description"] and entry["Format"] for entry in dictionary.values())
    dictionary = json.loads((grouped["group"] / "group.json").read_text())
    assert dictionary["participant_id"]["Format"] == "string"
    assert set(dictionary["method"]["Levels"]) == {"hdar", "syn", "demons"}
    assert set(dictionary["status"]["Levels"]) == {"ok", "error"}
    assert dictionary["runtime_s"]["Units"] == "s" and dictionary["qc_folding"]["Format"] == "boolean"
    # participants.json's entries come along
    assert dictionary["age"]["Units"] == "year" and dictionary["sex"]["Levels"] == {"F": "female", "M": "male"}


def test_participants_columns_are_merged(grouped):
    group = read_group_table(grouped["group"] / "group.tsv")
    assert list(group.columns[:6]) == ["participant_id", "session_id", "method", "age", "sex", "group"]
    by_subject = group.drop_duplicates("participant_id").set_index("participant_id")
    assert by_subject.loc["sub-03", "age"] == 32 and by_subject.loc["sub-02", "sex"] == "F"


def test_qc_flags(grouped):
    group = read_group_table(grouped["group"] / "group.tsv").set_index(["participant_id", "method"])
    assert group.index[group["qc_folding"]].tolist() == [("sub-03", "syn")]
    assert group.index[group["qc_dice_outlier"]].tolist() == [("sub-06", "hdar")]
    assert group.index[group["qc_failed"]].tolist() == [("sub-05", "demons")]


def test_qc_flag_rules_on_a_table():
    group = pd.DataFrame({"method": ["a"] * 5 + ["b"] * 2, "status": ["ok"] * 6 + ["error"],
                          "mean_dice": [0.8, 0.81, 0.82, 0.79, 0.5, 0.1, np.nan],
                          "folded_percent": [0.0, 0.3, 0.0, 0.0, 0.0, 0.0, np.nan],
                          "folded_percent_mask": [0.05, np.nan, 0.2, 0.0, 0.0, 0.0, np.nan]})
    flags = qc_flags(group, folding_threshold=0.1)
    # the mask's value first, the grid's where a row has none
    assert flags["qc_folding"].tolist() == [False, True, True, False, False, False, False]
    # an outlier of method a only; b's single ok subject is not compared with a's
    assert flags["qc_dice_outlier"].tolist() == [False, False, False, False, True, False, False]
    assert flags["qc_failed"].tolist() == [False] * 6 + [True]
    assert not qc_flags(group, folding_threshold=0.25)["qc_folding"].iloc[2]


def test_folding_threshold_option(grouped, tmp_path):
    bids_dir, out = make_dataset(tmp_path)
    assert run_group(bids_dir, out, "--qc-folding-threshold", "1") == 0
    assert not read_group_table(out / "group" / "group.tsv")["qc_folding"].any()
    assert run_group(bids_dir, out, "--qc-folding-threshold", "0") == 0
    flagged = read_group_table(out / "group" / "group.tsv")["qc_folding"]
    assert flagged.sum() == len(SUBJECTS) * 2  # every ok row folds a little


def test_statistics_are_tsv_with_the_reference(grouped, tmp_path):
    paired = pd.read_csv(grouped["group"] / "paired.tsv", sep="\t")
    assert set(paired["reference"]) == {"hdar"} and set(paired["method"]) == {"syn"}
    excluded = pd.read_csv(grouped["group"] / "excluded.tsv", sep="\t")
    assert excluded[["subject", "method"]].values.tolist() == [["sub-05", "demons"]]
    bids_dir, out = make_dataset(tmp_path)
    assert run_group(bids_dir, out, "--reference", "syn") == 0
    paired = pd.read_csv(out / "group" / "paired.tsv", sep="\t")
    assert set(paired["reference"]) == {"syn"} and set(paired["method"]) == {"hdar"}


def test_a_reference_without_results_is_refused(grouped, capsys):
    before = {p: p.stat().st_mtime_ns for p in grouped["group"].iterdir()}
    assert run_group(grouped["bids"], grouped["out"], "--reference", "affine") == 2
    err = capsys.readouterr().err
    assert "--reference affine" in err and "demons, hdar, syn" in err
    assert {p: p.stat().st_mtime_ns for p in grouped["group"].iterdir()} == before  # nothing rewritten


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("href", "src"):
                self.targets.append(value)


def test_group_html_links_everything_that_exists(grouped):
    page = grouped["group"] / "group.html"
    text = page.read_text()
    parser = _Links()
    parser.feed(text)
    targets = {(page.parent / unquote(t)).resolve() for t in parser.targets}
    assert not any(t.startswith(("http:", "https:", "//")) for t in parser.targets)  # nothing fetched
    missing = [t for t in targets if not t.is_file()]
    assert not missing, missing
    out = grouped["out"].resolve()
    assert {out / f"sub-{s}.html" for s in SUBJECTS[:-1]} <= targets  # every report there is
    assert out / "logs" / "CITATION.md" in targets and "Registered with hdar and syn." in text
    group = grouped["group"].resolve()
    assert {group / n for n in ("group.tsv", "group.json", "group_labels.tsv", "summary.tsv", "paired.tsv")} <= targets
    assert any(t.parent == group and t.suffix == ".png" for t in targets)  # the group figures
    assert "no report" in text  # sub-06


def test_missing_label_names_warn(tmp_path, capsys):
    bids_dir, out = make_dataset(tmp_path, names=False)
    assert run_group(bids_dir, out) == 0
    assert "label names are missing" in capsys.readouterr().err
    for stem in ("group", "group_labels"):
        entry = json.loads((out / "group" / f"{stem}.json").read_text())
        if stem == "group_labels":
            assert "dseg.tsv" in entry["name"]["Description"] and "Warning" in entry["name"]["Description"]
    assert "label names are missing" in (out / "group" / "group.html").read_text()


def test_no_warning_with_label_names(grouped):
    assert "label names are missing" not in (grouped["group"] / "group.html").read_text()
    assert "Warning" not in json.loads((grouped["group"] / "group_labels.json").read_text())["name"]["Description"]
