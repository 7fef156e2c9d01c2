"""The inputs of a run, checked and protected in one place, before any work or any write.

Every command (``hdar register``, ``hdar evaluate``, ``hdar stats``, the ``hdar-pipeline`` BIDS App) and
the library functions behind them declare what they read and where they write through an
:class:`InputGuard`:

1. ``InputGuard(files=..., folders=...)`` names each input by the argument that gave it (``FIXED``,
   ``--moving-labels``, ``BIDS_DIR`` ...), refuses a missing one, and takes the SHA-256 of every input
   file (and a listing of every input folder) before anything is written, so a record's hashes are the
   inputs' and never an output's.
2. :meth:`InputGuard.output_folder` (or :meth:`InputGuard.output_file`) refuses, before the work, an
   output that is a file where a folder is wanted (or the reverse), that cannot be written, that is or lies
   inside an input folder, or whose writes would land on an input: an input file (followed through symbolic
   and hard links) or input folder where the command writes. The rule holds whatever ``-o``/``-w`` are: no
   input of the run is ever written, replaced or deleted by it.
3. :meth:`InputGuard.verify` checks after the work that every input is byte-identical (files) or
   unchanged (folder listings) and raises otherwise.

Every refusal is an :class:`InputError` whose one-line message names the argument, the file and the problem.
"""

from __future__ import annotations

import fnmatch
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from hdar_pipeline.core.provenance import sha256

PathLike = str | os.PathLike
Inputs = Mapping[str, PathLike | Sequence[PathLike] | None]


class InputError(ValueError):
    """An argument or input refused before the work; the message names the argument, the file and the problem."""

    def __init__(self, argument: str, path: PathLike | None, problem: str):
        self.argument, self.path, self.problem = argument, None if path is None else str(path), problem
        where = f"{argument} {path}" if path is not None else argument
        super().__init__(f"{where}: {problem}")


def _as_list(value: PathLike | Sequence[PathLike] | None) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value if v is not None]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _folder_listing(root: Path) -> dict[str, tuple[int, int]]:
    """``relative path -> (size, mtime_ns)`` of every file under ``root`` (no contents read)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


class InputGuard:
    """The inputs of one run: checked to exist, hashed before any write, and protected from the run's outputs.

    Parameters
    ----------
    files : mapping of str to path, list of paths or None
        Input files by the argument that named them (``{"FIXED": ..., "--transform": [a, b]}``); ``None``
        entries are skipped.
    folders : mapping of str to path or None
        Input folders (a BIDS dataset, a labels dataset), protected as a whole: no output may lie in them.
    hash_files : bool
        Take each input file's SHA-256 now (:meth:`sha256`, :meth:`verify`).

    Raises
    ------
    InputError
        An input file is missing or is a folder; an input folder is missing or is a file.
    """

    def __init__(self, files: Inputs | None = None, folders: Mapping[str, PathLike | None] | None = None, *,
                 hash_files: bool = True):
        self.files: dict[str, list[Path]] = {}
        self.folders: dict[str, Path] = {}
        self._hash_files = bool(hash_files)
        self._hashes: dict[Path, str] = {}
        self.add_files(files or {})
        for argument, value in (folders or {}).items():
            if value is None:
                continue
            p = Path(value)
            if not p.is_dir():
                raise InputError(argument, p, "is a file, not a folder" if p.exists() else "folder not found")
            self.folders[argument] = p
        self._listings = {arg: _folder_listing(p) for arg, p in self.folders.items()}

    def add_files(self, files: Inputs) -> None:
        """More input files, checked and hashed as the constructor's (call it before anything is written).

        Raises
        ------
        InputError
            A file is missing or is a folder.
        """
        added: list[Path] = []
        for argument, value in files.items():
            paths = _as_list(value)
            for p in paths:
                if p.is_dir():
                    raise InputError(argument, p, "is a folder, not a file")
                if not p.is_file():
                    raise InputError(argument, p, "file not found")
            if paths:
                self.files.setdefault(argument, []).extend(paths)
                added.extend(paths)
        if self._hash_files:
            self._hashes.update({p.resolve(): sha256(p) for p in added})

    # ------------------------------------------------------------------ what the inputs are

    def sha256(self, path: PathLike) -> str:
        """The SHA-256 of an input file, as it was when the guard was made (before any write)."""
        key = Path(path).resolve()
        if key not in self._hashes:
            self._hashes[key] = sha256(key)
        return self._hashes[key]

    def _input_files(self) -> Iterable[tuple[str, Path, Path]]:
        for argument, paths in self.files.items():
            for p in paths:
                yield argument, p, p.resolve()

    # ------------------------------------------------------------------ where the outputs go

    def output_folder(self, path: PathLike, argument: str, *, writes: Sequence[str] = ("*",),
                      create: bool = True, shown: PathLike | None = None) -> Path:
        """Check an output folder before the work and return it resolved (created when ``create``).

        Parameters
        ----------
        path : path-like
            The output folder.
        argument : str
            The argument that named it (``-o``, ``OUTPUT_DIR``, ``--work-dir``), for the messages.
        writes : sequence of str
            What the run writes in the folder: names or glob patterns of its top-level entries (files, or
            folders written as a whole). ``("*",)``: the folder belongs to the run.
        create : bool
            Create the folder and prove it writable with a probe file (removed at once).
        shown : path-like, optional
            The path the messages name (default ``path``; an output file names itself, not its folder).

        Raises
        ------
        InputError
            The folder is a file, cannot be created or written, is (or lies inside) an input folder, or an
            input file or folder lies where the run writes.
        """
        out = Path(path).resolve()
        path = path if shown is None else shown
        if out.exists() and not out.is_dir():
            raise InputError(argument, path, "exists and is not a folder")
        for arg, folder in self.folders.items():
            src = folder.resolve()
            if out == src or src in out.parents:
                raise InputError(argument, path, f"lies inside the input dataset {folder} ({arg}), which is never "
                                                 "written to; choose a folder outside it")
            if out in src.parents and self._owned(out, src, writes):
                raise InputError(argument, path, f"the run would write into the input dataset {folder} ({arg}) "
                                                 "there; choose another folder")
        identities = {}
        for arg, given, real in self._input_files():
            if out in real.parents and self._owned(out, real, writes):
                raise InputError(argument, path, f"would overwrite the input {arg} {given}; choose another folder")
            ident = _identity(real)
            if ident is not None:
                identities[ident] = (arg, given)
        if identities and out.is_dir():
            self._check_links(out, writes, identities, argument, path)
        if create:
            self._probe(out, argument, path)
        return out

    def output_file(self, path: PathLike, argument: str, *, also: Sequence[PathLike] = ()) -> Path:
        """Check one output file (and the files ``also`` written beside it) before the work.

        Raises
        ------
        InputError
            The path is a folder, its folder cannot be written, or it (or one of ``also``) is an input file
            or lies inside an input folder.
        """
        p = Path(path)
        if p.is_dir():
            raise InputError(argument, path, "is a folder; give the path of the output file")
        targets = [p, *map(Path, also)]
        folder = p.resolve().parent
        self.output_folder(folder, argument, writes=[t.name for t in targets], create=True, shown=path)
        return p.resolve()

    @staticmethod
    def _owned(out: Path, inside: Path, writes: Sequence[str]) -> bool:
        first = inside.relative_to(out).parts[0]
        return any(fnmatch.fnmatchcase(first, pattern) for pattern in writes)

    def _check_links(self, out: Path, writes: Sequence[str], identities: dict, argument: str, path: PathLike) -> None:
        """Refuse an existing output that is a hard (or symbolic) link to an input file: writing it would
        write the input."""
        for pattern in writes:
            for hit in out.glob(pattern):
                candidates = [hit] if not hit.is_dir() else [p for p in hit.rglob("*") if p.is_file()]
                for c in candidates:
                    ident = _identity(c)
                    if ident in identities:
                        arg, given = identities[ident]
                        raise InputError(argument, path, f"{c.name} there is the input {arg} {given} (a link to "
                                                         "it) and would be overwritten; choose another folder")

    @staticmethod
    def _probe(out: Path, argument: str, path: PathLike) -> None:
        created = []
        try:
            missing = [out, *out.parents]
            missing = [p for p in missing if not p.exists()]
            for p in reversed(missing):
                p.mkdir()
                created.append(p)
            fd, probe = tempfile.mkstemp(prefix=".hdar-write-test-", dir=out)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            for p in reversed(created):
                try:
                    p.rmdir()
                except OSError:
                    pass
            raise InputError(argument, path, f"cannot be written ({exc.strerror or exc})") from None

    # ------------------------------------------------------------------ after the work

    def verify(self) -> None:
        """Raise :class:`InputError` if any input file's bytes or any input folder's listing changed."""
        for arg, given, real in self._input_files():
            if real in self._hashes and (not real.is_file() or sha256(real) != self._hashes[real]):
                raise InputError(arg, given, "changed while the run went on (the run never writes its inputs: another "
                                             "process did, or this is a bug to report); its results may not match it")
        for arg, folder in self.folders.items():
            if _folder_listing(folder) != self._listings[arg]:
                raise InputError(arg, folder, "changed while the run went on (the run never writes into it: another "
                                              "process did, or this is a bug to report); its results may not match it")


__all__ = ["InputError", "InputGuard"]
