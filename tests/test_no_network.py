"""No network, ever (issue 14): the commands run with every socket connection and name lookup made to fail,
and ``NO_ET`` (Pydra's telemetry opt-out) unset, and none of them tries to reach the network.

The patches are installed in this process before the BIDS App forks its workers, so the workers inherit them;
every attempt is appended to a file, which must stay empty.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from hdar_pipeline.apps.bids_app_cli import bids_app_main
from hdar_pipeline.apps.cli import main
from hdar_pipeline.core.images import save_image
from hdar_pipeline.core.synthetic import make_subject

from test_input_guard import run_cli
from test_synthetic import ball_phantom


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """Every connect / lookup raises and is logged to a file (shared with forked workers)."""
    log = tmp_path / "network-attempts.txt"
    log.write_text("")

    originals = {"connect": socket.socket.connect, "connect_ex": socket.socket.connect_ex}

    def refuse(what):
        def blocked(*args, **kwargs):
            if what.startswith("connect") and args and getattr(args[0], "family", None) == socket.AF_UNIX:
                # a socket in the file system (multiprocessing's fork server of the isolated jobs) is local
                return originals[what](*args, **kwargs)
            with open(log, "a") as fh:
                fh.write(f"{os.getpid()} {what} {args[1:] if what.startswith('connect') else args}\n")
            raise OSError(f"network disabled by the test ({what})")
        return blocked

    monkeypatch.delenv("NO_ET", raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return log


def test_the_patches_catch_a_network_call(offline):
    """The check can fail: a plain lookup is caught and logged."""
    with pytest.raises(OSError, match="network disabled"):
        socket.getaddrinfo("pypi.org", 443)
    assert "getaddrinfo" in offline.read_text()
    offline.write_text("")


def test_register_makes_no_network_call(tmp_path, offline, capsys):
    image, labels = ball_phantom()
    s = make_subject(image, labels, seed=1, magnitude_mm=6.0)
    fixed, moving = save_image(image, tmp_path / "f.nii.gz"), save_image(s.image, tmp_path / "m.nii.gz")
    code, err = run_cli(main, ["register", fixed, moving, "-o", tmp_path / "o", "--method", "demons", "--no-affine",
                               "--threads", "1"], capsys)
    assert code == 0, err
    assert offline.read_text() == ""


def test_bids_app_makes_no_network_call(tmp_path, offline, capsys, monkeypatch):
    pytest.importorskip("pydra")
    pytest.importorskip("bids")
    from test_bids_app import make_bids_dataset

    from pydra.engine.job import Job

    # Pydra checks for a newer version (etelemetry, a network call unless NO_ET is set) once per process:
    # make this run the first, so the app's own NO_ET is what keeps it offline
    monkeypatch.setattr(Job, "_etelemetry_checked", False)
    bids_dir, labels_dir = make_bids_dataset(tmp_path)
    monkeypatch.delenv("NO_ET", raising=False)  # importing the test helpers set it: the app must set it itself
    code, err = run_cli(bids_app_main, [bids_dir, tmp_path / "out", "participant", "--atlas-participant", "01",
                                        "--participant-label", "02", "--labels-dir", labels_dir, "--methods",
                                        "demons", "--work-dir", tmp_path / "work", "--nprocs", "1",
                                        "--omp-nthreads", "1", "--no-preprocess", "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "sub-02" / "anat" / "sub-02_space-sub01_desc-demons_metrics.json").is_file()
    assert offline.read_text() == ""
