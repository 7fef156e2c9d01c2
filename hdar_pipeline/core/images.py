"""Load, validate, normalise and resample 3-D brain MR volumes.

Images are carried around as :class:`nibabel.Nifti1Image` objects. Their ``affine`` maps voxel
indices ``(i, j, k)`` to RAS+ world coordinates in millimetres (the NIfTI convention); arrays are
indexed ``[i, j, k]``. ITK, ANTs and the transform files of this package use LPS+ world
coordinates instead; :func:`ras_to_lps` and :func:`lps_affine` convert between the two (LPS = RAS with
the first two axes negated).

Every validation failure raises :class:`ImageError`, whose message names the file and the problem.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

if TYPE_CHECKING:  # pragma: no cover
    import ants
    import SimpleITK as sitk

PathLike = str | os.PathLike

#: Flips the first two world axes: RAS+ <-> LPS+ (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

SUPPORTED_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh", ".img", ".img.gz", ".hdr")


class ImageError(ValueError):
    """An input image cannot be used. The message names the file and the problem."""

    def __init__(self, source: PathLike | str | None, problem: str):
        self.source = str(source) if source is not None else "<in-memory image>"
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")

    def __reduce__(self):
        # rebuilt from its two arguments (the default would pass the one formatted message): it travels
        # between processes (hdar_pipeline.pipeline.isolation) as itself
        return (type(self), (None if self.source == "<in-memory image>" else self.source, self.problem))


@dataclass(frozen=True)
class Grid:
    """A voxel grid: array shape and the voxel-to-world (RAS+, mm) affine.

    Attributes
    ----------
    shape : tuple of int
        Number of voxels along the three array axes ``(i, j, k)``.
    affine : ndarray, shape (4, 4)
        Maps homogeneous voxel indices to RAS+ world coordinates in millimetres.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray

    @classmethod
    def of(cls, image: nib.spatialimages.SpatialImage | "Grid") -> "Grid":
        """The grid of an image (or the grid itself)."""
        if isinstance(image, Grid):
            return image
        return cls(tuple(int(s) for s in image.shape[:3]), np.asarray(image.affine, dtype=np.float64))

    @property
    def lps_affine(self) -> np.ndarray:
        """Voxel index -> LPS+ world (mm), the ITK/ANTs convention."""
        return RAS_TO_LPS @ self.affine

    @property
    def spacing(self) -> np.ndarray:
        """Voxel sizes in mm along ``(i, j, k)``."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def lps_points(self, dtype=np.float32) -> np.ndarray:
        """LPS world coordinates of every voxel centre, shape ``(*shape, 3)``."""
        a = self.lps_affine.astype(np.float64)
        axes = [np.arange(n, dtype=np.float64) for n in self.shape]
        out = np.empty((*self.shape, 3), dtype=dtype)
        for c in range(3):
            out[..., c] = (
                a[c, 0] * axes[0][:, None, None]
                + a[c, 1] * axes[1][None, :, None]
                + a[c, 2] * axes[2][None, None, :]
                + a[c, 3]
            )
        return out

    def same_as(self, other: "Grid", atol: float = 1e-4) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)


def _describe(source: PathLike | None) -> str:
    return str(source) if source is not None else "<in-memory image>"


def load_image(path: PathLike, *, dtype=np.float32, labels: bool = False, allow_empty: bool = False) -> nib.Nifti1Image:
    """Load and validate a 3-D volume.

    Reads NIfTI (``.nii``, ``.nii.gz``), MGH/MGZ and Analyze (``.img``/``.hdr``, optionally
    gzipped) through nibabel. A 4-D image with a single volume is squeezed to 3-D.

    Parameters
    ----------
    path : path-like
        The image file.
    dtype : numpy dtype
        Data type of the returned array (ignored for ``labels=True``, which keeps integers).
    labels : bool
        Treat the image as a label map: values must be non-negative integers; returned as int32.
    allow_empty : bool
        Accept an image whose every voxel is zero (e.g. warped labels that lost every label, to be scored).

    Returns
    -------
    nibabel.Nifti1Image
        A NIfTI image in memory with the file's voxel-to-RAS affine.

    Raises
    ------
    ImageError
        The file is missing or unreadable, or the image fails :func:`validate_image`.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "file not found")
    if path.is_dir():
        raise ImageError(path, "is a directory, not an image file")
    name = path.name.lower()
    if not any(name.endswith(s) for s in SUPPORTED_SUFFIXES):
        raise ImageError(path, f"unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)})")
    try:
        data, affine = _read(path)
    except ImageError:
        raise
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise ImageError(path, f"cannot be read as an image ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImageError(path, f"expected a 3-D image (or 4-D with one volume), got shape {data.shape}")
    _check_affine(affine, path)
    arr = _as_labels(data, path) if labels else np.asarray(data, dtype=dtype)
    out = nib.Nifti1Image(arr, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    validate_image(out, source=path, labels=labels, allow_empty=allow_empty)
    return out


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine of an image file, in memory.

    Analyze pairs distributed as ``name.img.gz`` beside a plain ``name.hdr`` (as LPBA40 ships them)
    are not understood by nibabel directly; they are decompressed into a temporary folder.
    """
    name = path.name.lower()
    stem = path.name[: -len(".img.gz")] if name.endswith(".img.gz") else path.name[: -len(".hdr")] \
        if name.endswith(".hdr") else None
    if stem is not None:
        img_gz, hdr = path.parent / f"{stem}.img.gz", path.parent / f"{stem}.hdr"
        if img_gz.exists() and hdr.exists() and not (path.parent / f"{stem}.img").exists():
            import gzip
            import shutil
            import tempfile

            with tempfile.TemporaryDirectory(prefix="hdar-analyze-") as tmp:
                shutil.copyfile(hdr, Path(tmp) / f"{stem}.hdr")
                with gzip.open(img_gz, "rb") as src, open(Path(tmp) / f"{stem}.img", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                with _quiet_nibabel():
                    img = nib.load(str(Path(tmp) / f"{stem}.hdr"))
                _check_pixdims(img, path)
                return np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
        if name.endswith(".img.gz") and not hdr.exists() and not (path.parent / f"{stem}.hdr.gz").exists():
            raise ImageError(path, f"Analyze image without its header (expected {hdr.name} beside it)")
    with _quiet_nibabel():  # header repairs are checked below, with the file's name
        img = _nifti_from_memory(path) if name.endswith(".nii.gz") else None
        if img is None:
            img = nib.load(str(path))
    _check_pixdims(img, path)
    return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def _nifti_from_memory(path: Path) -> nib.spatialimages.SpatialImage | None:
    """A ``.nii.gz`` file read whole and inflated in one zlib call (``None`` when it is not NIfTI-1/2).

    nibabel's gzip reader inflates in hundreds of small reads, each taking the GIL back; beside a thread that
    holds it (``hdar register`` imports torch while it reads), a 160x192x160 image then took 1 s instead of
    0.2 s. One call releases the GIL once, for the whole file.
    """
    import gzip
    import io

    raw = gzip.decompress(path.read_bytes())
    size = int.from_bytes(raw[:4], "little") if len(raw) >= 4 else 0
    if size not in (348, 540):
        size = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else 0
    klass = {348: nib.Nifti1Image, 540: nib.Nifti2Image}.get(size)
    if klass is None:
        return None
    holder = nib.FileHolder(filename=str(path), fileobj=io.BytesIO(raw))
    return klass.from_file_map({"header": holder, "image": holder})


@contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Silence nibabel's header-repair log lines (they name no file); :func:`_check_pixdims` reports instead."""
    logger = nib.imageglobals.logger
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _check_pixdims(img: nib.spatialimages.SpatialImage, source: PathLike) -> None:
    """Refuse a NIfTI/Analyze header whose voxel size (``pixdim[1:4]``) is 0, negative or not finite for a
    spatial axis.

    nibabel repairs such a header on load (0 becomes 1 mm, with a log line that names no file), so the
    image would register with a made-up geometry; the header is read again here as the file has it.
    """
    header = img.header
    if not isinstance(header, nib.analyze.AnalyzeHeader):
        return
    try:
        holder = img.file_map.get("header") or img.file_map["image"]  # a .nii has its header in the image
        with holder.get_prepare_fileobj("rb") as fobj:
            raw = type(header).from_fileobj(fobj, check=False)
    except Exception:  # noqa: BLE001 - the header was read once already; nibabel's own checks stand
        return
    ndim = int(raw["dim"][0])
    pixdim = np.asarray(raw["pixdim"][1:1 + max(1, min(ndim, 3))], dtype=np.float64)
    bad = ~np.isfinite(pixdim) | (pixdim == 0)
    if isinstance(header, nib.Nifti1Header):
        bad |= pixdim < 0  # NIfTI voxel sizes are positive (the qform's handedness is in pixdim[0])
    if np.any(bad):
        axes = ", ".join("ijk"[i] for i in np.flatnonzero(bad))
        raise ImageError(source, f"the header's voxel size (pixdim) is {np.round(pixdim, 4).tolist()} mm: invalid "
                                 f"along axis {axes}; fix the header (e.g. with nibabel or fslhd/fslchpixdim) rather "
                                 "than let it default to 1 mm")


def _check_affine(affine: np.ndarray, source: PathLike | None) -> None:
    if not np.all(np.isfinite(affine)):
        raise ImageError(source, "voxel-to-world affine contains NaN or infinite values")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(zooms <= 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageError(source, f"voxel sizes must be positive (got {np.round(zooms, 4).tolist()} mm)")


def _as_labels(data: np.ndarray, source: PathLike | None) -> np.ndarray:
    data = np.asarray(data)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise ImageError(source, "label map contains NaN or infinite values")
        rounded = np.rint(data)
        if np.max(np.abs(rounded - data)) > 1e-3:
            raise ImageError(source, "label map has non-integer values (is this an intensity image?)")
        data = rounded
    if data.size and data.min() < 0:
        raise ImageError(source, "label map has negative values")
    return data.astype(np.int32)


def validate_image(
    img: nib.spatialimages.SpatialImage, *, source: PathLike | None = None, labels: bool = False,
    allow_empty: bool = False,
) -> None:
    """Check that an image is usable for registration.

    Checks: 3-D; finite values; not empty (some non-zero voxel); finite, invertible affine with
    positive voxel sizes. For label maps, integer values >= 0 and at least one label.

    Raises
    ------
    ImageError
        With a message naming ``source`` (or the image's file name) and the problem.
    """
    source = source if source is not None else getattr(img, "get_filename", lambda: None)()
    shape = img.shape
    if len(shape) != 3:
        raise ImageError(source, f"expected a 3-D image, got shape {tuple(shape)}")
    if min(shape) < 2:
        raise ImageError(source, f"image has a degenerate shape {tuple(shape)}")
    _check_affine(np.asarray(img.affine, dtype=np.float64), source)
    data = np.asanyarray(img.dataobj)
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise ImageError(source, f"contains {bad} NaN or infinite voxels")
    if not allow_empty and not np.any(data):
        raise ImageError(source, "image is empty (every voxel is zero)")
    if labels:
        if np.issubdtype(data.dtype, np.floating) and np.max(np.abs(np.rint(data) - data)) > 1e-3:
            raise ImageError(source, "label map has non-integer values")
        if data.min() < 0:
            raise ImageError(source, "label map has negative values")


def check_labels_match(image: nib.spatialimages.SpatialImage, label_map: nib.spatialimages.SpatialImage,
                       *, image_source: PathLike | None = None, labels_source: PathLike | None = None) -> None:
    """Raise :class:`ImageError` unless ``label_map`` lies on the same grid as ``image``."""
    gi, gl = Grid.of(image), Grid.of(label_map)
    if gi.shape != gl.shape:
        raise ImageError(labels_source, f"label map shape {gl.shape} does not match the image "
                         f"{_describe(image_source)} shape {gi.shape}")
    if not np.allclose(gi.affine, gl.affine, atol=1e-3):
        raise ImageError(labels_source, f"label map voxel-to-world affine differs from the image "
                         f"{_describe(image_source)}")


def new_image(data: np.ndarray, like: nib.spatialimages.SpatialImage | Grid) -> nib.Nifti1Image:
    """A NIfTI image holding ``data`` on the grid of ``like`` (sform and qform set)."""
    grid = Grid.of(like)
    img = nib.Nifti1Image(np.asarray(data), grid.affine)
    img.set_qform(grid.affine, code=1)
    img.set_sform(grid.affine, code=1)
    return img


def save_image(img: nib.spatialimages.SpatialImage, path: PathLike) -> Path:
    """Write ``img`` (format from the suffix); parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def mask_box(mask: np.ndarray, margin_mm: float, spacing: np.ndarray) -> tuple[slice, slice, slice]:
    """Index slices of ``mask``'s bounding box grown by ``margin_mm`` (clipped to the volume)."""
    idx = np.argwhere(mask)
    pad = np.ceil(margin_mm / np.asarray(spacing, float)).astype(int)
    lo = np.maximum(idx.min(axis=0) - pad, 0)
    hi = np.minimum(idx.max(axis=0) + pad + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def crop_to_mask(img: nib.spatialimages.SpatialImage, mask: np.ndarray, margin_mm: float) -> nib.Nifti1Image:
    """``img`` cut to the bounding box of ``mask`` plus ``margin_mm`` (a slice of its voxels, same world
    coordinates)."""
    grid = Grid.of(img)
    box = mask_box(mask, margin_mm, grid.spacing)
    start = np.array([b.start for b in box], dtype=np.float64)
    affine = grid.affine.copy()
    affine[:3, 3] = grid.affine[:3, :3] @ start + grid.affine[:3, 3]
    data = np.ascontiguousarray(np.asarray(img.dataobj)[box])
    return new_image(data, Grid(tuple(int(n) for n in data.shape), affine))


def normalize_intensity(
    img: nib.spatialimages.SpatialImage,
    *,
    mask: np.ndarray | None = None,
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
) -> nib.Nifti1Image:
    """Rescale intensities to [0, 1]: the background to 0, a robust maximum of the brain to 1
    (:func:`robust_unit_range`).

    Parameters
    ----------
    img : nibabel image
        Input volume.
    mask : ndarray of bool, optional
        Brain mask on the image grid; by default the voxels above the image's minimum (the background).
    lower_percentile, upper_percentile : float
        Percentiles (0-100) of the in-mask intensities mapped to 0 (only for an image with no background)
        and 1; values outside are clipped.

    Returns
    -------
    nibabel.Nifti1Image
        float32 image on the same grid, values in [0, 1]; voxels outside ``mask`` keep their
        rescaled (clipped) value, so a skull-stripped input stays zero outside the brain.
    """
    data = np.asarray(img.dataobj, dtype=np.float32)
    try:
        out = robust_unit_range(data, mask, lower_percentile=lower_percentile, upper_percentile=upper_percentile)
    except ValueError as exc:
        raise ImageError(getattr(img, "get_filename", lambda: None)(), str(exc)) from None
    return new_image(out, img)


#: Fraction of an image's voxels that must hold its minimum for that value to be its background.
BACKGROUND_FRACTION = 0.05


def background_value(data: np.ndarray) -> float | None:
    """The value an image stores outside the object, or ``None`` when it has no such background.

    The minimum, when at least :data:`BACKGROUND_FRACTION` of the voxels hold exactly it: the zeros around a
    skull-stripped brain, or the 40 of an int16 file whose scanner stored every value with an offset. Raw heads
    (noise in the air) and images without a uniform background have none.
    """
    data = np.asarray(data)
    if data.size == 0:
        return None
    low = data.min()
    return float(low) if np.count_nonzero(data == low) >= BACKGROUND_FRACTION * data.size else None


def robust_unit_range(data: np.ndarray, mask: np.ndarray | None = None, *, lower_percentile: float = 0.5,
                      upper_percentile: float = 99.5) -> np.ndarray:
    """The array core of :func:`normalize_intensity`: ``clip((data - lo) / (hi - lo), 0, 1)``.

    ``hi`` is the ``upper_percentile`` of the brain's values. ``lo`` is the background's value when the image
    has a background (at least 5 % of its voxels at its minimum: the zeros around a skull-stripped brain, or
    the 40 of an int16 file stored with an offset), so the brain's dark voxels (CSF) stay above the
    background and the brain's edge keeps its contrast; otherwise the ``lower_percentile`` of the brain's
    values. The brain is ``mask`` when given, else the voxels above the background (every voxel when there is
    none). HDAR's training data and its inference inputs go through this one function.

    Raises
    ------
    ValueError
        No voxel inside the mask.
    """
    data = np.asarray(data, dtype=np.float32)
    if data.size == 0:
        raise ValueError("no voxels inside the mask to normalise")
    found = background_value(data)
    has_background = found is not None
    background = found if found is not None else float(data.min())
    if mask is None:
        mask = data > background if has_background else np.ones(data.shape, bool)
    values = data[mask]
    if values.size == 0:
        raise ValueError("no voxels inside the mask to normalise")
    # 'higher': a value of the data, so an image normalised once maps its brightest kept voxel to exactly 1 and a
    # second normalisation changes nothing (callers and HDAR's canonical frame may both normalise)
    hi = float(np.percentile(values, upper_percentile, method="higher"))
    lo = background if has_background else float(np.percentile(values, lower_percentile, method="lower"))
    if hi <= lo:
        hi = lo + 1.0
    out = (data - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def resample_to(
    img: nib.spatialimages.SpatialImage,
    reference: nib.spatialimages.SpatialImage | Grid,
    *,
    interpolation: Literal["linear", "nearest"] = "linear",
    fill: float = 0.0,
) -> nib.Nifti1Image:
    """Resample ``img`` onto the grid of ``reference`` by world (physical) coordinates.

    Uses trilinear interpolation for intensities and nearest neighbour for labels; voxels that map
    outside the input get ``fill``. Integer label maps keep their dtype with ``"nearest"``.
    """
    ref = Grid.of(reference)
    src = Grid.of(img)
    vox = np.linalg.inv(src.affine) @ ref.affine  # reference voxel -> source voxel
    data = np.asarray(img.dataobj)
    order = 1 if interpolation == "linear" else 0
    out_dtype = data.dtype if order == 0 else np.float32
    work = data if order == 0 else data.astype(np.float32)
    out = ndimage.affine_transform(
        work, vox[:3, :3], offset=vox[:3, 3], output_shape=ref.shape, order=order,
        mode="constant", cval=fill, prefilter=False,
    )
    return new_image(out.astype(out_dtype, copy=False), ref)


def reorient_to(img: nib.spatialimages.SpatialImage, axcodes: tuple[str, str, str] = ("R", "A", "S")) -> nib.Nifti1Image:
    """Permute/flip array axes (no interpolation) so the voxel axes point along ``axcodes``."""
    current = nib.orientations.io_orientation(img.affine)
    target = nib.orientations.axcodes2ornt(axcodes)
    transform = nib.orientations.ornt_transform(current, target)
    data = nib.orientations.apply_orientation(np.asarray(img.dataobj), transform)
    affine = img.affine @ nib.orientations.inv_ornt_aff(transform, img.shape[:3])
    return new_image(data, Grid(tuple(data.shape[:3]), affine))


# --------------------------------------------------------------------------- toolkit conversion


def _itk_geometry(grid: Grid) -> tuple[list[float], list[float], list[float]]:
    """Origin, spacing and row-major direction (LPS) of a grid as ITK expects them."""
    lps = grid.lps_affine
    spacing = grid.spacing
    direction = lps[:3, :3] / spacing[None, :]
    return lps[:3, 3].tolist(), spacing.tolist(), direction.flatten().tolist()


def grid_from_itk(origin, spacing, direction, size) -> Grid:
    """Grid from ITK geometry (LPS origin, spacing, 3x3 direction, size along x, y, z)."""
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(spacing, dtype=np.float64)[None, :]
    lps[:3, 3] = origin
    return Grid(tuple(int(s) for s in size), RAS_TO_LPS @ lps)


def to_sitk(img: nib.spatialimages.SpatialImage | np.ndarray, grid: Grid | None = None) -> "sitk.Image":
    """Convert to a SimpleITK image keeping origin, spacing and direction (LPS).

    A vector-valued array of shape ``(*grid.shape, 3)`` becomes a vector image.
    """
    import SimpleITK as sitk

    if isinstance(img, np.ndarray):
        if grid is None:
            raise ValueError("a grid is required to convert a bare array")
        data = img
    else:
        grid = Grid.of(img)
        data = np.asarray(img.dataobj)
    is_vector = data.ndim == 4
    # SimpleITK arrays are indexed [z, y, x] (+ components last).
    arr = np.ascontiguousarray(np.transpose(data, (2, 1, 0, 3) if is_vector else (2, 1, 0)))
    out = sitk.GetImageFromArray(arr, isVector=is_vector)
    origin, spacing, direction = _itk_geometry(grid)
    out.SetOrigin(origin)
    out.SetSpacing(spacing)
    out.SetDirection(direction)
    return out


def from_sitk(image: "sitk.Image") -> nib.Nifti1Image:
    """Convert a SimpleITK image to NIfTI (vector images give an ``(x, y, z, c)`` array)."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)
    arr = np.transpose(arr, (2, 1, 0, 3) if image.GetNumberOfComponentsPerPixel() > 1 else (2, 1, 0))
    grid = grid_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection(), image.GetSize())
    return new_image(np.ascontiguousarray(arr), grid)


def to_ants(img: nib.spatialimages.SpatialImage) -> "ants.ANTsImage":
    """Convert to an antspyx image keeping origin, spacing and direction (LPS)."""
    import ants

    grid = Grid.of(img)
    data = np.asarray(img.dataobj)
    if data.dtype not in (np.float32, np.uint8, np.uint32):
        data = data.astype(np.float32)
    origin, spacing, direction = _itk_geometry(grid)
    return ants.from_numpy(np.ascontiguousarray(data), origin=origin, spacing=spacing,
                           direction=np.asarray(direction).reshape(3, 3))


def from_ants(image: "ants.ANTsImage") -> nib.Nifti1Image:
    """Convert an antspyx image to NIfTI (ANTs arrays are indexed ``[x, y, z]`` already)."""
    grid = grid_from_itk(image.origin, image.spacing, image.direction, image.shape[:3])
    return new_image(np.ascontiguousarray(image.numpy()), grid)
