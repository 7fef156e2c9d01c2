"""The small protocol every registration method follows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import nibabel as nib

from hdar_pipeline.core.runtime import RunInfo, measure
from hdar_pipeline.core.transforms import Transform


@runtime_checkable
class RegistrationMethod(Protocol):
    """A registration method.

    ``register(fixed, moving)`` returns the :class:`~hdar_pipeline.core.transforms.Transform` that maps
    fixed-space points to moving-space points on the fixed grid; both images are nibabel images.
    ``last_run`` holds the runtime and peak memory of the latest call.
    """

    name: ClassVar[str]

    @property
    def parameters(self) -> dict[str, Any]: ...

    def register(self, fixed: nib.spatialimages.SpatialImage, moving: nib.spatialimages.SpatialImage,
                 *, fixed_mask: nib.spatialimages.SpatialImage | None = None) -> Transform: ...


@dataclass
class MethodBase:
    """Shared behaviour: parameters as a dict, timing of :meth:`register` into ``last_run``.

    Subclasses implement ``_register(fixed, moving, fixed_mask)`` and set ``name``.
    """

    name: ClassVar[str] = "base"
    last_run: RunInfo = field(default_factory=RunInfo, init=False, repr=False, compare=False)

    @property
    def parameters(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {k: v for k, v in asdict(self).items() if k != "last_run"}

    def register(self, fixed, moving, *, fixed_mask=None) -> Transform:
        with measure() as info:
            transform = self._register(fixed, moving, fixed_mask)
        self.last_run = info
        transform.metadata.update({"method": self.name, "parameters": self.parameters,
                                   "runtime_s": info.runtime_s, "peak_memory_mb": info.peak_memory_mb})
        return transform

    def _register(self, fixed, moving, fixed_mask) -> Transform:  # pragma: no cover - abstract
        raise NotImplementedError
