"""hdar-pipeline: hierarchical difficulty-aware deformable registration of brain MR cohorts.

The library (this package) never imports a workflow engine; Pydra tasks live in
:mod:`hdar_pipeline.engine.pydra_tasks` and Nipype interfaces in :mod:`hdar_pipeline.engine.nipype_interfaces`.
"""

from hdar_pipeline._version import __version__
from hdar_pipeline.core.images import Grid, ImageError, load_image
from hdar_pipeline.pipeline.registration import register
from hdar_pipeline.core.transforms import Transform

__all__ = ["__version__", "Grid", "ImageError", "Transform", "load_image", "register"]
