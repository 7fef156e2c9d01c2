"""Pydra workflows of hdar-pipeline (installed as :mod:`hdar_pipeline.engine`).

Workflows only compose the tasks of :mod:`hdar_pipeline.engine.pydra_tasks`; they never touch arrays.

``init_cohort_wf``
    Every subject of a cohort registered to an atlas with every method, evaluated against the atlas
    labels and tabulated (one tidy row per subject x method), failures kept per subject.
"""

from hdar_pipeline.engine.cohort_workflow import init_cohort_wf

__all__ = ["init_cohort_wf"]
