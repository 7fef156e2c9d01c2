"""``hdar benchmark``, the method comparison: every registration method on the same pairs, in the same run, in one
table.

The run is :mod:`.runner`, the subjects and pairs :mod:`.pairs`, the tables and the report :mod:`.tables`, the
command line :mod:`.benchmark_cli`.

``hdar benchmark`` (and ``benchmarks/compare_methods.py``) register each pair of a dataset with the
variants below and report, per variant, mean +- sd Dice and target overlap (over the labels of the
fixed image), the % of folded voxels (Jacobian determinant <= 0), the standard deviation of log|J|, the
median seconds per pair, the peak memory and each variant's time as a ratio to SyN quality. All variants
are measured in the same process, pair by pair, so the timing ratios hold on a noisy, shared machine.

Variants
--------
======================  ==========================================================================
``affine``              antspyx rigid + affine only
``demons``              SimpleITK diffeomorphic Demons (three levels)
``lccdemons``           LCC-Demons (PyTorch; symmetric log-domain Demons with local correlation forces, three levels)
``fireants``            FireANTs' greedy registration with the settings of its LPBA40 experiment (optional extra;
                        10-15 min per LPBA40 pair on 2 CPU cores: by default 2 pairs)
``fireants-syn``        FireANTs' SyN registration, the same experiment's settings (optional extra; 2 pairs)
``syn-fast``            ANTs SyN, antspyx defaults
``syn-quality``         ANTs SyN at ``antsRegistrationSyN.sh`` quality (about 30 min per LPBA40 pair on 2
                        cores: by default it runs on 1 pair only, see ``--max-pairs-per-variant``)
``hdar``                HDAR with its default preset and options (:data:`~hdar_pipeline.methods.hdar_method.DEFAULT_PRESET`)
``hdar-fast``           HDAR, the paper's inference (S2/S3 on the hardest patches)
``hdar-full``           HDAR, S2/S3 on a sliding window over the brain
``hdar-refined``        HDAR fast + ``--refine-steps`` steps of instance optimisation
``hdar-accurate``       HDAR's ``accurate`` preset: 30 steps per level and 3 on the full-resolution grid
``voxelmorph``          VoxelMorph, the network alone (its ``fast`` preset: VoxelMorph as published, after
                        HDAR's affine pre-alignment)
``voxelmorph-refined``  VoxelMorph followed by HDAR's ``accurate`` refinement (its ``refined`` preset)
======================  ==========================================================================

A variant that cannot run here (HDAR or VoxelMorph when the requested weights are missing or unusable, FireANTs when
it is not installed) appears in the table as "not run: <reason>" and in the notes; it never stops the others. A pair that fails is reported and the
run goes on.

Pairs
-----
From a BIDS dataset with a labels derivatives dataset (``--bids-dir``, ``--labels-dir``: each subject's
``*_dseg.nii.gz`` in T1w space), or from the LPBA40 folder layout (``--lpba40 DIR``: ``SNN/SNN.delineation.
skullstripped.nii.gz`` and ``SNN/SNN.delineation.structure.label.nii.gz``). Pairs are given explicitly
(``--pairs MOVING:FIXED ...``) or made from the subjects (``--subjects``; default: every BIDS participant
with labels, LPBA40's validation subjects S21-S30) by ``--pairs-from``: ``consecutive`` (each subject onto
the next, the last onto the first: S21->S22, ..., S30->S21), ``onto-first`` (every subject onto the first)
or ``all`` (every ordered pair); ``--n-pairs`` keeps the first N.

Caching
-------
Each (variant, pair) result is one JSON row in ``OUT/rows/``; an interrupted run resumes where it stopped.
A cached row is reused only while the method's parameters, the threads, the seed, the affine stage and
the input files are unchanged; ``--no-cache`` reruns everything.

Outputs
-------
``OUT/benchmark_pairs.csv``
    One row per variant x pair (columns :data:`PAIR_COLUMNS`).
``OUT/benchmark_summary.csv``
    One row per variant (columns :data:`SUMMARY_COLUMNS`); ``time_ratio_to_syn_quality`` is the
    variant's median runtime over SyN quality's median runtime (NaN, with a note, when SyN quality did
    not run).
``OUT/benchmark.md``
    The table as markdown ("mean ± sd", pairs per variant), the machine (CPU, cores, torch/ANTs
    versions), the exact command line and the notes; when the default HDAR (``hdar``) ran, every other method
    against it pair by pair (:func:`paired_against`).
``OUT/benchmark_paired.csv``
    That comparison: per method, the pairs both registered, each one's mean Dice over them, HDAR's minus the
    method's per pair (mean, min, max), the pairs where HDAR is higher, a Wilcoxon signed-rank p and the ratio of
    their median seconds per pair.
``OUT/benchmark_dice_time.png`` (and ``.svg``)
    Mean Dice (SD bars) against the median seconds per pair (log scale), one labelled point per variant.
"""

from hdar_pipeline.apps.benchmark.pairs import (
    LPBA40_VALIDATION, PAIR_MODES, Pair, BenchmarkInputError, default_lpba40_dir, lpba40_label,
    lpba40_files, lpba40_subjects, bids_subjects, make_pairs, parse_pair_specs, select_pairs, lpba40_pairs,
)
from hdar_pipeline.apps.benchmark.runner import (
    DEFAULT_OUTPUT, DEFAULT_REFINE_STEPS, DEFAULT_MAX_PAIRS, PAIR_COLUMNS, Variant, default_variants,
    VARIANT_NAMES, VariantUnavailable, build_method, parse_max_pairs, BenchmarkConfig, BenchmarkResult,
    one_line, PairImageCache, load_pair_images, evaluate_pair, RowCache, RunStamp, check_variants, progress_bar,
    measured_row, write_results, plan_jobs, run_benchmark,
)
from hdar_pipeline.apps.benchmark.tables import (
    REFERENCE_VARIANT, SUMMARY_COLUMNS, rows_frame, failure_notes, wall_time_note, variant_rows, summary_stat,
    variant_status, PAIRED_REFERENCE, PAIRED_HEADER, paired_against, paired_table_rows, summarise,
    format_mean_sd, TABLE_HEADER, table_rows, markdown_table, report_sections, print_table, markdown_report,
    print_summary, run_console,
)
from hdar_pipeline.apps.benchmark.benchmark_cli import (
    add_benchmark_arguments, config_from_args, command_line, run_benchmark_cli, main,
)

__all__ = [
    "BenchmarkConfig", "BenchmarkInputError", "BenchmarkResult", "DEFAULT_MAX_PAIRS", "DEFAULT_OUTPUT",
    "DEFAULT_REFINE_STEPS", "LPBA40_VALIDATION", "PAIRED_HEADER", "PAIRED_REFERENCE", "PAIR_COLUMNS",
    "PAIR_MODES", "Pair", "PairImageCache", "REFERENCE_VARIANT", "RowCache", "RunStamp", "SUMMARY_COLUMNS",
    "TABLE_HEADER", "VARIANT_NAMES", "Variant", "VariantUnavailable", "add_benchmark_arguments",
    "bids_subjects", "build_method", "check_variants", "command_line", "config_from_args", "default_lpba40_dir",
    "default_variants", "evaluate_pair", "failure_notes", "format_mean_sd", "load_pair_images", "lpba40_files",
    "lpba40_label", "lpba40_pairs", "lpba40_subjects", "main", "make_pairs", "markdown_report",
    "markdown_table", "measured_row", "one_line", "paired_against", "paired_table_rows", "parse_max_pairs",
    "parse_pair_specs", "plan_jobs", "print_summary", "print_table", "progress_bar", "report_sections",
    "rows_frame", "run_benchmark", "run_benchmark_cli", "run_console", "select_pairs", "summarise",
    "summary_stat", "table_rows", "variant_rows", "variant_status", "wall_time_note", "write_results",
]
