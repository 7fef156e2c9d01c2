"""Evaluation: label overlap, surface distances and Jacobian metrics (:mod:`.metrics`), evaluating written
outputs (:mod:`.evaluate`), the tidy group tables (:mod:`.group_tables`), group statistics (:mod:`.stats`) and
their figures (:mod:`.figures`).
"""
