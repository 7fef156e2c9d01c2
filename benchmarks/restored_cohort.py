"""Write LPBA40 subjects re-stored in scanner frames as a BIDS dataset with a labels derivatives dataset.

Each subject is stored in one of :data:`hdar_pipeline.core.restoring.FRAMES` (other than ``native``) in turn: other axis
orders, fields of view with the brain off-centre, voxel sizes of 0.9-1.3 mm, int16 with a scale and an intensity
offset. The anatomy in world space is LPBA40's; the labels are re-stored with nearest neighbour into the same
frame. The datasets are for local benchmarks only (LONI's terms forbid redistributing LPBA40): write them outside
the project.

Usage::

    python benchmarks/restored_cohort.py --lpba40 ../shared/data/lpba40 -o /tmp/lpba40-bids --subjects S01 S02 S03

then, for example::

    hdar-pipeline /tmp/lpba40-bids/rawdata out participant --labels-dir /tmp/lpba40-bids/labels \\
        --atlas-participant S01 --methods hdar demons
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from hdar_pipeline.core.restoring import FRAMES, restore

#: The frames subjects are stored in, in turn (the first subject gets the first).
COHORT_FRAMES = ("asl-offcentre", "ras-int16", "psr-0.9mm", "las-1.3mm")


def write_cohort(lpba40: Path, output: Path, subjects: Sequence[str],
                 frames: Sequence[str] = COHORT_FRAMES) -> dict[str, str]:
    """Write ``output/rawdata`` (BIDS) and ``output/labels`` (derivatives); returns ``{subject: frame}``."""
    raw, labels = output / "rawdata", output / "labels"
    for folder, description in (
            (raw, {"Name": "LPBA40 re-stored in scanner frames", "BIDSVersion": "1.9.0"}),
            (labels, {"Name": "LPBA40 manual labels, re-stored with the images", "BIDSVersion": "1.9.0",
                      "DatasetType": "derivative", "GeneratedBy": [{"Name": "LONI manual delineation"}]})):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n")
    (raw / "README").write_text("LPBA40 subjects re-stored in scanner frames by benchmarks/restored_cohort.py "
                                "(local benchmark data; LPBA40 may not be redistributed).\n")
    chosen: dict[str, str] = {}
    for k, subject in enumerate(subjects):
        frame = FRAMES[frames[k % len(frames)]]
        src = lpba40 / subject / f"{subject}.delineation.skullstripped.nii.gz"
        lab = lpba40 / subject / f"{subject}.delineation.structure.label.nii.gz"
        image, label = restore(nib.load(str(src)), frame), restore(nib.load(str(lab)), frame, labels=True)
        stored = np.asarray(image.dataobj)
        if len(np.unique(stored[stored != stored.min()])) < 100:
            raise RuntimeError(f"{src}: re-stored in {frame.name} it keeps fewer than 100 intensity levels")
        for folder, img, suffix in ((raw, image, "T1w"), (labels, label, "dseg")):
            path = folder / f"sub-{subject}" / "anat" / f"sub-{subject}_{suffix}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(img, str(path))
        chosen[subject] = frame.name
    (raw / "participants.tsv").write_text("participant_id\tstorage_frame\n" + "".join(
        f"sub-{s}\t{f}\n" for s, f in chosen.items()))
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lpba40", type=Path, default=Path("../shared/data/lpba40"))
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--subjects", nargs="+", default=[f"S{i:02d}" for i in range(1, 7)])
    args = parser.parse_args(argv)
    for subject, frame in write_cohort(args.lpba40, args.output, args.subjects).items():
        print(f"sub-{subject}: {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
