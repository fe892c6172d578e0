"""The pure-Python dependencies the GPU benchmark needs beyond torch and transformers (pydantic
and its own), carried as wheels for a machine that has no package index and no virtualenv.
Standard library only: it runs where pydantic is missing.

    python bench/deps.py fetch             # here: download the wheels into bench/wheels (git-ignored)
    python bench/deps.py unpack DIR        # there: unpack those that fit this interpreter into DIR

The versions are requirements.lock's pins. pydantic_core is compiled: its wheel is fetched for
each CPython that a torch build may run on (3.10 to 3.14), on x86_64 and aarch64 Linux, and
unpack picks the one of the interpreter running it. A wheel is a zip file whose top level goes
on sys.path as it is, so unpacking needs no pip.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "bench" / "wheels"
PACKAGES = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions")
COMPILED = "pydantic_core"
PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")
MACHINES = ("x86_64", "aarch64")


def _key(name: str) -> str:
    return name.lower().replace("-", "_")


def pins(lock: Path = ROOT / "requirements.lock") -> dict[str, str]:
    """{package: version} of PACKAGES as requirements.lock pins them."""
    found = {}
    for line in lock.read_text().splitlines():
        name, _, version = line.partition("==")
        if _key(name.strip()) in PACKAGES and version:
            found[_key(name.strip())] = version.split(";")[0].strip()
    missing = sorted(set(PACKAGES) - set(found))
    if missing:
        raise SystemExit(f"requirements.lock pins none of {', '.join(missing)}")
    return found


def fetch(target: Path = WHEELS) -> None:
    target.mkdir(parents=True, exist_ok=True)
    versions = pins()
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
           "--no-deps", "--dest", str(target)]
    pure = [f"{name}=={versions[name]}" for name in PACKAGES if name != COMPILED]
    subprocess.run(pip + pure, check=True)
    for python in PYTHONS:
        for machine in MACHINES:
            subprocess.run(pip + ["--python-version", python, "--implementation", "cp",
                                  "--platform", f"manylinux2014_{machine}", "--platform", f"manylinux_2_17_{machine}",
                                  f"{COMPILED}=={versions[COMPILED]}"], check=True)
    size = sum(p.stat().st_size for p in target.glob("*.whl"))
    print(f"{len(list(target.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {target}")


def fits(wheel: str, python: tuple[int, int], machine: str) -> bool:
    """Whether a wheel file name installs on CPython `python` on Linux `machine`."""
    parts = wheel[: -len(".whl")].split("-")
    python_tag, abi, platforms = parts[-3], parts[-2], parts[-1]
    if python_tag == "py3" and abi == "none" and platforms == "any":
        return True
    tag = f"cp{python[0]}{python[1]}"
    return python_tag == tag and abi == tag and any(p.startswith("manylinux") and p.endswith(machine)
                                                    for p in platforms.split("."))


def unpack(target: Path, source: Path = WHEELS, python: tuple[int, int] | None = None,
           machine: str | None = None) -> list[str]:
    """Unpack each of PACKAGES from the wheel in `source` that fits this interpreter into
    `target` (for PYTHONPATH); the wheels used. Exits naming what has no fitting wheel."""
    python = python or sys.version_info[:2]
    machine = machine or platform.machine()
    chosen = {}
    for wheel in sorted(source.glob("*.whl")):
        name = _key(wheel.name.split("-")[0])
        if name in PACKAGES and fits(wheel.name, python, machine):
            chosen[name] = wheel
    missing = [name for name in PACKAGES if name not in chosen]
    if missing:
        raise SystemExit(f"no wheel of {', '.join(missing)} for CPython {python[0]}.{python[1]} on {machine} in {source} "
                         f"(`python bench/deps.py fetch` where there is a package index)")
    target.mkdir(parents=True, exist_ok=True)
    for wheel in chosen.values():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
    return [wheel.name for wheel in chosen.values()]


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "fetch":
        fetch(Path(sys.argv[2]) if len(sys.argv) > 2 else WHEELS)
    elif len(sys.argv) == 3 and sys.argv[1] == "unpack":
        used = unpack(Path(sys.argv[2]))
        print(f"unpacked {', '.join(used)} into {sys.argv[2]}")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
