"""The core of the library: images and grids, the Transform type and its inverse, templates, label tables,
volumes, morphology, runtime (threads, seeds, devices, timing), provenance (versions, commit, file hashes, the
machine), the input guard and the subject record (:class:`~hdar_pipeline.core.subject.Subject`, with the finders
for public datasets' layouts).

Nothing here knows about registration methods, pybids or workflow engines (a Subject knows BIDS names only);
every other layer builds on it.
"""
