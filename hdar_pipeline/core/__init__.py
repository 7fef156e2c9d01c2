"""The core of the library: images and grids, the Transform type and its inverse, templates, label tables,
volumes, morphology, runtime (threads, seeds, devices, timing), provenance and the input guard.

Nothing here knows about registration methods, BIDS or workflow engines; every other layer builds on it.
"""
