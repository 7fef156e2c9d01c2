"""FireANTs: adaptive Riemannian optimisation for multi-scale diffeomorphic matching, as a method.

Jena R, Chaudhari P, Gee JC. FireANTs: Adaptive Riemannian Optimization for Multi-Scale Diffeomorphic Matching.
arXiv:2404.01249, 2024. Code: https://github.com/rohitrango/FireANTs (PyPI: ``fireants``).

The adapter feeds FireANTs the pair as its ``Image``/``BatchedImages`` (built from SimpleITK images with the fixed
grid's LPS geometry), runs its deformable stage (``GreedyRegistration`` or ``SyNRegistration``: compositive warps,
its Riemannian Adam, local normalised cross-correlation) with no initial affine, since our images are already
affinely aligned on the fixed grid (:func:`hdar_pipeline.methods.register_pair`), and converts its result to the
shared :class:`~hdar_pipeline.core.transforms.Transform` on the fixed grid.

Presets (:data:`FIREANTS_PRESETS`)
----------------------------------
Both are the settings of FireANTs' own LPBA40 experiment (``fireants/scripts/pairwise/test_lpba40.py``, the paper's
brain MRI evaluation on the same dataset as our benchmarks), compositive warps and Adam in both:

``greedy`` (the default)
    ``GreedyRegistration``: scales 4/2/1, 200/100/50 iterations, CC window 7 voxels, gradient smoothing sigma 2,
    warp smoothing sigma 0.5 voxels, learning rate 0.5. (The documentation's brain MRI quickstart uses
    200/100/25 iterations, CC window 5 and gradient sigma 1.)
``syn``
    ``SyNRegistration`` (both images warped towards a midpoint, the forward map composed with the inverse of the
    reverse one, which FireANTs computes by optimisation): scales 4/2/1, 100/75/50 iterations, CC window 5,
    gradient sigma 1, warp sigma 0.5 (SyNRegistration's default), learning rate 0.5.

The loss is FireANTs' ``cc`` on the CPU and ``fusedcc`` on CUDA, as in that script (``fusedcc`` is the same local
correlation from the CUDA-only ``fireants_fused_ops``; FireANTs falls back to ``cc`` itself when they are not
installed). Every length (scales, CC window, sigmas) is in voxels of each level's grid; FireANTs never shrinks a
level below 32 voxels per axis (``MIN_IMG_SIZE``), so on small grids the coarse levels run at 32 voxels.

Coordinates
-----------
FireANTs works in PyTorch's normalised coordinates (``align_corners=True``): ``t = 2 i / (n - 1) - 1`` per ITK index
axis ``i`` (x fastest), arrays ``[batch, z, y, x, xyz]``. Its warp parameters are an affine ``A`` (3 x 4, normalised
fixed -> normalised moving coordinates, from each image's index-to-LPS geometry and the initial affine) and a
displacement ``u(t)`` (normalised moving coordinates), the moving point being ``A t + u(t)``. With both images on
the fixed grid and no initial affine, ``A`` is the identity up to float32 rounding (checked), so the LPS-mm
displacement at fixed voxel ``i`` is ``D diag((n - 1) / 2) u``, ``D`` the linear part of the grid's index-to-LPS
affine: the field FireANTs' own ``save_as_ants_transforms`` writes, without its round trip through a file.

Installation
------------
Every fireants release on PyPI (0.1 to 1.5.0) pins ``simpleitk==2.2.1`` (1.5.0 also requires the ``typing``
backport, ``hydra-core``, ``scikit-image``, ``pandas`` and ``pytest``, which only its scripts use), while
hdar-pipeline needs ``SimpleITK>=2.3``; with both requirements pip finds no solution (it backtracks down to 0.1.1,
which also pins ``torch==1.13.1``, ``pandas==1.3.5`` and ``nibabel==4.0.2``, and tries to build that pandas from
source). FireANTs' library needs only torch,
numpy, scipy, SimpleITK, nibabel and tqdm, and runs with SimpleITK 2.5 (the tests here), so::

    pip install "hdar-pipeline[fireants]"          # FireANTs' runtime dependencies, SimpleITK left as it is
    pip install --no-deps "fireants==1.5.0"        # FireANTs itself, without its pins

CPU and GPU: the fused CUDA kernels (``fireants_fused_ops``, built from FireANTs' source) are optional; without
them FireANTs uses plain PyTorch, on the CPU or on CUDA.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np

from hdar_pipeline.core.images import Grid, to_sitk
from hdar_pipeline.core.runtime import configure_threads, resolve_device, seed_everything
from hdar_pipeline.core.transforms import Transform
from hdar_pipeline.methods.base import MethodBase
from hdar_pipeline.methods.registry import BenchmarkVariant, MethodSpec
from hdar_pipeline.methods.text import ALWAYS_SKIPPED, Reference, SentenceContext, other_parameters, value_text

#: The FireANTs release the adapter is tested with (the install instructions pin it).
TESTED_FIREANTS_VERSION = "1.5.0"

#: How to install the extra (printed when fireants is missing).
INSTALL_HINT = ('pip install "hdar-pipeline[fireants]" && pip install --no-deps '
                f'"fireants=={TESTED_FIREANTS_VERSION}" (every fireants release pins simpleitk==2.2.1; '
                "--no-deps keeps the SimpleITK hdar-pipeline needs)")

#: Parameters of each preset (see the module docstring).
FIREANTS_PRESETS: dict[str, dict[str, Any]] = {
    "greedy": dict(algorithm="greedy", scales=(4, 2, 1), iterations=(200, 100, 50), cc_kernel_size=7,
                   smooth_grad_sigma=2.0, smooth_warp_sigma=0.5, optimizer_lr=0.5),
    "syn": dict(algorithm="syn", scales=(4, 2, 1), iterations=(100, 75, 50), cc_kernel_size=5,
                smooth_grad_sigma=1.0, smooth_warp_sigma=0.5, optimizer_lr=0.5),
}
DEFAULT_PRESET = "greedy"
#: The smallest fixed grid (voxels per axis) FireANTs' SyN handles correctly (its ``MIN_IMG_SIZE``).
MIN_SYN_VOXELS = 32
ALGORITHMS = ("greedy", "syn")
LOSSES = ("auto", "cc", "fusedcc")


class FireANTsNotInstalled(ImportError, NotImplementedError):
    """FireANTs is not importable. Also a :class:`NotImplementedError`, which the command line reports as an
    error message (as for a missing HDAR)."""


def fireants_available() -> bool:
    """Whether the ``fireants`` package can be imported (without importing it)."""
    return importlib.util.find_spec("fireants") is not None


@dataclass
class FireANTsMethod(MethodBase):
    """FireANTs' greedy or SyN deformable registration (PyTorch; CPU or CUDA).

    Every parameter left ``None`` takes the preset's value (:data:`FIREANTS_PRESETS`).

    Parameters
    ----------
    preset : {"greedy", "syn"}
    algorithm : {"greedy", "syn"}
        FireANTs' ``GreedyRegistration`` or ``SyNRegistration``.
    scales : tuple of int
        Downsampling factor of each level, coarse to fine (decreasing; FireANTs keeps at least 32 voxels per axis).
    iterations : tuple of int
        Iterations per level.
    cc_kernel_size : int
        Side of the (rectangular) local cross-correlation window, voxels of the level's grid (odd).
    smooth_grad_sigma : float
        Gaussian smoothing (voxels) of the loss gradient before each step; 0 disables it.
    smooth_warp_sigma : float
        Gaussian smoothing (voxels) of the warp after each step; 0 disables it.
    optimizer_lr : float
        FireANTs' Adam step: each update is rescaled so that its largest vector is ``optimizer_lr`` half-voxels of
        the level grid's longest axis.
    loss : {"auto", "cc", "fusedcc"}
        ``auto``: ``cc`` on the CPU, ``fusedcc`` on CUDA (FireANTs' LPBA40 script).
    device : str
        ``"auto"`` (CUDA when available, else the CPU), ``"cpu"`` or ``"cuda[:N]"``.
    threads : int, optional
        Torch CPU threads.
    seed : int, optional
        Seeds torch (FireANTs starts from a zero warp and is deterministic on the CPU).

    Attributes
    ----------
    device_used : str
        The device of the latest registration.

    Raises
    ------
    FireANTsNotInstalled
        When ``fireants`` cannot be imported (:data:`INSTALL_HINT`).
    """

    name: ClassVar[str] = "fireants"
    preset: str = DEFAULT_PRESET
    algorithm: str | None = None
    scales: tuple[int, ...] | None = None
    iterations: tuple[int, ...] | None = None
    cc_kernel_size: int | None = None
    smooth_grad_sigma: float | None = None
    smooth_warp_sigma: float | None = None
    optimizer_lr: float | None = None
    loss: str = "auto"
    device: str = "auto"
    threads: int | None = None
    seed: int | None = None
    device_used: str | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        if self.preset not in FIREANTS_PRESETS:
            raise ValueError(f"unknown FireANTs preset {self.preset!r}; choose from {sorted(FIREANTS_PRESETS)}")
        for key, value in FIREANTS_PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown FireANTs algorithm {self.algorithm!r}; choose from {', '.join(ALGORITHMS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown FireANTs loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        self.scales = tuple(int(s) for s in self.scales)
        self.iterations = tuple(int(n) for n in self.iterations)
        if not self.scales or len(self.scales) != len(self.iterations):
            raise ValueError(f"scales {self.scales} and iterations {self.iterations} must be non-empty and of the "
                             "same length")
        if min(self.scales) < 1 or list(self.scales) != sorted(self.scales, reverse=True) or min(self.iterations) < 0:
            raise ValueError(f"scales must be >= 1 and decreasing (coarse to fine), iterations >= 0; got "
                             f"{self.scales} and {self.iterations}")
        self.cc_kernel_size = int(self.cc_kernel_size)
        if self.cc_kernel_size < 1 or self.cc_kernel_size % 2 == 0:
            raise ValueError(f"cc_kernel_size must be a positive odd number of voxels, got {self.cc_kernel_size}")
        self.smooth_grad_sigma, self.smooth_warp_sigma, self.optimizer_lr = (
            float(self.smooth_grad_sigma), float(self.smooth_warp_sigma), float(self.optimizer_lr))
        if self.smooth_grad_sigma < 0 or self.smooth_warp_sigma < 0 or self.optimizer_lr <= 0:
            raise ValueError("smooth_grad_sigma and smooth_warp_sigma must be >= 0, optimizer_lr > 0")
        if not fireants_available():
            raise FireANTsNotInstalled(f"the fireants method needs FireANTs, which is not installed: {INSTALL_HINT}")

    @property
    def parameters(self) -> dict[str, Any]:
        return {k: v for k, v in super().parameters.items() if k != "device_used"}

    def _register(self, fixed, moving, fixed_mask) -> Transform:
        import torch

        if fixed_mask is not None:
            warnings.warn("FireANTsMethod ignores fixed_mask (its cross-correlation runs on the whole grid); "
                          "give it skull-stripped images", stacklevel=3)
        configure_threads(self.threads)
        seed_everything(self.seed)
        grid = Grid.of(fixed)
        if self.algorithm == "syn" and min(grid.shape) < MIN_SYN_VOXELS:
            # FireANTs 1.5.0's SyN composes with the reverse warp itself instead of its inverse when the inverse comes
            # back on another grid, which happens when an axis is shorter than its minimum level size (32 voxels)
            raise ValueError(f"FireANTs' SyN needs at least {MIN_SYN_VOXELS} voxels along every axis of the fixed "
                             f"grid, got {grid.shape}; use the greedy preset")
        if not grid.same_as(Grid.of(moving)):  # methods run after the affine stage, on the fixed grid
            moving = Transform.identity(grid).apply(moving, interpolation="linear")
        dev = resolve_device(self.device)
        fa = _import_fireants()
        loss = self.loss if self.loss != "auto" else ("fusedcc" if dev.type == "cuda" else "cc")
        f = _batched(fa, fixed, grid, dev)
        m = _batched(fa, moving, grid, dev)
        cls = fa.GreedyRegistration if self.algorithm == "greedy" else fa.SyNRegistration
        reg = cls(scales=list(self.scales), iterations=list(self.iterations), fixed_images=f, moving_images=m,
                  loss_type=loss, cc_kernel_size=self.cc_kernel_size, deformation_type="compositive",
                  optimizer="adam", optimizer_lr=self.optimizer_lr, smooth_grad_sigma=self.smooth_grad_sigma,
                  smooth_warp_sigma=self.smooth_warp_sigma, progress_bar=False)
        with warnings.catch_warnings():
            # FireANTs calls the deprecated Logger.warn (its fused-ops notices, already silenced by level)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"fireants(\.|$)")
            reg.optimize()
            with torch.no_grad(), _quiet_syn_inverse(fa):
                params = reg.get_warp_parameters(f, m)
        field_mm = warp_to_mm(params["affine"], params["grid"], grid)
        self.device_used = str(dev) if dev.type != "cuda" else f"cuda:{dev.index or 0}"
        transform = Transform(grid, field=field_mm)
        transform.metadata.update(device=self.device_used, fireants_version=fa.version,
                                  fireants_loss=type(reg.loss_fn).__name__, fireants_fused_ops=fa.fused_ops)
        return transform


# ------------------------------------------------------------------------------------------------ conversion


def warp_to_mm(affine, displacement, grid: Grid, *, atol: float = 1e-3) -> np.ndarray:
    """FireANTs' warp parameters on the fixed grid as the LPS-mm field of :class:`~hdar_pipeline.core.transforms.Transform`.

    Parameters
    ----------
    affine : Tensor or ndarray, shape (1, 3, 4)
        FireANTs' ``get_warp_parameters(...)["affine"]``: normalised fixed -> normalised moving coordinates. Must be
        the identity (within ``atol``, normalised units): both images on ``grid``, no initial affine.
    displacement : Tensor or ndarray, shape (1, Z, Y, X, 3)
        ``get_warp_parameters(...)["grid"]``: displacement in normalised coordinates (components x, y, z along the
        ITK index axes, ``align_corners=True``), on ``grid`` (``(X, Y, Z) == grid.shape``).
    grid : Grid
        The fixed grid (``Z, Y, X`` reversed is its shape).

    Returns
    -------
    ndarray, shape (*grid.shape, 3), float32
        Displacement in LPS millimetres at each fixed voxel.

    Raises
    ------
    ValueError
        A batch other than one pair, a field not on ``grid``, or a non-identity affine part.
    """
    a = _numpy(affine).astype(np.float64)
    u = _numpy(displacement)
    if a.shape != (1, 3, 4) or u.ndim != 5 or u.shape[0] != 1 or u.shape[-1] != 3:
        raise ValueError(f"expected one pair's (1, 3, 4) affine and (1, Z, Y, X, 3) displacement, got {a.shape} and "
                         f"{u.shape}")
    if tuple(u.shape[1:4][::-1]) != tuple(grid.shape):
        raise ValueError(f"displacement of shape {u.shape[1:4]} (z, y, x) is not on the fixed grid {grid.shape}")
    deviation = float(np.abs(a[0] - np.eye(3, 4)).max())
    if deviation > atol:
        raise ValueError(f"FireANTs' affine part is not the identity (max deviation {deviation:.2e}): the images were "
                         "not on one grid")
    half = (np.asarray(grid.shape, np.float64) - 1.0) / 2.0  # normalised -> index units, per ITK axis x, y, z
    linear = grid.lps_affine[:3, :3] * half[None, :]
    # [z, y, x, c] -> [x, y, z, c] (our arrays are indexed like ITK's index, x first)
    u = np.ascontiguousarray(np.transpose(u[0], (2, 1, 0, 3)), dtype=np.float32)
    return np.einsum("ca,...a->...c", linear.astype(np.float32), u).astype(np.float32)


# ------------------------------------------------------------------------------------------------ FireANTs plumbing


@dataclass(frozen=True)
class _FireANTs:
    """The pieces of FireANTs the adapter uses."""

    Image: Any
    BatchedImages: Any
    GreedyRegistration: Any
    SyNRegistration: Any
    syn_module: Any
    version: str
    fused_ops: bool


_FIREANTS: _FireANTs | None = None


def _import_fireants() -> _FireANTs:
    """Import FireANTs once, without its side effects on the host process.

    At import FireANTs prints its fused-ops status to stdout and calls ``logging.basicConfig(level=INFO)``, which
    would send every library's INFO records to stderr; the root logger is restored and FireANTs' own loggers
    (set to INFO, and warning about the optional fused CUDA ops at every level) are limited to errors: the
    fused ops' availability is in the transform's metadata instead.
    """
    global _FIREANTS
    if _FIREANTS is not None:
        return _FIREANTS
    if not fireants_available():
        raise FireANTsNotInstalled(f"the fireants method needs FireANTs, which is not installed: {INSTALL_HINT}")
    root = logging.getLogger()
    handlers, level, disabled = list(root.handlers), root.level, logging.root.manager.disable
    try:
        # its import-time warnings (no fused ops) would reach the host's handlers: logging is off meanwhile
        logging.disable(logging.WARNING)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"fireants(\.|$)")
            image = importlib.import_module("fireants.io.image")
            greedy = importlib.import_module("fireants.registration.greedy")
            syn = importlib.import_module("fireants.registration.syn")
            interpolator = importlib.import_module("fireants.interpolator")
    finally:
        logging.disable(disabled)
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    for name in ["fireants", *logging.root.manager.loggerDict]:
        if name == "fireants" or name.startswith("fireants."):
            logging.getLogger(name).setLevel(logging.ERROR)
    from importlib.metadata import PackageNotFoundError, version

    try:
        fa_version = version("fireants")
    except PackageNotFoundError:  # pragma: no cover - a source checkout on sys.path
        fa_version = "unknown"
    _FIREANTS = _FireANTs(Image=image.Image, BatchedImages=image.BatchedImages,
                          GreedyRegistration=greedy.GreedyRegistration, SyNRegistration=syn.SyNRegistration,
                          syn_module=syn, version=fa_version,
                          fused_ops=bool(getattr(interpolator, "FFO_AVAILABLE", False)))
    return _FIREANTS


def _batched(fa: _FireANTs, img, grid: Grid, device):
    """A nibabel image on ``grid`` as FireANTs' one-image ``BatchedImages`` (float32, LPS geometry) on ``device``."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    return fa.BatchedImages([fa.Image(to_sitk(data, grid), device=device)])


@contextlib.contextmanager
def _quiet_syn_inverse(fa: _FireANTs) -> Iterator[None]:
    """SyN's ``get_warp_parameters`` inverts the reverse warp with ``compositive_warp_inverse``, whose progress bar
    defaults to on and cannot be set from outside: turn it off for the call (nothing else changes)."""
    original = getattr(fa.syn_module, "compositive_warp_inverse", None)
    if original is None:  # another FireANTs layout: leave it alone
        yield
        return

    def quiet(*args, **kwargs):
        kwargs.setdefault("progress_bar", False)
        return original(*args, **kwargs)

    fa.syn_module.compositive_warp_inverse = quiet
    try:
        yield
    finally:
        fa.syn_module.compositive_warp_inverse = original


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)



JENA2024 = Reference(
    "jena2024",
    "Jena R, Chaudhari P, Gee JC. FireANTs: Adaptive Riemannian Optimization for Multi-Scale "
    "Diffeomorphic Registration. arXiv:2404.01249. 2024",
    "Jena et al. 2024", "misc", {
        "author": "Jena, R. and Chaudhari, P. and Gee, J. C.",
        "title": "{FireANTs}: Adaptive {Riemannian} Optimization for Multi-Scale Diffeomorphic Registration",
        "year": "2024", "eprint": "2404.01249", "archiveprefix": "arXiv"})


def describe(params: Mapping[str, Any], preset: str, context: SentenceContext) -> str:
    """The methods paragraph's sentence on FireANTs (see :class:`~.registry.MethodSpec`)."""
    cite = context.cite
    used = set(ALWAYS_SKIPPED) | {"device", "threads", "loss"}
    algorithm = params.get("algorithm")
    used.add("algorithm")
    text = ("Deformable registration used FireANTs" + context.version("fireants") + " " + cite("jena2024") + ": "
            + ("symmetric (SyN) " if algorithm == "syn" else "greedy " if algorithm == "greedy" else "")
            + "diffeomorphic registration with compositive warps, adaptive Riemannian optimisation (Adam) and local "
              "normalised cross-correlation")
    details = []
    if params.get("cc_kernel_size") is not None:
        used.add("cc_kernel_size")
        details.append(f"a correlation window of {value_text(params['cc_kernel_size'])} voxels")
    scales, iters = params.get("scales"), params.get("iterations")
    if scales is not None and iters is not None:
        used |= {"scales", "iterations"}
        details.append(f"{value_text(iters)} iterations at scales {value_text(scales)}")
    for key, what in (("smooth_grad_sigma", "gradients smoothed by a Gaussian of {} voxels"),
                      ("smooth_warp_sigma", "the warp by one of {} voxels"), ("optimizer_lr", "learning rate {}")):
        if params.get(key) is not None:
            used.add(key)
            details.append(what.format(value_text(params[key])))
    text += (" (" + "; ".join(details) + ")") if details else ""
    text += "."
    if preset:
        text += f" Preset: `{preset}`."
    return text + other_parameters(params, used)


SPEC = MethodSpec(
    name="fireants", title="FireANTs", method_class=FireANTsMethod, describe=describe, references=(JENA2024,),
    presets={"greedy": "GreedyRegistration, 200/100/50 iterations at scales 4/2/1, CC window 7",
             "syn": "SyNRegistration, 100/75/50 iterations, CC window 5"},
    default_preset=DEFAULT_PRESET,
    presets_summary="default greedy: FireANTs' GreedyRegistration, syn: its SyNRegistration, both with the settings "
                    "of FireANTs' LPBA40 experiment",
    presets_note="the settings of FireANTs' LPBA40 experiment",
    install=f"pip install 'hdar-pipeline[fireants]', then pip install --no-deps fireants=={TESTED_FIREANTS_VERSION}",
    uses_device=True,
    variants=(BenchmarkVariant("fireants", "greedy", {}, "FireANTs greedy, its LPBA40 settings (200/100/50 at 4/2/1)",
                               order=40),
              BenchmarkVariant("fireants-syn", "syn", {}, "FireANTs SyN, its LPBA40 settings (100/75/50 at 4/2/1)",
                               order=41)))


__all__ = ["DEFAULT_PRESET", "FIREANTS_PRESETS", "FireANTsMethod", "FireANTsNotInstalled", "INSTALL_HINT",
           "TESTED_FIREANTS_VERSION", "fireants_available", "warp_to_mm"]
