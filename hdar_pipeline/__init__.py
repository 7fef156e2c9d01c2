"""hdar-pipeline: hierarchical difficulty-aware deformable registration of brain MR cohorts.

The package is layered, bottom first (README "Layout"; ``tests/test_layout.py`` holds the rules): :mod:`.core`
(images, the Transform type, templates, labels, runtime, provenance, the input guard, the per-subject record),
:mod:`.hdar` (the network), :mod:`.methods` (every registration method behind one protocol), :mod:`.evaluation`
and :mod:`.bids_io`, :mod:`.reports`, :mod:`.pipeline` (the per-subject steps), :mod:`.engine` (Pydra tasks and
workflows, Nipype interfaces: with the BIDS App's runner that submits its workflow, the only code that imports a
workflow engine) and :mod:`.apps` (the ``hdar`` and ``hdar-pipeline`` commands, the demo, the benchmark). A layer
imports only the layers below it.
"""

from hdar_pipeline._version import __version__
from hdar_pipeline.core.images import Grid, ImageError, load_image
from hdar_pipeline.pipeline.registration import register
from hdar_pipeline.core.transforms import Transform

__all__ = ["__version__", "Grid", "ImageError", "Transform", "load_image", "register"]
