"""The per-subject pipeline steps as plain functions over files: preprocessing (:mod:`.preprocess`),
registration of a pair with its written outputs (:mod:`.registration`), the steps the cohort workflows run per
subject and their records (:mod:`.subject_steps`), and process isolation of a step (:mod:`.isolation`).
"""
