"""Pydra workflows of hdar-pipeline (installed as :mod:`hdar_pipeline.workflows`).

Workflows only compose the tasks of :mod:`hdar_pipeline.tasks`; they never touch arrays.

``init_cohort_wf``
    Every subject of a cohort registered to an atlas with every method, evaluated against the atlas
    labels and tabulated (one tidy row per subject x method), failures kept per subject.
"""

from .cohort import init_cohort_wf

__all__ = ["init_cohort_wf"]
