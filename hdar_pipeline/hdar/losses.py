"""Training losses of HDAR: local NCC, smoothness (diffusion and the anti-folding variant), soft Dice.

Sign convention: every function here returns a quantity to **minimise**. :func:`local_ncc_loss` is
the negative mean local squared correlation, in ``[-1, 0]``: ``-1`` is a perfect local match (an image
with itself, wherever it has texture), ``0`` no correlation. Fields are ``(B, 3, X, Y, Z)`` in voxel
units; gradients are forward differences in voxels.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from hdar_pipeline.hdar.layers import as_triple


def box_sum(x: torch.Tensor, window: int | Sequence[int], *, transpose: bool = False) -> torch.Tensor:
    """Sum over a centred ``window``-voxel box of every voxel of ``(B, C, X, Y, Z)``, zero outside.

    Three separable 1-D box sums of shifted views of the zero-padded volume (:func:`_window_sums`): at most
    ``3w`` instead of ``w^3`` additions per voxel, ``3 (log2 w + popcount w - 1)`` for windows over 4. (Measured on the CPU, forward and backward, this is
    2x faster than ``avg_pool3d`` with 1-D kernels, itself faster than a single-channel ``conv3d``; a
    cumulative sum is faster still but loses float32 precision in the variances of flat regions.)
    Without autograd (the closed-form gradients of :class:`LocalNCC` and the block NCC) the sums accumulate
    in place instead (:func:`_window_sums_in_place`).
    Even windows are centred on the voxel's high side; ``transpose=True`` gives the adjoint operator
    (the box mirrored, centred on the low side; the same operator for odd windows), which is what the
    gradient of a box sum needs.
    """
    b, c = x.shape[:2]
    out = x.reshape(b * c, *x.shape[2:])
    in_place = not (torch.is_grad_enabled() and x.requires_grad)
    for axis, w in enumerate(as_triple(window)):
        w = int(w)
        if w <= 1:
            continue
        n = out.shape[1 + axis]
        low, high = ((w - 1) // 2, w // 2) if not transpose else (w // 2, (w - 1) // 2)
        if in_place:
            out = _window_sums_in_place(out, 1 + axis, low, high)
            continue
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = low
        pad[2 * (2 - axis) + 1] = high
        out = _window_sums(F.pad(out, pad), 1 + axis, n, w)
    return out.reshape(b, c, *x.shape[2:])


def _window_sums_in_place(x: torch.Tensor, dim: int, low: int, high: int) -> torch.Tensor:
    """``out[i] = sum_{-low <= k <= high} x[i + k]`` along ``dim`` (zero outside), accumulated in place into one
    copy of ``x``: no padded copies and no temporaries, 1.3-1.8x faster than :func:`_window_sums` on the
    CPU for windows of 3-9 (fresh large tensors cost page faults). Not for tensors that need a gradient."""
    n = x.shape[dim]
    out = x.clone()
    for k in range(1, min(low, n - 1) + 1):
        out.narrow(dim, k, n - k).add_(x.narrow(dim, 0, n - k))
    for k in range(1, min(high, n - 1) + 1):
        out.narrow(dim, 0, n - k).add_(x.narrow(dim, k, n - k))
    return out


def _window_sums(padded: torch.Tensor, dim: int, n: int, w: int) -> torch.Tensor:
    """``sum_{i < w} padded.narrow(dim, i, n)``. Up to 4 terms, one shifted view after another; wider
    windows by doubling: sums of 2, 4, 8, ... neighbours, each the sum of two shifted halves, combined by
    the binary digits of ``w`` (``log2 w + popcount w - 1`` additions instead of ``w - 1``: 4 instead of
    8 for the window of 9)."""
    if w <= 4:
        acc = padded.narrow(dim, 0, n) + padded.narrow(dim, 1, n)
        for i in range(2, w):
            acc = acc + padded.narrow(dim, i, n)
        return acc
    parts = []
    offset, span, rest, sums = 0, 1, w, padded
    while True:
        if rest & 1:
            parts.append(sums.narrow(dim, offset, n))
            offset += span
        rest >>= 1
        if not rest:
            break
        length = sums.shape[dim] - span
        sums = sums.narrow(dim, 0, length) + sums.narrow(dim, span, length)
        span *= 2
    if len(parts) == 1:
        return parts[0]
    total = parts[0] + parts[1]
    for part in parts[2:]:
        total = total + part
    return total


def local_ncc(fixed: torch.Tensor, warped: torch.Tensor, window: int | Sequence[int] = 9,
              eps: float = 1e-8) -> torch.Tensor:
    """Local squared normalised cross-correlation map, ``(B, 1, X, Y, Z)`` in ``[0, 1]``.

    For each voxel, over the ``window^3`` box (voxels outside the volume excluded):
    ``cc = cov(F, M)^2 / (var(F) var(M) + eps)`` with means, variances and covariance computed from
    box sums divided by the number of in-volume voxels. For stability each image is first centred on
    its global mean (less cancellation in ``E[x^2] - E[x]^2``), variances are clamped at 0, and ``eps``
    (on the variance-product scale of [0, 1] intensities; brain windows have products of about 1e-6
    to 1e-3, so the bias is below 1 % wherever the local standard deviation exceeds 0.03) keeps flat
    regions finite; there ``cc`` -> 0.
    """
    if fixed.shape != warped.shape:
        raise ValueError(f"shapes differ: {tuple(fixed.shape)} vs {tuple(warped.shape)}")
    i = fixed - fixed.mean(dim=(2, 3, 4), keepdim=True)
    j = warped - warped.mean(dim=(2, 3, 4), keepdim=True)
    ones = torch.ones_like(i[:1, :1])
    n = box_sum(ones, window)
    stats = box_sum(torch.cat([i, j, i * i, j * j, i * j], dim=1), window) / n
    mi, mj, ii, jj, ij = stats.unbind(dim=1)
    var_i = torch.clamp(ii - mi * mi, min=0.0)
    var_j = torch.clamp(jj - mj * mj, min=0.0)
    cov = ij - mi * mj
    cc = cov * cov / (var_i * var_j + eps)
    return cc.unsqueeze(1)


def local_ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int | Sequence[int] = 9,
                   eps: float = 1e-8, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``-mean(local_ncc)`` (optionally over ``mask`` voxels), in ``[-1, 0]``; ``-1`` is best.

    Inputs ``(B, 1, X, Y, Z)`` with intensities in [0, 1]; the channel count must be 1. When the fixed
    image needs no gradient (training and instance optimisation), the value and its gradient with
    respect to ``warped`` come from :class:`LocalNCC` (closed-form gradient, about 3x faster than
    differentiating the box sums); otherwise autograd differentiates :func:`local_ncc`.
    """
    if not fixed.requires_grad:
        return LocalNCC(fixed, window, eps, mask).loss(warped)
    cc = local_ncc(fixed, warped, window, eps)
    if mask is None:
        return -cc.mean()
    m = mask.to(cc.dtype)
    return -(cc * m).sum() / m.sum().clamp(min=1.0)


def ncc_from_sums(sums: torch.Tensor, window: int | Sequence[int], inv_n: torch.Tensor, mi: torch.Tensor,
                  var_i: torch.Tensor, eps: float) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Local squared correlation from per-position sums of the moving image's terms.

    ``sums`` ``(B, 3, ...)`` holds, per position, ``sum j``, ``sum j^2`` and ``sum i j`` (``i``, ``j`` the
    centred fixed and moving intensities) over whatever the position stands for (a voxel, or a block of
    voxels); the window statistics are their box sums over ``window`` positions times ``inv_n`` (one over
    the number of voxels in the window), next to the fixed image's window mean ``mi`` and variance
    ``var_i``. Returns ``cc`` ``(B, 1, ...)`` and the terms :func:`ncc_sum_gradients` needs.
    """
    stats = box_sum(sums, window) * inv_n
    mj, jj, ij = stats[:, :1], stats[:, 1:2], stats[:, 2:]
    var_j_raw = jj - mj * mj
    var_j = torch.clamp(var_j_raw, min=0.0)
    cov = ij - mi * mj
    denom = var_i * var_j + eps
    return cov * cov / denom, (mj, var_j_raw, cov, denom)


def ncc_sum_gradients(terms: Sequence[torch.Tensor], weight: torch.Tensor | float, window: int | Sequence[int],
                      inv_n: torch.Tensor, mi: torch.Tensor, var_i: torch.Tensor) -> torch.Tensor:
    """Gradient of ``sum(weight * cc)`` with respect to the three ``sums`` of :func:`ncc_from_sums`.

    With ``a = 2 cov / D`` and ``b2 = -2 cov^2 var_i / D^2`` (0 where the moving variance is clamped),
    ``d cc / d(mean j) = -(a mi + b2 mj)``, ``d cc / d(mean j^2) = b2 / 2`` and ``d cc / d(mean i j) = a``;
    the window means are box sums times ``inv_n``, so the gradient is the adjoint box sum
    (:func:`box_sum` with ``transpose=True``) of those coefficients times ``weight * inv_n``.
    Returns ``(B, 3, ...)``: with respect to ``sum j``, ``sum j^2`` and ``sum i j``.
    """
    mj, var_j_raw, cov, denom = terms
    a = 2.0 * cov / denom
    b2 = torch.where(var_j_raw > 0, -2.0 * cov * cov * var_i / (denom * denom), torch.zeros_like(cov))
    scale = weight * inv_n
    coef = torch.cat([-(a * mi + b2 * mj) * scale, 0.5 * b2 * scale, a * scale], dim=1)
    return box_sum(coef, window, transpose=True)


class LocalNCC:
    """The local NCC loss against one fixed image, with the fixed image's window statistics computed once.

    ``LocalNCC(fixed, window).loss(warped)`` equals ``local_ncc_loss(fixed, warped, window)`` (same
    definition as :func:`local_ncc`: in-volume windows, global centring, clamped variances, ``eps``)
    and is differentiable with respect to ``warped`` through a closed-form gradient. Reuse one object
    across the steps of an optimisation against the same fixed image.

    The gradient: with box sums over the window ``W_v`` of voxel ``v`` (``n_v`` in-volume voxels),
    ``cc_v = cov_v^2 / (var_F,v var_M,v + eps)``, so for a loss ``-sum_v w_v cc_v``::

        dL/dM(x) = -sum_{v : x in W_v} (w_v / n_v) [a_v (F(x) - mean_F,v) + 2 b_v (M(x) - mean_M,v)]
        a_v = 2 cov_v / D_v,   b_v = -cov_v^2 var_F,v / D_v^2 (0 where var_M,v is clamped),
        D_v = var_F,v var_M,v + eps

    i.e. three adjoint box sums (:func:`box_sum` with ``transpose=True``) of per-voxel coefficients.

    Parameters
    ----------
    fixed : Tensor ``(B, 1, X, Y, Z)``
        Intensities in [0, 1]; treated as a constant.
    window : int or 3 ints
        Box size in voxels.
    eps : float
        Added to the variance product.
    mask : Tensor ``(B, 1, X, Y, Z)``, optional
        Average only over these voxels (as :func:`local_ncc_loss` does).
    """

    def __init__(self, fixed: torch.Tensor, window: int | Sequence[int] = 9, eps: float = 1e-8,
                 mask: torch.Tensor | None = None) -> None:
        if fixed.dim() != 5 or fixed.shape[1] != 1:
            raise ValueError(f"fixed must be (B, 1, X, Y, Z), got {tuple(fixed.shape)}")
        with torch.no_grad():
            fixed = fixed.detach()
            self.window, self.eps = window, float(eps)
            self.i = fixed - fixed.mean(dim=(2, 3, 4), keepdim=True)
            self.inv_n = 1.0 / box_sum(torch.ones_like(self.i[:1, :1]), window)
            stats = box_sum(torch.cat([self.i, self.i * self.i], dim=1), window) * self.inv_n
            self.mi = stats[:, :1]
            self.var_i = torch.clamp(stats[:, 1:] - self.mi * self.mi, min=0.0)
            if mask is None:
                self.weight: torch.Tensor | float = 1.0 / self.i.numel()
            else:
                m = mask.to(fixed.dtype).expand_as(fixed)
                self.weight = m / m.sum().clamp(min=1.0)

    def loss(self, warped: torch.Tensor) -> torch.Tensor:
        """``-mean(local_ncc(fixed, warped))``, a scalar; ``warped`` ``(B, 1, X, Y, Z)`` like ``fixed``."""
        if warped.shape != self.i.shape:
            raise ValueError(f"shapes differ: {tuple(self.i.shape)} vs {tuple(warped.shape)}")
        return _LocalNCCLoss.apply(warped, self)


class _LocalNCCLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, warped: torch.Tensor, ncc: LocalNCC) -> torch.Tensor:  # type: ignore[override]
        i = ncc.i
        j = warped - warped.mean(dim=(2, 3, 4), keepdim=True)
        cc, terms = ncc_from_sums(torch.cat([j, j * j, i * j], dim=1), ncc.window, ncc.inv_n, ncc.mi, ncc.var_i,
                                  ncc.eps)
        ctx.ncc = ncc
        ctx.save_for_backward(j, *terms)
        return -(cc * ncc.weight).sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        ncc: LocalNCC = ctx.ncc
        j, *terms = ctx.saved_tensors
        g = ncc_sum_gradients(terms, -grad_out * ncc.weight, ncc.window, ncc.inv_n, ncc.mi, ncc.var_i)
        grad = g[:, :1] + 2.0 * j * g[:, 1:2] + ncc.i * g[:, 2:]
        # the global centring of the warped image: the loss is shift-invariant, so this only removes
        # rounding; it keeps the gradient equal to autograd's through the centring
        grad = grad - grad.mean(dim=(2, 3, 4), keepdim=True)
        return grad, None


def spatial_gradients(flow: torch.Tensor) -> list[torch.Tensor]:
    """Forward differences along ``X, Y, Z`` of ``(B, C, X, Y, Z)`` (each one voxel shorter on its axis)."""
    return [flow[:, :, 1:] - flow[:, :, :-1],
            flow[:, :, :, 1:] - flow[:, :, :, :-1],
            flow[:, :, :, :, 1:] - flow[:, :, :, :, :-1]]


def diffusion_loss(flow: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser ``mean_axes(mean(|d u / d x_a|^2))`` (VoxelMorph's ``Grad('l2')``), voxels^2/voxel^2."""
    return sum(g.pow(2).mean() for g in spatial_gradients(flow)) / 3.0


def _crop_common(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Crop forward differences to the common ``(X-1, Y-1, Z-1)`` block."""
    x, y, z = (grads[0].shape[2] , grads[1].shape[3], grads[2].shape[4])
    return [g[:, :, :x, :y, :z] for g in grads]


def jacobian_determinant(flow: torch.Tensor) -> torch.Tensor:
    """``det(I + grad u)`` from forward differences, ``(B, X-1, Y-1, Z-1)`` (voxel grid, unitless)."""
    gx, gy, gz = _crop_common(spatial_gradients(flow))
    # J[c][a] = d(x_c + u_c)/d x_a
    j00, j01, j02 = 1 + gx[:, 0], gy[:, 0], gz[:, 0]
    j10, j11, j12 = gx[:, 1], 1 + gy[:, 1], gz[:, 1]
    j20, j21, j22 = gx[:, 2], gy[:, 2], 1 + gz[:, 2]
    return (j00 * (j11 * j22 - j12 * j21) - j01 * (j10 * j22 - j12 * j20) + j02 * (j10 * j21 - j11 * j20))


def anti_folding_loss(flow: torch.Tensor, *, compress_weight: float = 2.0, fold_weight: float = 1.0,
                      min_jacobian: float = 0.0) -> torch.Tensor:
    """Asymmetric smoothness that penalises compression more than expansion, plus a folding barrier.

    What is implemented (the paper states the idea, "punish compressive gradients more than
    expansive ones", not a formula)::

        L = mean_x [ sum_{c != a} g_ca^2  +  sum_a rho(g_aa) ] / 9
            + fold_weight * mean_x relu(min_jacobian - det(I + grad u))^2

        g_ca = d u_c / d x_a   (forward differences, voxels)
        rho(g) = g^2                     if g >= 0   (local stretching along axis a)
               = compress_weight * g^2   if g < 0    (local compression along axis a)

    With ``compress_weight = 1`` and ``fold_weight = 0`` this is exactly :func:`diffusion_loss`. The
    diagonal terms ``d u_a / d x_a`` are the axis-wise stretches whose sum is the divergence; pushing
    them towards -1 is what collapses the Jacobian, so they cost more there. The second term is zero
    for every non-folding field (``det > min_jacobian``) and grows quadratically with the depth of a
    fold, which keeps its gradient continuous.
    """
    return _AntiFoldingLoss.apply(flow, float(compress_weight), float(fold_weight), float(min_jacobian))


def _jacobian_entries(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``J[c][a] = delta_ca + d u_c / d x_a`` on the common block, each ``(B, X-1, Y-1, Z-1)``."""
    gx, gy, gz = _crop_common(grads)
    return [[1 + gx[:, 0], gy[:, 0], gz[:, 0]], [gx[:, 1], 1 + gy[:, 1], gz[:, 1]], [gx[:, 2], gy[:, 2], 1 + gz[:, 2]]]


def _determinant(j: list[list[torch.Tensor]]) -> torch.Tensor:
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1]) - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


class _AntiFoldingLoss(torch.autograd.Function):
    """:func:`anti_folding_loss` with its gradient in closed form: the adjoint of the forward differences
    applied to the loss's derivative with respect to them (the folding term's only at the folded voxels,
    which are few): several times faster than autograd through the slices, and no intermediate graph."""

    @staticmethod
    def forward(ctx, flow: torch.Tensor, compress_weight: float, fold_weight: float,  # type: ignore[override]
                min_jacobian: float) -> torch.Tensor:
        grads = spatial_gradients(flow)
        total = flow.new_zeros(())
        for a, g in enumerate(grads):
            count = g.numel() // g.shape[1]
            compressed = torch.clamp(g[:, a:a + 1], max=0.0)
            total = total + (g.square().sum() + (compress_weight - 1.0) * compressed.square().sum()) / count
        loss = total / 9.0
        fold = flow.new_zeros(0)
        if fold_weight:
            fold = torch.relu(min_jacobian - _determinant(_jacobian_entries(grads)))
            loss = loss + fold_weight * fold.square().mean()
        ctx.params = (compress_weight, fold_weight, tuple(flow.shape[2:]))
        ctx.save_for_backward(*grads, fold)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        *grads, fold = ctx.saved_tensors
        compress_weight, fold_weight, shape = ctx.params
        hs = []
        for a, g in enumerate(grads):
            # d loss / d g_ca = 2 g_ca / (9 M_a), the compressed diagonal entries times compress_weight
            c = 2.0 / (9.0 * (g.numel() // g.shape[1]))
            h = g * c
            h[:, a:a + 1].add_(torch.clamp(g[:, a:a + 1], max=0.0), alpha=(compress_weight - 1.0) * c)
            hs.append(h)
        if fold_weight and fold.numel():
            where = torch.nonzero(fold > 0, as_tuple=True)
            if where[0].numel():
                # d det / d J[c][a] is the cofactor C[c][a]; evaluated only at the folded voxels
                j = [[e[where] for e in row] for row in _jacobian_entries(list(grads))]
                d_det = -2.0 * fold_weight * fold[where] / fold.numel()
                for a in range(3):
                    q1, q2 = [q for q in range(3) if q != a]
                    for c in range(3):
                        r1, r2 = [r for r in range(3) if r != c]
                        sign = 1.0 if (c + a) % 2 == 0 else -1.0
                        cof = sign * (j[r1][q1] * j[r2][q2] - j[r1][q2] * j[r2][q1]) * d_det
                        channel = torch.full_like(where[0], c)
                        hs[a].index_put_((where[0], channel, *where[1:]), cof, accumulate=True)
        grad = torch.zeros((grads[0].shape[0], 3, *shape), dtype=grads[0].dtype, device=grads[0].device)
        for a, h in enumerate(hs):
            # adjoint of g[k] = u[k + 1] - u[k]: u[k + 1] gets +h[k], u[k] gets -h[k]
            dim, n = 2 + a, h.shape[2 + a]
            grad.narrow(dim, 1, n).add_(h)
            grad.narrow(dim, 0, n).sub_(h)
        return grad * grad_out, None, None, None


def one_hot(labels: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    """One-hot ``(B, len(values), X, Y, Z)`` float from integer labels ``(B, 1, X, Y, Z)`` or ``(B, X, Y, Z)``."""
    if labels.dim() == 5:
        labels = labels[:, 0]
    return torch.stack([(labels == v) for v in values], dim=1).float()


def soft_dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-5,
                   include_background: bool = False) -> torch.Tensor:
    """``1 - mean_k Dice_k`` for soft one-hot maps ``(B, K, X, Y, Z)``.

    ``Dice_k = 2 sum(p_k t_k) / (sum p_k + sum t_k + eps)`` per batch element and channel; channel 0
    is treated as background and skipped unless ``include_background``. Channels absent from both
    maps are ignored in the mean. Warp one-hot labels with the trilinear
    :class:`~hdar_pipeline.hdar.layers.SpatialTransformer` to get a differentiable ``pred``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if not include_background:
        pred, target = pred[:, 1:], target[:, 1:]
    dims = (2, 3, 4)
    inter = (pred * target).sum(dims)
    denom = pred.sum(dims) + target.sum(dims)
    present = denom > eps
    dice = 2.0 * inter / (denom + eps)
    if not bool(present.any()):
        return pred.new_zeros(())
    return 1.0 - dice[present].mean()
