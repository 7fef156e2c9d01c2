"""The per-subject record: what one subject (x session) x method went through, step by step.

Every per-subject step of :mod:`hdar_pipeline.pipeline.subject_steps` returns a :class:`SubjectRecord` and writes
it as JSON (``to_json``) beside its outputs; the next step, the Pydra tasks and Nipype interfaces
(:mod:`hdar_pipeline.engine`), the BIDS derivatives writer (:mod:`hdar_pipeline.bids_io.outputs`), the group tables
and the reports read it back (``from_json``/``read``). It is the one contract between those layers: its fields are
typed here, and a JSON file holding a field this version does not know is refused with the file named.

A failed step keeps the record of the inputs with ``status="error"``, the message in ``error`` (which names the
file and the problem) and the step in ``failed_step``; the steps after it pass it on unchanged, so one bad subject
becomes one failed row of the group tables and never stops the others.

Paths are absolute strings (as written in JSON); times are seconds; memory is MiB.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from hdar_pipeline.core.provenance import json_default

PathLike = str | os.PathLike

STATUS_OK = "ok"
STATUS_ERROR = "error"


class RecordError(ValueError):
    """A record file cannot be read as a :class:`SubjectRecord` (the message names the file)."""


@dataclass
class SubjectRecord:
    """One subject (x session) x method through the per-subject steps.

    Identity and status
        ``subject``, ``session`` (``""`` without sessions), ``method`` and ``preset`` (``""`` before
        registration), ``status`` (``"ok"`` or ``"error"``), ``error`` (``""`` when ok; else
        ``"<ExceptionType>: <message>"``), ``failed_step`` (``"preprocess"``, ``"register"`` or ``"evaluate"``),
        ``traceback`` (a failure's), ``transient`` (the process was killed from outside: a rerun runs the job
        again), ``stage_wall_s`` (wall seconds of each step the record went through), ``record_file`` (where it
        was written).
    Native inputs
        ``t1w``, ``labels`` (the subject's label map, native space), ``atlas``.
    Preprocessing (:func:`~hdar_pipeline.pipeline.subject_steps.preprocess_subject`)
        ``preproc`` (the image on the atlas grid, in [0, 1]), ``preproc_labels``, ``mask`` (brain mask on the atlas
        grid), ``native_brain`` and ``native_mask`` (on the T1w grid), ``to_atlas`` (ITK ``.h5``, atlas points ->
        subject points), ``preprocess_json``, ``preprocess_steps`` (what ran, one line each),
        ``skull_stripped_input``, ``reused_derivatives`` (``{"brain_mask": path, "anat_xfm": path}``, those
        given), ``preprocess_runtime_s`` and ``preprocess_steps_s``.
    Registration (:func:`~hdar_pipeline.pipeline.subject_steps.register_subject`)
        ``registration_json``, ``warped`` (the subject on the atlas grid), ``warped_labels``, ``jacobian_map``,
        ``transform`` (ITK composite ``.h5``, atlas -> native subject) and ``transforms`` (the
        ``ants.apply_transforms`` list), ``runtime_s``, ``peak_memory_mb``, ``device``, ``folded_percent`` (of the
        grid's voxels) and ``folded_percent_mask`` (of the atlas brain's), ``preprocessed`` (the preprocessed
        image was registered), ``register_steps_s``; with the inverse: ``atlas_labels``, ``inverse_transform``
        (native -> atlas), ``atlas_labels_native`` and ``inverse`` (how it was obtained, its consistency in mm).
    Evaluation (:func:`~hdar_pipeline.pipeline.subject_steps.evaluate_subject`)
        ``evaluated``, ``labels_csv`` (one row per label), ``summary_csv``, ``jacobian_csv``, ``metrics`` (the
        one-row summary: ``mean_dice`` ... and the Jacobian statistics) and ``evaluation_notes``.
    """

    subject: str
    session: str = ""
    method: str = ""
    preset: str = ""
    status: str = STATUS_OK
    error: str = ""
    failed_step: str = ""
    traceback: str | None = None
    transient: bool | None = None
    stage_wall_s: dict[str, float] | None = None
    # native inputs
    t1w: str | None = None
    labels: str | None = None
    atlas: str | None = None
    # preprocessing
    preproc: str | None = None
    preproc_labels: str | None = None
    mask: str | None = None
    native_brain: str | None = None
    native_mask: str | None = None
    to_atlas: str | None = None
    preprocess_json: str | None = None
    preprocess_steps: list[str] | None = None
    skull_stripped_input: bool | None = None
    reused_derivatives: dict[str, str] | None = None
    preprocess_runtime_s: float | None = None
    preprocess_steps_s: dict[str, float] | None = None
    # registration
    registration_json: str | None = None
    warped: str | None = None
    warped_labels: str | None = None
    jacobian_map: str | None = None
    transform: str | None = None
    transforms: list[str] | None = None
    runtime_s: float | None = None
    peak_memory_mb: float | None = None
    device: str | None = None
    folded_percent: float | None = None
    folded_percent_mask: float | None = None
    preprocessed: bool | None = None
    register_steps_s: dict[str, float] | None = None
    atlas_labels: str | None = None
    inverse_transform: str | None = None
    atlas_labels_native: str | None = None
    inverse: dict[str, Any] | None = None
    # evaluation
    evaluated: bool | None = None
    labels_csv: str | None = None
    summary_csv: str | None = None
    jacobian_csv: str | None = None
    metrics: dict[str, Any] | None = None
    evaluation_notes: list[str] | None = None
    record_file: str | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        """Whether every step so far succeeded."""
        return self.status == STATUS_OK

    @property
    def key(self) -> tuple[str, str, str]:
        """``(subject, session, method)``."""
        return (self.subject, self.session, self.method)

    def updated(self, **changes: Any) -> SubjectRecord:
        """A copy with ``changes`` (field names; an unknown name is an error)."""
        return dataclasses.replace(self, **changes)

    def failed(self, step: str, error: str, *, traceback: str | None = None,
               transient: bool | None = None) -> SubjectRecord:
        """A copy marked as failed at ``step`` with the message ``error``."""
        return self.updated(status=STATUS_ERROR, error=error, failed_step=step, traceback=traceback,
                            transient=transient)

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready dict: the identity and status fields always, the others where set."""
        always = {"subject", "session", "method", "preset", "status", "error", "failed_step"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in always or getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "record") -> SubjectRecord:
        """The record of :meth:`to_json`'s dict; ``source`` names it in errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecordError(f"{source}: not a subject record of this hdar-pipeline version (unknown field(s) "
                              f"{', '.join(unknown)})")
        if "subject" not in data:
            raise RecordError(f"{source}: not a subject record (no 'subject')")
        return cls(**{k: v for k, v in data.items()})

    @classmethod
    def read(cls, path: PathLike) -> SubjectRecord:
        """Read a record's JSON file."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RecordError(f"{path}: cannot read the record ({exc})") from None
        if not isinstance(data, dict):
            raise RecordError(f"{path}: not a subject record (not a JSON object)")
        return cls.from_json(data, source=str(path))

    def write(self, path: PathLike) -> SubjectRecord:
        """Write the record as JSON at ``path`` (folders created) and return it with ``record_file`` set."""
        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        out = self.updated(record_file=str(path))
        path.write_text(json.dumps(out.to_json(), indent=2, default=json_default))
        return out


def as_record(record: PathLike | Mapping[str, Any] | SubjectRecord) -> SubjectRecord:
    """A :class:`SubjectRecord` from a record, its JSON dict or its file."""
    if isinstance(record, SubjectRecord):
        return record
    if isinstance(record, Mapping):
        return SubjectRecord.from_json(record)
    return SubjectRecord.read(record)


__all__ = ["RecordError", "STATUS_ERROR", "STATUS_OK", "SubjectRecord", "as_record"]
