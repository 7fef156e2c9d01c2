"""Nipype interfaces: thin wiring over the library, no science here.

``Register``
    :func:`hdar_pipeline.pipeline.registration.register_files` (with ``use_gpu`` for HDAR).
``ApplyTransform``
    :func:`hdar_pipeline.pipeline.subject_steps.apply_transform_files`.
``Evaluate``
    :func:`hdar_pipeline.evaluation.evaluate.evaluate_files`.

Each interface writes into the node's working directory (``runtime.cwd``), so outputs live in
Nipype's cache like those of any other interface. See ``examples/nipype_workflow.py``.

Example
-------
>>> from nipype import Node
>>> from hdar_pipeline.engine.nipype_interfaces import Register
>>> reg = Node(Register(method="syn"), name="register")  # doctest: +SKIP
>>> reg.inputs.fixed_image = "atlas.nii.gz"  # doctest: +SKIP
>>> reg.inputs.moving_image = "sub-01_T1w.nii.gz"  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import (
    BaseInterface,
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    TraitedSpec,
    isdefined,
    traits,
)

from hdar_pipeline.methods.registry import DEFAULT_METHOD, method_names, presets_text

__all__ = ["ApplyTransform", "Evaluate", "Register"]


def _opt(value, default=None):
    return value if isdefined(value) else default


# ----------------------------------------------------------------------------- registration


class RegisterInputSpec(BaseInterfaceInputSpec):
    fixed_image = File(exists=True, mandatory=True, desc="fixed image (the atlas); outputs lie on its grid")
    moving_image = File(exists=True, mandatory=True, desc="moving image (the subject)")
    moving_labels = File(exists=True, desc="labels of the moving image, warped with nearest neighbour")
    # the registry's methods, its default first (an Enum's default)
    method = traits.Enum(DEFAULT_METHOD, *[m for m in method_names() if m != DEFAULT_METHOD], usedefault=True,
                         desc="registration method")
    preset = traits.Str(desc=f"method preset ({presets_text()})")
    affine = traits.Bool(True, usedefault=True, desc="run the affine stage before a deformable method")
    seed = traits.Int(desc="random seed (numpy, torch, ANTS_RANDOM_SEED)")
    num_threads = traits.Int(desc="worker threads (ITK, torch)")
    use_gpu = traits.Bool(False, usedefault=True,
                          desc="run HDAR on the GPU (cuda); False runs on the CPU. Other methods run on the CPU")


class RegisterOutputSpec(TraitedSpec):
    warped_image = File(exists=True, desc="moving image on the fixed grid (linear)")
    warped_labels = File(desc="moving labels on the fixed grid (nearest neighbour)")
    composite_transform = File(exists=True, desc="ITK composite transform (.h5), fixed -> moving points")
    transforms = traits.List(File(exists=True), desc="the transform as separate files, ants.apply_transforms order")
    record = File(exists=True, desc="registration.json (method, parameters, runtime, versions)")
    runtime_s = traits.Float(desc="registration wall-clock seconds")


class Register(BaseInterface):
    """Register a moving image to a fixed image with a registered method (default
    :data:`~hdar_pipeline.methods.registry.DEFAULT_METHOD`)."""

    input_spec = RegisterInputSpec
    output_spec = RegisterOutputSpec

    def _run_interface(self, runtime):
        from hdar_pipeline.pipeline.registration import register_files

        out = Path(runtime.cwd)
        device = "cuda" if self.inputs.use_gpu else "cpu"
        rec = register_files(self.inputs.fixed_image, self.inputs.moving_image, out, method=self.inputs.method,
                             preset=_opt(self.inputs.preset), moving_labels=_opt(self.inputs.moving_labels),
                             affine=self.inputs.affine, seed=_opt(self.inputs.seed),
                             threads=_opt(self.inputs.num_threads), device=device)
        self._results = {
            "warped_image": str(out / rec["outputs"]["warped"]),
            "composite_transform": str(out / rec["composite_transform"]),
            "transforms": [str(out / p) for p in rec["transforms"]],
            "record": str(out / "registration.json"),
            "runtime_s": float(rec["runtime_s"]),
        }
        if "warped_labels" in rec["outputs"]:
            self._results["warped_labels"] = str(out / rec["outputs"]["warped_labels"])
        return runtime

    def _list_outputs(self):
        return dict(self._results)


# ----------------------------------------------------------------------------- apply transform


class ApplyTransformInputSpec(BaseInterfaceInputSpec):
    reference_image = File(exists=True, mandatory=True, desc="image on the fixed grid (the atlas)")
    input_image = File(exists=True, mandatory=True, desc="image or label map in moving space")
    transforms = InputMultiObject(File(exists=True), mandatory=True,
                                  desc="ITK/ANTs transform files, ants.apply_transforms order (or one composite .h5)")
    interpolation = traits.Enum("linear", "nearest", usedefault=True,
                                desc="linear for intensities, nearest for labels")
    out_file = File(desc="output file name (default: warped.nii.gz or warped_labels.nii.gz)")


class ApplyTransformOutputSpec(TraitedSpec):
    output_image = File(exists=True, desc="the input image on the reference grid")


class ApplyTransform(BaseInterface):
    """Warp an image (or labels) onto a reference grid with written transforms."""

    input_spec = ApplyTransformInputSpec
    output_spec = ApplyTransformOutputSpec

    def _out_file(self, cwd: Path) -> Path:
        default = "warped_labels.nii.gz" if self.inputs.interpolation == "nearest" else "warped.nii.gz"
        return cwd / Path(_opt(self.inputs.out_file, default)).name

    def _run_interface(self, runtime):
        from hdar_pipeline.pipeline.subject_steps import apply_transform_files

        out = apply_transform_files(self.inputs.reference_image, self.inputs.input_image,
                                    list(self.inputs.transforms), self._out_file(Path(runtime.cwd)),
                                    interpolation=self.inputs.interpolation)
        self._results = {"output_image": str(out)}
        return runtime

    def _list_outputs(self):
        return dict(self._results)


# ----------------------------------------------------------------------------- evaluation


class EvaluateInputSpec(BaseInterfaceInputSpec):
    reference_labels = File(exists=True, mandatory=True, desc="atlas labels (fixed grid)")
    labels = File(exists=True, mandatory=True, desc="warped subject labels on the same grid")
    transforms = InputMultiObject(File(exists=True), desc="the registration's transform(s), for the Jacobian")
    label_table = File(exists=True, desc="BIDS dseg.tsv or FreeSurfer LUT with the label names")
    subject = traits.Str("", usedefault=True, desc="subject identifier written into the tables")
    session = traits.Str("", usedefault=True, desc="session identifier written into the tables")
    method = traits.Str("", usedefault=True, desc="method name written into the tables")
    distances = traits.Bool(True, usedefault=True, desc="compute surface distances (hd95_mm, msd_mm, hd_mm)")
    out_prefix = traits.Str("evaluation", usedefault=True, desc="file name prefix of the tables")


class EvaluateOutputSpec(TraitedSpec):
    labels_csv = File(exists=True, desc="one row per label")
    summary_csv = File(exists=True, desc="one row: means over the labels (and Jacobian statistics)")
    jacobian_csv = File(desc="one row of Jacobian statistics (with transforms only)")
    mean_dice = traits.Float(desc="mean Dice over the labels")


class Evaluate(BaseInterface):
    """Label overlap and surface distances of warped labels, and the transform's Jacobian statistics."""

    input_spec = EvaluateInputSpec
    output_spec = EvaluateOutputSpec

    def _run_interface(self, runtime):
        from hdar_pipeline.evaluation.evaluate import evaluate_files

        out_csv = Path(runtime.cwd) / f"{self.inputs.out_prefix}.csv"
        ids = {"subject": self.inputs.subject, "session": self.inputs.session, "method": self.inputs.method}
        transforms = _opt(self.inputs.transforms)
        result, written = evaluate_files(self.inputs.reference_labels, self.inputs.labels, out_csv,
                                         transform=list(transforms) if transforms else None,
                                         label_table=_opt(self.inputs.label_table), ids=ids,
                                         distances=self.inputs.distances, figures=False)
        self._results = {"labels_csv": str(written["labels"]), "summary_csv": str(written["summary"]),
                         "mean_dice": float(result.summary["mean_dice"].iloc[0])}
        if "jacobian" in written:
            self._results["jacobian_csv"] = str(written["jacobian"])
        return runtime

    def _list_outputs(self):
        return dict(self._results)
