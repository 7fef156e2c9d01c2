"""Reports: the per-subject HTML QC report (:mod:`.subject_report`) and the generated methods paragraph with
its citations (:mod:`.methods_text`).
"""
