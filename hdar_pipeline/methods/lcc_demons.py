"""LCC-Demons: symmetric log-domain diffeomorphic Demons with local correlation coefficient forces, in PyTorch.

Lorenzi M, Ayache N, Frisoni GB, Pennec X. LCC-Demons: a robust and accurate symmetric diffeomorphic
registration algorithm. NeuroImage 2013;81:470-483. doi:10.1016/j.neuroimage.2013.04.114

The transformation is the exponential ``exp(v)`` of a stationary velocity field ``v`` (scaling and squaring,
:class:`~hdar_pipeline.hdar.layers.VecInt`), estimated coarse to fine. At every iteration of a level:

1. the moving image is warped by ``exp(v)`` (``W_M = M o exp(v)``, on the fixed lattice) and the fixed image by
   ``exp(-v)`` (``W_F = F o exp(-v)``, on the moving lattice: both images share one grid after the affine stage);
2. the **forward** update ``u_f`` comes from the gradient of the summed local correlation coefficient
   ``sum_x LCC(F, W_M)(x)`` with respect to a displacement of ``W_M``, the **backward** update ``u_b`` from that of
   ``sum_x LCC(M, W_F)(x)``. The local statistics (means, variances, covariance) are Gaussian-weighted with
   standard deviation ``sigma_lcc``, and each local image is centred on its local mean, so LCC, and with it every
   force, is invariant to a (locally) affine change of either image's intensities (:func:`lcc_update`);
3. a force ``f`` becomes a demons step ``u = rho^2 f / (rho^2 |f|^2 + sigma_i)`` (``rho``: the local correlation
   at the voxel): the Gauss-Newton-like normalisation of the authors' implementation
   (``u = f / (|f|^2 + sigma_i / rho^2)``), which bounds a step by ``|rho| / (2 sqrt(sigma_i))`` voxels and damps
   it where the images do not correlate;
4. the symmetric update ``u = (u_f - u_b) / 2`` is smoothed by a Gaussian of ``sigma_fluid`` (fluid-like
   regularisation) and composed in the log domain by the BCH approximation, ``v <- v + u`` (2 terms, the
   authors' default) or ``v <- v + u + [v, u] / 2`` (3 terms);
5. the velocity is smoothed by a Gaussian of ``sigma_diff`` (diffusion-like regularisation).

The images are downsampled (antialiased) by ``shrink_factors``; the velocity of a level is resampled onto the next
(:func:`~hdar_pipeline.hdar.layers.resize_flow`). Every length (the three sigmas, the steps) is in voxels of the
level's grid: at the finest level of a 1 mm image, as in the paper's brains, voxels are millimetres.

Presets (:data:`LCC_DEMONS_PRESETS`)
------------------------------------
``default``
    The parameters the authors give for inter-subject brain registration with Gaussian regularisation
    (``rpiLCClogDemons -r 2 -R 0 -C 3 -a 30x20x10 -u 0.5 -d 1.0 -S 0.15``, README of Inria-Asclepios/LCC-LogDemons,
    the paper's reference implementation): ``sigma_lcc`` 3, ``sigma_fluid`` 0.5, ``sigma_diff`` 1.0,
    ``sigma_i`` 0.15, 30/20/10 iterations at shrink 4/2/1, 2 BCH terms.
``fast``
    The same at shrink 4/2 only (30/20 iterations), the velocity then upsampled to the full grid: about a
    quarter of the work.

Differences from the authors' ITK implementation (Inria-Asclepios/LCC-LogDemons, read, not copied): there the fixed
and moving images warped by ``exp(-v)`` and ``exp(v)`` enter one combined force and the local statistics are not
centred on the local means; here the forward and backward updates are computed separately (Vercauteren et al.'s
symmetric log-domain scheme, ``u = (u_f - u_b) / 2``) from the exact gradient of the centred LCC. Its fluid and
diffusion sigmas are in mm at every level, ours in voxels of each level (the LCC window is in level voxels in
both); on a 1 mm grid the finest level is the same.

Implementation: the per-level constants (the blurs, ``1 / N`` of the window, the local means and variances of the
two level images; an iteration only adds the warped images' statistics) are computed once per level
(:class:`LCCLevel`); every Gaussian is three banded matrix products (:class:`GaussianBlur`), two to three times
faster on a CPU than shifted sums. The same arithmetic as the straightforward code up to float rounding, which the
iterations amplify: on an LPBA40 pair the same Dice, and a few voxels differ by up to ~0.1 mm, the size of the
differences a one-ulp change of the input image makes.

The output :class:`~hdar_pipeline.core.transforms.Transform` holds ``exp(v) - id`` on the fixed grid in LPS mm, and its
``metadata["inverse_field"]`` ``exp(-v) - id`` (the method's own inverse, used by :mod:`hdar_pipeline.core.inverse`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from hdar_pipeline.core.images import Grid
from hdar_pipeline.core.runtime import configure_threads, resolve_device
from hdar_pipeline.core.transforms import Transform
from hdar_pipeline.methods.base import MethodBase
from hdar_pipeline.methods.registry import BenchmarkVariant, MethodSpec
from hdar_pipeline.methods.text import ALWAYS_SKIPPED, Reference, SentenceContext, other_parameters, value_text

#: Parameters of each preset (see the module docstring).
LCC_DEMONS_PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(shrink_factors=(4, 2, 1), iterations=(30, 20, 10), sigma_lcc=3.0, sigma_fluid=0.5,
                    sigma_diff=1.0, sigma_i=0.15, bch_terms=2),
    "fast": dict(shrink_factors=(4, 2), iterations=(30, 20), sigma_lcc=3.0, sigma_fluid=0.5,
                 sigma_diff=1.0, sigma_i=0.15, bch_terms=2),
}
DEFAULT_PRESET = "default"


@dataclass
class LCCDemonsMethod(MethodBase):
    """Symmetric log-domain diffeomorphic Demons with local correlation coefficient forces (PyTorch).

    Every parameter left ``None`` takes the preset's value (:data:`LCC_DEMONS_PRESETS`).

    Parameters
    ----------
    preset : {"default", "fast"}
    shrink_factors : tuple of int
        Downsampling of each level, coarse to fine (the last is usually 1; otherwise the velocity is upsampled to
        the full grid at the end).
    iterations : tuple of int
        Iterations per level.
    sigma_lcc : float
        Standard deviation (voxels of the level's grid) of the Gaussian window of the local statistics.
    sigma_fluid : float
        Standard deviation (voxels) of the Gaussian smoothing of each update (fluid-like); 0 disables it.
    sigma_diff : float
        Standard deviation (voxels) of the Gaussian smoothing of the velocity field (diffusion-like); 0 disables it.
    sigma_i : float
        Similarity/regularisation trade-off of the step (``-S`` of the authors' tool): a step is at most
        ``1 / (2 sqrt(sigma_i))`` voxels long.
    bch_terms : {2, 3}
        Terms of the BCH approximation of ``log(exp(v) o exp(u))``: ``v + u`` or ``v + u + [v, u] / 2``.
    device : str
        ``"auto"`` (CUDA when available, else the CPU), ``"cpu"`` or ``"cuda[:N]"``.
    threads : int, optional
        Torch CPU threads.
    seed : int, optional
        Unused (the method is deterministic); kept for a uniform interface.

    Attributes
    ----------
    device_used : str
        The device of the latest registration.
    """

    name: ClassVar[str] = "lccdemons"
    preset: str = DEFAULT_PRESET
    shrink_factors: tuple[int, ...] | None = None
    iterations: tuple[int, ...] | None = None
    sigma_lcc: float | None = None
    sigma_fluid: float | None = None
    sigma_diff: float | None = None
    sigma_i: float | None = None
    bch_terms: int | None = None
    device: str = "auto"
    threads: int | None = None
    seed: int | None = None
    device_used: str | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        if self.preset not in LCC_DEMONS_PRESETS:
            raise ValueError(f"unknown LCC-Demons preset {self.preset!r}; choose from {sorted(LCC_DEMONS_PRESETS)}")
        for key, value in LCC_DEMONS_PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.shrink_factors = tuple(int(s) for s in self.shrink_factors)
        self.iterations = tuple(int(n) for n in self.iterations)
        if not self.shrink_factors or len(self.shrink_factors) != len(self.iterations):
            raise ValueError(f"shrink_factors {self.shrink_factors} and iterations {self.iterations} must be "
                             "non-empty and of the same length")
        if min(self.shrink_factors) < 1 or min(self.iterations) < 0:
            raise ValueError("shrink factors must be >= 1 and iterations >= 0")
        self.sigma_lcc, self.sigma_fluid, self.sigma_diff, self.sigma_i = (
            float(self.sigma_lcc), float(self.sigma_fluid), float(self.sigma_diff), float(self.sigma_i))
        if self.sigma_lcc <= 0 or self.sigma_i <= 0 or self.sigma_fluid < 0 or self.sigma_diff < 0:
            raise ValueError("sigma_lcc and sigma_i must be > 0, sigma_fluid and sigma_diff >= 0")
        self.bch_terms = int(self.bch_terms)
        if self.bch_terms not in (2, 3):
            raise ValueError(f"bch_terms must be 2 or 3, got {self.bch_terms}")

    @property
    def parameters(self) -> dict[str, Any]:
        return {k: v for k, v in super().parameters.items() if k != "device_used"}

    def _register(self, fixed, moving, fixed_mask) -> Transform:
        import torch

        if fixed_mask is not None:
            warnings.warn("LCCDemonsMethod ignores fixed_mask (the local correlation is computed on the whole grid); "
                          "give it skull-stripped images", stacklevel=3)
        configure_threads(self.threads)
        grid = Grid.of(fixed)
        if not grid.same_as(Grid.of(moving)):  # methods run after the affine stage, on the fixed grid
            moving = Transform.identity(grid).apply(moving, interpolation="linear")
        dev = resolve_device(self.device)
        f = torch.as_tensor(np.asarray(fixed.dataobj, dtype=np.float32), device=dev)[None, None]
        m = torch.as_tensor(np.asarray(moving.dataobj, dtype=np.float32), device=dev)[None, None]
        with torch.no_grad():
            v = lcc_demons_velocity(f, m, shrink_factors=self.shrink_factors, iterations=self.iterations,
                                    sigma_lcc=self.sigma_lcc, sigma_fluid=self.sigma_fluid,
                                    sigma_diff=self.sigma_diff, sigma_i=self.sigma_i, bch_terms=self.bch_terms)
            forward = displacement_to_mm(exponential(v), grid)
            inverse = displacement_to_mm(exponential(-v), grid)
        self.device_used = str(dev) if dev.type != "cuda" else f"cuda:{dev.index or 0}"
        transform = Transform(grid, field=forward)
        transform.metadata.update(inverse_field=inverse, device=self.device_used)
        return transform


# ------------------------------------------------------------------------------------------------ the algorithm


def lcc_demons_velocity(fixed, moving, *, shrink_factors: Sequence[int] = (4, 2, 1),
                        iterations: Sequence[int] = (30, 20, 10), sigma_lcc: float = 3.0, sigma_fluid: float = 0.5,
                        sigma_diff: float = 1.0, sigma_i: float = 0.15, bch_terms: int = 2,
                        velocity=None):
    """The stationary velocity field of symmetric LCC-Demons, coarse to fine (see the module docstring).

    Parameters
    ----------
    fixed, moving : Tensor, shape (1, 1, X, Y, Z)
        The two images on one grid (any intensity scale).
    shrink_factors, iterations, sigma_lcc, sigma_fluid, sigma_diff, sigma_i, bch_terms
        As :class:`LCCDemonsMethod` (sigmas in voxels of each level's grid).
    velocity : Tensor, shape (1, 3, x, y, z), optional
        A starting velocity (voxels of its own grid), resampled onto the first level.

    Returns
    -------
    Tensor, shape (1, 3, X, Y, Z)
        ``v`` in voxels of the full grid (channel ``c`` along array axis ``c``): ``exp(v)`` maps fixed voxels to
        moving voxels, ``M o exp(v)`` matches ``F``.
    """
    from hdar_pipeline.hdar.layers import resize_flow, resize_volume

    if fixed.shape != moving.shape or fixed.dim() != 5 or fixed.shape[:2] != (1, 1):
        raise ValueError(f"expected two (1, 1, X, Y, Z) images of one shape, got {tuple(fixed.shape)} "
                         f"and {tuple(moving.shape)}")
    shape = tuple(int(n) for n in fixed.shape[2:])
    fixed, moving = fixed.float(), moving.float()
    v = velocity
    for shrink, n_iter in zip(shrink_factors, iterations):
        size = tuple(max(1, int(round(n / shrink))) for n in shape)
        f = resize_volume(fixed, size)
        m = resize_volume(moving, size)
        v = torch_zeros_like_field(f) if v is None else resize_flow(v, size)
        level = LCCLevel(f, m, sigma_lcc=sigma_lcc, sigma_fluid=sigma_fluid, sigma_diff=sigma_diff) if n_iter else None
        for _ in range(int(n_iter)):
            v = lcc_demons_step(f, m, v, sigma_lcc=sigma_lcc, sigma_fluid=sigma_fluid, sigma_diff=sigma_diff,
                                sigma_i=sigma_i, bch_terms=bch_terms, level=level)
    if v is None:
        v = torch_zeros_like_field(fixed)
    return resize_flow(v, shape)


def lcc_demons_step(fixed, moving, velocity, *, sigma_lcc: float, sigma_fluid: float, sigma_diff: float,
                    sigma_i: float, bch_terms: int = 2, level: LCCLevel | None = None):
    """One symmetric LCC-Demons iteration on one level: returns the new velocity ``(1, 3, X, Y, Z)`` (voxels).

    ``u_f`` (``F`` against ``M o exp(v)``) and ``u_b`` (``M`` against ``F o exp(-v)``) from :func:`lcc_update`,
    ``u = G_fluid * (u_f - u_b) / 2``, ``v <- G_diff * BCH(v, u)``. ``level``: the level's :class:`LCCLevel`
    for these images and sigmas (built here when not given; :func:`lcc_demons_velocity` builds one per level).
    """
    from hdar_pipeline.hdar.layers import sample_region

    if level is None:
        level = LCCLevel(fixed, moving, sigma_lcc=sigma_lcc, sigma_fluid=sigma_fluid, sigma_diff=sigma_diff)
    steps = squaring_steps(velocity)  # the same for -v
    warped_moving = sample_region(moving, exponential(velocity, steps), padding_mode="border")
    warped_fixed = sample_region(fixed, exponential(-velocity, steps), padding_mode="border")
    u_forward, _ = lcc_update(fixed, warped_moving, sigma_lcc=sigma_lcc, sigma_i=sigma_i, window=level.window,
                              fixed_stats=level.fixed_stats)
    u_backward, _ = lcc_update(moving, warped_fixed, sigma_lcc=sigma_lcc, sigma_i=sigma_i, window=level.window,
                               fixed_stats=level.moving_stats)
    update = u_forward.sub_(u_backward).mul_(0.5)
    del u_backward
    if level.fluid is not None:
        update = level.fluid(update)
    if bch_terms >= 3:
        velocity = velocity + update + 0.5 * lie_bracket(velocity, update)
    else:
        velocity = update.add_(velocity)
    if level.diffusion is not None:
        velocity = level.diffusion(velocity)
    return velocity


def lcc_update(fixed, warped, *, sigma_lcc: float, sigma_i: float, eps: float = 1e-4,
               window: LCCWindow | None = None, fixed_stats: LocalStats | None = None):
    """The demons step that increases ``sum_x LCC(fixed, warped)(x)``, and the local correlation map.

    The force on a displacement ``u`` of ``warped(x + u)`` is ``dE/dW * grad(W)`` (:func:`local_correlation`;
    the gradient by central differences, voxels); the step is ``rho^2 f / (rho^2 |f|^2 + sigma_i)`` with ``rho``
    the local correlation at the voxel, i.e. the authors' ``f / (|f|^2 + sigma_i / rho^2)`` without the division
    by zero where ``rho = 0``.

    Parameters
    ----------
    fixed, warped : Tensor, shape (1, 1, X, Y, Z)
    sigma_lcc : float
        Gaussian window of the local statistics, voxels.
    sigma_i : float
        Step trade-off (> 0): a step is at most ``|rho| / (2 sqrt(sigma_i))`` voxels long.
    eps : float
        See :func:`local_correlation`.
    window, fixed_stats
        Precomputed, see :func:`local_correlation`.

    Returns
    -------
    step : Tensor, shape (1, 3, X, Y, Z)
        In voxels.
    lcc : Tensor, shape (1, 1, X, Y, Z)
        The local correlation coefficient, in [-1, 1].
    """
    import torch

    lcc, d_energy = local_correlation(fixed, warped, sigma_lcc=sigma_lcc, eps=eps, window=window,
                                      fixed_stats=fixed_stats)
    force = spatial_gradient(warped).mul_(d_energy)
    del d_energy
    f0, f1, f2 = force.unbind(dim=1)
    norm2 = torch.addcmul(torch.addcmul(f0 * f0, f1, f1), f2, f2)[:, None]  # |f|^2, one pass per channel
    rho2 = lcc * lcc
    step = force.mul_(rho2 / norm2.mul_(rho2).add_(sigma_i))
    return step, lcc


def local_correlation(fixed, warped, *, sigma_lcc: float, eps: float = 1e-4, window: LCCWindow | None = None,
                      fixed_stats: LocalStats | None = None):
    """The local correlation coefficient map and the derivative of its sum with respect to ``warped``.

    ``LCC(x) = C / sqrt(A B)`` with the Gaussian-weighted (``sigma_lcc`` voxels) local variances ``A`` (fixed),
    ``B`` (warped) and covariance ``C`` (each image centred on its local mean): invariant to an affine change of
    either image's intensities. The exact derivative of ``E = sum_x LCC(x)`` with respect to ``warped(y)`` is
    ``F(y) G*a - G*b - W(y) G*c + G*d`` with ``a = 1/sqrt(AB)``, ``b = mean_F a``, ``c = LCC / B`` and
    ``d = LCC mean_W / B`` (``G*``: the same Gaussian, symmetric).

    Parameters
    ----------
    fixed, warped : Tensor, shape (1, 1, X, Y, Z)
    sigma_lcc : float
        Standard deviation of the window, voxels.
    eps : float
        Added to each local variance, relative to that image's global variance (so scale-invariant too): keeps
        flat regions (a zero background) finite; there ``LCC`` -> 0.
    window : LCCWindow, optional
        The window of ``sigma_lcc`` on this grid (built here when not given).
    fixed_stats : LocalStats, optional
        ``window.stats(fixed, eps)``: the fixed image's statistics, which do not change over a level's iterations.

    Returns
    -------
    lcc : Tensor, shape (1, 1, X, Y, Z)
        In [-1, 1].
    d_energy : Tensor, shape (1, 1, X, Y, Z)
        ``dE / d warped``, per unit of ``warped``'s intensity.
    """
    import torch

    if window is None:
        window = LCCWindow(fixed.shape[2:], sigma_lcc, device=fixed.device, dtype=fixed.dtype)
    fs = window.stats(fixed, eps) if fixed_stats is None else fixed_stats
    f, mf, var_f = fs.centred, fs.mean, fs.variance
    eps_w = eps * float(warped.var()) + 1e-12
    # global centring first: less cancellation in E[x^2] - E[x]^2 (float32)
    w = warped - warped.mean()
    # Window weights G(x - y) / N(x), zero outside the grid, N(x) = sum_y G(x - y): the local statistics are
    # weighted means over the voxels inside the grid, and dE/dW(y) = sum_x G(x - y) q(x) / N(x) is the same
    # (symmetric, zero-padded) Gaussian applied to q / N.
    inv_n = window.inv_mass
    stats = w.new_empty((w.shape[0], 3, *w.shape[2:]))
    stats[:, :1] = w
    torch.mul(w, w, out=stats[:, 1:2])
    torch.mul(f, w, out=stats[:, 2:])
    stats = window.blur(stats).mul_(inv_n)
    mw, ww, fw = stats.split(1, dim=1)
    var_w = (ww - mw * mw).clamp_(min=0.0).add_(eps_w)
    del ww
    a = torch.rsqrt(var_f * var_w)
    lcc = ((fw - mf * mw) * a).clamp_(-1.0, 1.0)
    del stats, fw
    c = lcc / var_w
    terms = a.new_empty((a.shape[0], 4, *a.shape[2:]))
    terms[:, :1] = a
    torch.mul(mf, a, out=terms[:, 1:2])
    terms[:, 2:3] = c
    torch.mul(c, mw, out=terms[:, 3:])
    terms = window.blur(terms.mul_(inv_n))
    del a, c
    ga, gb, gc, gd = terms.split(1, dim=1)
    return lcc, f * ga - gb - w * gc + gd


@dataclass
class LocalStats:
    """One image's share of the local statistics of :func:`local_correlation`.

    Attributes
    ----------
    centred : Tensor, shape (1, 1, X, Y, Z)
        The image minus its global mean.
    mean : Tensor, shape (1, 1, X, Y, Z)
        Its local (window) mean.
    variance : Tensor, shape (1, 1, X, Y, Z)
        Its local variance plus ``eps`` times its global variance.
    """

    centred: Any
    mean: Any
    variance: Any


class LCCWindow:
    """The normalised Gaussian window of the local statistics on one grid: the zero-padded blur ``G`` and
    ``1 / N`` (:func:`window_mass`), built once per grid.

    Parameters
    ----------
    shape : sequence of int
        The grid.
    sigma : float
        Standard deviation, voxels.
    device, dtype
        Of the images.
    """

    def __init__(self, shape: Sequence[int], sigma: float, *, device=None, dtype=None) -> None:
        import torch

        dtype = dtype or torch.float32
        self.blur = GaussianBlur(shape, sigma, padding="zeros", device=device, dtype=dtype)
        self.inv_mass = 1.0 / window_mass(shape, sigma, device=device, dtype=dtype)

    def stats(self, image, eps: float = 1e-4) -> LocalStats:
        """``image``'s centred values, local mean and local variance (plus ``eps`` times the global variance)."""
        import torch

        eps_i = eps * float(image.var()) + 1e-12
        centred = image - image.mean()
        mean, square = self.blur(torch.cat([centred, centred * centred], dim=1)).mul_(self.inv_mass).split(1, dim=1)
        return LocalStats(centred, mean, (square - mean * mean).clamp_(min=0.0).add_(eps_i))


class LCCLevel:
    """What stays fixed over the iterations of one level of :func:`lcc_demons_velocity`: the blurs and the local
    statistics of the two (level) images.

    Parameters
    ----------
    fixed, moving : Tensor, shape (1, 1, X, Y, Z)
        The level's images.
    sigma_lcc, sigma_fluid, sigma_diff : float
        As :class:`LCCDemonsMethod` (voxels); a zero sigma gives no blur (``None``).
    """

    def __init__(self, fixed, moving, *, sigma_lcc: float, sigma_fluid: float, sigma_diff: float) -> None:
        shape, kw = fixed.shape[2:], dict(device=fixed.device, dtype=fixed.dtype)
        self.window = LCCWindow(shape, sigma_lcc, **kw)
        self.fixed_stats = self.window.stats(fixed)
        self.moving_stats = self.window.stats(moving)
        self.fluid = GaussianBlur(shape, sigma_fluid, **kw) if sigma_fluid > 0 else None
        self.diffusion = GaussianBlur(shape, sigma_diff, **kw) if sigma_diff > 0 else None


class GaussianBlur:
    """:func:`~hdar_pipeline.hdar.layers.smooth` (same kernel, truncation and padding) on a fixed grid, as one
    matrix product per axis.

    Along an axis of ``n`` voxels the blur is ``out = K x`` with ``K`` the ``n x n`` banded matrix of the 1-D
    kernel, the padding folded in (zeros: taps outside dropped; replicate: added onto the edge voxel). The three
    products are plain (batched) matrix products of the contiguous volume, no padding or transposition: on a CPU
    two to three times faster than shifted sums, the same values up to float rounding. ``K`` is applied in blocks
    of rows that skip its zeros. Written into preallocated outputs: not differentiable (for autograd use
    :func:`~hdar_pipeline.hdar.layers.smooth`).

    Parameters
    ----------
    shape : sequence of int
        The grid ``(X, Y, Z)``.
    sigma : float or sequence of float
        Per axis, voxels; 0 skips an axis.
    padding : {"replicate", "zeros"}
    truncate : float
    device, dtype
    """

    #: Rows of a block of ``K``.
    block: ClassVar[int] = 32

    def __init__(self, shape: Sequence[int], sigma, *, padding: str = "replicate", truncate: float = 3.0,
                 device=None, dtype=None) -> None:
        import torch

        from hdar_pipeline.hdar.layers import as_triple, gaussian_kernel1d

        dtype = dtype or torch.float32
        if padding not in ("replicate", "zeros"):
            raise ValueError(f"padding must be 'replicate' or 'zeros', got {padding!r}")
        self.shape = tuple(int(n) for n in shape)
        self.axes = []
        for n, s in zip(self.shape, as_triple(sigma)):
            if s <= 0:
                self.axes.append(None)
                continue
            k = gaussian_kernel1d(float(s), truncate=truncate, dtype=dtype).double()  # smooth()'s values
            r = (k.numel() - 1) // 2
            i = torch.arange(n).view(-1, 1)
            j = i + torch.arange(-r, r + 1).view(1, -1)
            weights = k.view(1, -1).expand(n, -1)
            if padding == "zeros":
                inside = (j >= 0) & (j < n)
                i, j, weights = i.expand_as(j)[inside], j[inside], weights[inside]
            else:
                i, j = i.expand_as(j).reshape(-1), j.clamp(0, n - 1).reshape(-1)
                weights = weights.reshape(-1)
            matrix = torch.zeros(n, n, dtype=torch.float64).index_put_((i, j), weights, accumulate=True)
            blocks = []
            for lo in range(0, n, self.block):
                hi = min(n, lo + self.block)
                first, last = max(0, lo - r), min(n, hi + r)
                blocks.append((lo, hi, first, last,
                               matrix[lo:hi, first:last].to(device=device, dtype=dtype).contiguous()))
            self.axes.append(blocks)

    def __call__(self, x):
        """Blur ``(B, C, X, Y, Z)`` (on the grid of ``shape``)."""
        import torch

        if tuple(x.shape[2:]) != self.shape:
            raise ValueError(f"volume {tuple(x.shape)} does not match the blur's grid {self.shape}")
        nx, ny, nz = self.shape
        out = x.reshape(-1, nx * ny * nz)
        for axis, blocks in enumerate(self.axes):
            if blocks is None:
                continue
            # the axis's voxels are the rows of (a batch of) matrices, or the columns along the last axis
            src = out.reshape(((-1, nx, ny * nz), (-1, ny, nz), (-1, nz))[axis])
            res = torch.empty_like(src)
            for lo, hi, first, last, k in blocks:
                if axis < 2:
                    torch.matmul(k, src[..., first:last, :], out=res[..., lo:hi, :])
                else:
                    torch.mm(src[:, first:last], k.t(), out=res[:, lo:hi])
            out = res
        return out.reshape(x.shape)


def window_mass(shape: Sequence[int], sigma: float, *, device=None, dtype=None):
    """``N(x) = sum_y G(x - y)`` over the voxels ``y`` of a grid of ``shape`` (the zero-padded Gaussian of
    :func:`~hdar_pipeline.hdar.layers.smooth` applied to ones): ``(1, 1, *shape)``, 1 away from the borders.
    Separable, so the outer product of three 1-D sums."""
    import torch
    import torch.nn.functional as F

    from hdar_pipeline.hdar.layers import gaussian_kernel1d

    out = None
    for axis, n in enumerate(int(v) for v in shape):
        k = gaussian_kernel1d(float(sigma), device=device, dtype=dtype or torch.float32)
        r = (k.numel() - 1) // 2
        mass = F.conv1d(torch.ones(1, 1, n, device=device, dtype=k.dtype), k.view(1, 1, -1), padding=r).view(-1)
        view = [1, 1, 1]
        view[axis] = n
        mass = mass.view(*view)
        out = mass if out is None else out * mass
    return out[None, None]


# ------------------------------------------------------------------------------------------------ field tools


def torch_zeros_like_field(image):
    """A zero field ``(B, 3, X, Y, Z)`` on the grid, device and dtype of ``image`` ``(B, C, X, Y, Z)``."""
    import torch

    return torch.zeros((image.shape[0], 3, *image.shape[2:]), device=image.device, dtype=image.dtype)


def spatial_gradient(x):
    """Central differences (one-sided at the borders) of ``(B, 1, X, Y, Z)`` along the three array axes:
    ``(B, 3, X, Y, Z)``, per voxel (the values of ``torch.gradient``, written in place)."""
    import torch

    out = x.new_empty((x.shape[0], 3, *x.shape[2:]))
    for c, d in enumerate((2, 3, 4)):
        g, n = out[:, c:c + 1], int(x.shape[d])
        if n < 2:
            g.zero_()
            continue
        if n > 2:
            torch.sub(x.narrow(d, 2, n - 2), x.narrow(d, 0, n - 2), out=g.narrow(d, 1, n - 2)).div_(2.0)
        torch.sub(x.narrow(d, 1, 1), x.narrow(d, 0, 1), out=g.narrow(d, 0, 1))
        torch.sub(x.narrow(d, n - 1, 1), x.narrow(d, n - 2, 1), out=g.narrow(d, n - 1, 1))
    return out


def jacobian(field):
    """``J[:, c, k] = d field_c / d x_k`` of ``(B, 3, X, Y, Z)`` (voxels): ``(B, 3, 3, X, Y, Z)``."""
    import torch

    return torch.stack([spatial_gradient(field[:, c:c + 1]) for c in range(3)], dim=1)


def lie_bracket(v, u):
    """``[v, u] = (Dv) u - (Du) v`` of two velocity fields ``(B, 3, X, Y, Z)`` (voxels): the second-order term of
    the BCH formula ``log(exp(v) o exp(u)) = v + u + [v, u] / 2 + ...`` (Vercauteren et al., MICCAI 2008)."""
    jv, ju = jacobian(v), jacobian(u)
    return (jv * u[:, None]).sum(dim=2) - (ju * v[:, None]).sum(dim=2)


def squaring_steps(velocity, max_step: float = 0.5) -> int:
    """Scaling-and-squaring steps for ``velocity`` (voxels): enough that ``v / 2^n`` moves no voxel more than
    ``max_step`` voxels, at least 3 (deterministic for a given field)."""
    import torch

    if velocity.numel():
        # the largest squared length, then one square root: the channel-wise norm reduction is far slower on a CPU
        v0, v1, v2 = velocity.unbind(dim=1)
        largest = math.sqrt(float(torch.addcmul(torch.addcmul(v0 * v0, v1, v1), v2, v2).max()))
    else:
        largest = 0.0
    if not math.isfinite(largest):
        raise FloatingPointError("the velocity field is not finite")
    return max(3, int(math.ceil(math.log2(max(largest, 1e-6) / max_step))))


def exponential(velocity, steps: int | None = None):
    """Displacement of ``exp(velocity)`` by scaling and squaring, ``(B, 3, X, Y, Z)`` voxels (edge-extended).

    :class:`~hdar_pipeline.hdar.layers.VecInt` (the same values), with fewer passes over the field."""
    from hdar_pipeline.hdar.layers import sample_region

    n = squaring_steps(velocity) if steps is None else int(steps)
    disp = velocity * (1.0 / (2 ** n))
    for _ in range(n):
        disp = sample_region(disp, disp, padding_mode="border").add_(disp)
    return disp


def displacement_to_mm(displacement, grid: Grid) -> np.ndarray:
    """A displacement ``(1, 3, *grid.shape)`` in voxels (channel ``c`` along array axis ``c``) as the LPS-mm field
    ``(*grid.shape, 3)`` of :class:`~hdar_pipeline.core.transforms.Transform`: ``L d`` with ``L`` the linear part of the
    grid's voxel-to-LPS affine."""
    import torch

    lin = torch.as_tensor(grid.lps_affine[:3, :3], dtype=torch.float32, device=displacement.device)
    mm = torch.einsum("ca,a...->...c", lin, displacement[0].float())
    return np.ascontiguousarray(mm.cpu().numpy(), dtype=np.float32)



LORENZI2013 = Reference(
    "lorenzi2013",
    "Lorenzi M, Ayache N, Frisoni GB, Pennec X. LCC-Demons: a robust and accurate symmetric "
    "diffeomorphic registration algorithm. *NeuroImage*. 2013;81:470-483. "
    "doi:10.1016/j.neuroimage.2013.04.114",
    "Lorenzi et al. 2013", "article", {
        "author": "Lorenzi, M. and Ayache, N. and Frisoni, G. B. and Pennec, X.",
        "title": "{LCC-Demons}: a robust and accurate symmetric diffeomorphic registration algorithm",
        "journal": "NeuroImage", "year": "2013", "volume": "81", "pages": "470--483",
        "doi": "10.1016/j.neuroimage.2013.04.114"})


def describe(params: Mapping[str, Any], preset: str, context: SentenceContext) -> str:
    """The methods paragraph's sentence on LCC-Demons (see :class:`~.registry.MethodSpec`)."""
    cite = context.cite
    used = set(ALWAYS_SKIPPED) | {"device", "threads"}
    text = ("LCC-Demons registration " + cite("lorenzi2013") + " used hdar-pipeline's PyTorch"
            + context.version("torch")
            + " implementation of symmetric log-domain diffeomorphic Demons with local correlation coefficient "
              "forces")
    details = []
    if params.get("sigma_lcc") is not None:
        used.add("sigma_lcc")
        details.append(f"a Gaussian correlation window of {value_text(params['sigma_lcc'])} voxels")
    if params.get("sigma_i") is not None:
        used.add("sigma_i")
        details.append(f"step trade-off sigma_i {value_text(params['sigma_i'])}")
    if params.get("sigma_fluid") is not None:
        used.add("sigma_fluid")
        details.append(f"each update smoothed by a Gaussian of {value_text(params['sigma_fluid'])} voxels "
                       "(fluid-like)")
    if params.get("sigma_diff") is not None:
        used.add("sigma_diff")
        details.append(f"the stationary velocity field by one of {value_text(params['sigma_diff'])} voxels "
                       "(diffusion-like)")
    shrink, iters = params.get("shrink_factors"), params.get("iterations")
    if shrink is not None and iters is not None:
        used |= {"shrink_factors", "iterations"}
        details.append(f"{value_text(iters)} iterations at shrink factors {value_text(shrink)}")
    text += (" (" + "; ".join(details) + ")") if details else ""
    text += (", the transformation being the velocity field's exponential computed by scaling and squaring, "
             "and the inverse that of the negated velocity.")
    if preset:
        text += f" Preset: `{preset}`."
    return text + other_parameters(params, used)


SPEC = MethodSpec(
    name="lccdemons", title="LCC-Demons", method_class=LCCDemonsMethod, describe=describe, references=(LORENZI2013,),
    presets={"default": "the paper's parameters: 30/20/10 iterations at shrink 4/2/1, sigma_LCC 3, fluid 0.5, "
                        "diffusion 1.0 voxels",
             "fast": "the two coarse levels only"},
    default_preset=DEFAULT_PRESET, inverse="LCC-Demons' negated velocity",
    presets_summary="default: the LCC-Demons paper's parameters; fast: the two coarse levels only",
    uses_device=True,
    variants=(BenchmarkVariant("lccdemons", None, {}, "LCC-Demons (PyTorch), the paper's parameters, 3 levels",
                               order=30),))


__all__ = ["DEFAULT_PRESET", "GaussianBlur", "LCCDemonsMethod", "LCCLevel", "LCCWindow", "LCC_DEMONS_PRESETS",
           "LocalStats", "displacement_to_mm", "exponential", "lcc_demons_step", "lcc_demons_velocity", "lcc_update",
           "lie_bracket", "local_correlation"]
