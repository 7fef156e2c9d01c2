"""hdar-pipeline: hierarchical difficulty-aware deformable registration of brain MR cohorts.

The library (this package) never imports a workflow engine; Pydra tasks live in
:mod:`hdar_pipeline.tasks` and Nipype interfaces in :mod:`hdar_pipeline.interfaces`.
"""

from ._version import __version__
from .images import Grid, ImageError, load_image
from .registration import register
from .transforms import Transform

__all__ = ["__version__", "Grid", "ImageError", "Transform", "load_image", "register"]
