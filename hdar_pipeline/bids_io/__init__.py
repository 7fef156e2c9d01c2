"""BIDS in and out: querying input datasets (:mod:`.inputs`), writing derivatives (:mod:`.outputs`), finding
existing anatomical derivatives (:mod:`.anat_derivatives`) and converting public datasets into BIDS
(:mod:`.convert`). pybids is imported here; no workflow engine is.
"""
