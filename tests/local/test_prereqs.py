"""local/prereqs.sh: a machine that lacks what `make test` needs gets one line naming all of it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "local/prereqs.sh"


def _tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _check(tmp_path: Path, goal: str, *, system="Linux", python_version=(3, 11), venv=True, uid=1000,
           sudo=True, apt=True, free_gib=100) -> subprocess.CompletedProcess:
    """The script in a fresh checkout (no .venv) on a PATH of stand-ins for the machine's tools."""
    root, tools = tmp_path / "checkout", tmp_path / "bin"
    (root / "local").mkdir(parents=True)
    tools.mkdir()
    shutil.copy(SCRIPT, root / "local/prereqs.sh")
    for name in ("awk", "dirname"):
        os.symlink(shutil.which(name), tools / name)
    _tool(tools, "df", f'echo "Filesystem 1024-blocks Used Available Capacity Mounted"; echo "/dev/x 1 1 {free_gib * 2**20} 1% /"')
    _tool(tools, "uname", f"echo {system}")
    _tool(tools, "id", f"echo {uid}")
    major, minor = python_version
    # The script asks the version (exit status), then the printed version, then for venv + ensurepip.
    _tool(tools, "python3", f'case "$2" in *version_info*) [ {major} -gt 3 ] || [ {minor} -ge 11 ];; '
                            f'*platform*) echo {major}.{minor}.0;; *ensurepip*) {"true" if venv else "false"};; esac')
    if sudo:
        _tool(tools, "sudo", "true")
    if apt:
        _tool(tools, "apt-get", "true")
    env = {"PATH": str(tools), "CHROMIUM": str(tmp_path / "no-chromium")}
    return subprocess.run(["/bin/sh", str(root / "local/prereqs.sh"), goal], env=env, capture_output=True, text=True)


def test_a_machine_with_everything_passes_silently(tmp_path):
    result = _check(tmp_path, "test")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_everything_missing_is_named_on_one_line(tmp_path):
    result = _check(tmp_path, "test", system="Darwin", python_version=(3, 9), uid=1000, sudo=False, apt=False)
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("make test needs: Linux (this is Darwin); Python 3.11 or later (python3 is 3.9.0")
    assert "apt-get, to install Chromium" in line and "root or password-free sudo" in line
    assert "Traceback" not in line


@pytest.mark.parametrize("changes, named", [
    ({"venv": False}, "Python's venv module with ensurepip"),
    ({"uid": 1000, "sudo": False}, "root or password-free sudo"),
    ({"apt": False}, "apt-get"),
    ({"free_gib": 2}, "5 GiB of free disk for the virtualenvs (2 GiB free here)"),
])
def test_each_lack_is_named(tmp_path, changes, named):
    result = _check(tmp_path, "test", **changes)
    assert result.returncode == 1 and named in result.stderr and len(result.stderr.splitlines()) == 1


def test_root_needs_no_sudo_and_the_demo_needs_no_browser(tmp_path):
    assert _check(tmp_path / "root", "test", uid=0, sudo=False).returncode == 0
    assert _check(tmp_path / "demo", "demo", sudo=False, apt=False).returncode == 0
