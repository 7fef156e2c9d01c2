#!/usr/bin/env python
"""Train the HDAR cascade on your own cohort, export the weights and register a pair with them.

::

    python examples/train_hdar.py --images data/sub-*_T1w.nii.gz --labels data/sub-*_dseg.nii.gz \\
        -o hdar-run --width small --steps 2000 --name mycohort --threads 2

The images must be skull-stripped and affinely aligned (e.g. on an atlas: run ``hdar register
--method affine`` or the ``hdar-pipeline`` preprocessing first); they are resampled onto the first
image's grid. Label maps (one per image, same order; optional) add a Dice term to the loss and give
the validation Dice. With four subjects or more, ``--n-val`` of them (default 2) are held out.

Steps (the library API behind ``hdar train``):

1. :func:`hdar_pipeline.core.subject.find_image_subjects` finds the cohort's files,
   :class:`~hdar_pipeline.hdar.data.PairDataset` loads them; :class:`~hdar_pipeline.hdar.train.TrainConfig`
   holds the schedule.
2. :func:`hdar_pipeline.hdar.train.train` trains S1, then S2 (S1 frozen), then S3, ``--steps`` steps
   each, writing ``OUT/train_log.csv``, ``OUT/train_config.json`` and ``OUT/checkpoints/`` (an
   interrupted run resumes with ``--resume``).
3. :func:`hdar_pipeline.hdar.train.export` writes ``OUT/NAME.pt`` and its model card ``OUT/NAME.json``
   (data, settings, validation, hardware, SHA-256 of the weights).
4. :class:`hdar_pipeline.methods.hdar_method.HDARMethod` loads them (``weights=OUT/NAME.pt``; the SHA-256 is
   checked) and registers one pair of held-out subjects; the warped labels, the transform and the
   Dice before and after are written to ``OUT/example_pair/``.

The same weights work everywhere a method is chosen: ``hdar register FIXED MOVING -o DIR --method hdar
--weights OUT/NAME.pt``, ``hdar_pipeline.register(fixed, moving, method="hdar", weights=...)``.
A few thousand steps per stage are needed for useful accuracy (a GPU helps: ``--device cuda``); with
a handful of steps the example only shows the path. For volumes much smaller than a brain at 1 mm,
shrink the patch geometry (``--s2-patch``, ``--s3-patch``, ``--top-k``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from hdar_pipeline.apps.cli import non_negative_int, positive_int


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", required=True, help="training images (skull-stripped, aligned)")
    parser.add_argument("--labels", nargs="+", default=None, help="label maps, one per image in the same order")
    parser.add_argument("-o", "--output", type=Path, required=True, help="run folder (created)")
    parser.add_argument("--name", default="mycohort", help="name of the exported weights (OUT/NAME.pt)")
    parser.add_argument("--width", default="small", choices=["small", "paper"], help="network width")
    parser.add_argument("--levels", type=int, default=3, choices=[1, 2, 3], help="sub-networks S1..S3 to train")
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[2000],
                        help="optimiser steps of stage 1 [2 [3]] (one value: every stage)")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (paper: 1e-4)")
    parser.add_argument("--n-val", type=non_negative_int, default=2, help="subjects held out for validation (with >= 4 subjects)")
    parser.add_argument("--s2-patch", type=positive_int, default=None, help="S2 patch size in voxels (default 112)")
    parser.add_argument("--s3-patch", type=positive_int, default=None, help="S3 patch size in voxels (default 56)")
    parser.add_argument("--top-k", type=positive_int, default=None, help="patches refined per level (default 8)")
    parser.add_argument("--resume", action="store_true", help="resume OUT/checkpoints/last.pt")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    args = parser.parse_args(argv)

    import numpy as np

    from hdar_pipeline import Transform, load_image
    from hdar_pipeline.evaluation.evaluate import evaluate
    from hdar_pipeline.core.subject import find_image_subjects
    from hdar_pipeline.hdar.data import PairDataset
    from hdar_pipeline.hdar.train import TrainConfig, export, train
    from hdar_pipeline.core.images import normalize_intensity, save_image
    from hdar_pipeline.methods.hdar_method import HDARMethod

    # 1. the cohort and the settings
    subjects = find_image_subjects(images=args.images, labels=args.labels)
    data = PairDataset.from_subjects(subjects)
    val = None
    if args.n_val >= 2 and len(data) - args.n_val >= 2:
        data, val = data.split(args.n_val, np.random.default_rng(args.seed))
    cascade = {}
    if args.s2_patch:
        cascade.update(s2_patch=args.s2_patch, s2_input=max(1, args.s2_patch // 2))
    if args.s3_patch:
        cascade.update(s3_patch=args.s3_patch, s3_input=args.s3_patch)
    if args.top_k:
        cascade["top_k"] = args.top_k
    config = TrainConfig(width=args.width, levels=args.levels, steps_per_stage=tuple(args.steps), lr=args.lr,
                         seed=args.seed, cascade=cascade)
    print(f"training on {len(data)} subjects ({', '.join(data.names)}), validating on "
          f"{', '.join(val.names) if val is not None else 'none'}; grid {data.shape}, {config.total_steps} steps")

    # 2. train, stage by stage
    description = {"images": [str(Path(p).resolve()) for p in args.images], "train_subjects": data.names,
                   "val_subjects": val.names if val is not None else [], "grid_shape": list(data.shape)}
    result = train(data, args.output, config, val_data=val, resume=bool(args.resume), device=args.device,
                   threads=args.threads, progress=False, data_description=description)
    final = result.final_validation
    print(f"{result.step} steps on {result.device} in {result.elapsed_s:.1f} s"
          + (f"; validation Dice {final['val_dice']:.3f}" if final else ""))
    print(f"wrote {result.log_path}")
    print(f"wrote {result.checkpoint_path}")

    # 3. export the weights and their model card
    command = shlex.join(["python", "examples/train_hdar.py", *(argv if argv is not None else sys.argv[1:])])
    pt, card = export(result, args.name, args.output, command=command, data_description=description)
    print(f"wrote {pt}")
    print(f"wrote {card}")

    # 4. load them and register one pair (held-out subjects when there are some)
    names = val.names if val is not None else data.names
    by_name = {s.name: s for s in subjects}
    fixed_files, moving_files = by_name[names[0]], by_name[names[1]]
    method = HDARMethod(weights=pt, device=args.device, threads=args.threads, seed=args.seed)
    fixed = normalize_intensity(load_image(fixed_files.t1w))
    moving = normalize_intensity(load_image(moving_files.t1w))
    transform = method.register(fixed, moving)  # fixed-grid points -> moving-space points
    pair_dir = args.output / "example_pair"
    written = transform.write(pair_dir, prefix="transform_")
    written.append(save_image(transform.apply(moving), pair_dir / "warped.nii.gz"))
    print(f"registered {moving_files.name} onto {fixed_files.name} with HDAR on {method.device_used}")
    if fixed_files.labels is not None and moving_files.labels is not None:
        fixed_labels = load_image(fixed_files.labels, labels=True)
        moving_labels = load_image(moving_files.labels, labels=True)
        warped = transform.apply(moving_labels, interpolation="nearest")
        written.append(save_image(warped, pair_dir / "warped_labels.nii.gz"))
        before = evaluate(fixed_labels, Transform.identity(fixed).apply(moving_labels, interpolation="nearest"),
                          distances=False).summary.iloc[0]
        after = evaluate(fixed_labels, warped, transform=transform, distances=False).summary.iloc[0]
        print(f"mean Dice {before['mean_dice']:.3f} before, {after['mean_dice']:.3f} after; "
              f"{after['folded_percent']:.3f} % folded voxels")
    for path in written:
        print(f"wrote {path}")
    print(f"use the weights with: hdar register FIXED MOVING -o DIR --method hdar --weights {pt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
