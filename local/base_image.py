"""The training image's base, pinned by digest: `make image-pin` resolves the Dockerfile's tag to
the digest the registry serves now and writes `tag@sha256:...` into the Dockerfile;
`make image-check` asks the registry whether that digest still exists and whether the tag still
points at it. Both need docker and the network; a build from the pin never depends on a tag
that was moved or deleted.

    python -m local.base_image pin|check [Dockerfile]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

DOCKERFILE = Path(__file__).resolve().parents[1] / "training_image" / "Dockerfile"
# ARG BASE_IMAGE=<repository>:<tag>[@sha256:<64 hex digits>]
BASE = re.compile(r"^ARG BASE_IMAGE=(?P<repository>[^:@\s]+):(?P<tag>[^@\s]+)(?:@(?P<digest>sha256:[0-9a-f]{64}))?$", re.M)

Run = Callable[[list[str]], str]


class PinError(RuntimeError):
    """The base image is not pinned, or its pin no longer matches the registry."""


def base(dockerfile: Path = DOCKERFILE) -> tuple[str, str, str | None]:
    """(repository, tag, digest or None) of the Dockerfile's BASE_IMAGE."""
    found = BASE.findall(dockerfile.read_text())
    if len(found) != 1:
        raise PinError(f"{dockerfile}: expected one 'ARG BASE_IMAGE=<repository>:<tag>[@sha256:<digest>]' line")
    return found[0][0], found[0][1], found[0][2] or None


def _docker(argv: list[str]) -> str:
    return subprocess.run(["docker", *argv], check=True, capture_output=True, text=True, timeout=120).stdout


def resolve(reference: str, run: Run = _docker) -> str:
    """The digest the registry serves for `reference` (the manifest list's, for a multi-arch tag)."""
    answer = json.loads(run(["buildx", "imagetools", "inspect", reference, "--format", "{{json .Manifest}}"]))
    digest = answer.get("digest", "")
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise PinError(f"the registry gave no digest for {reference}: {answer}")
    return digest


def pin(dockerfile: Path = DOCKERFILE, run: Run = _docker) -> str:
    """Write the tag's current digest into the Dockerfile; the pinned reference."""
    repository, tag, _ = base(dockerfile)
    digest = resolve(f"{repository}:{tag}", run)
    reference = f"{repository}:{tag}@{digest}"
    text = BASE.sub(f"ARG BASE_IMAGE={reference}", dockerfile.read_text())
    dockerfile.write_text(text)
    return reference


def check(dockerfile: Path = DOCKERFILE, run: Run = _docker) -> str:
    """The pinned digest exists and the tag still points at it; PinError otherwise."""
    repository, tag, digest = base(dockerfile)
    if digest is None:
        raise PinError(f"{repository}:{tag} is not pinned by digest: run make image-pin")
    try:
        resolve(f"{repository}@{digest}", run)
    except subprocess.CalledProcessError as error:
        raise PinError(f"{repository}@{digest} is not in the registry: {error.stderr or error}") from error
    now = resolve(f"{repository}:{tag}", run)
    if now != digest:
        raise PinError(f"{repository}:{tag} now points at {now}, not the pinned {digest}: review, then make image-pin")
    return f"{repository}:{tag}@{digest}"


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("pin", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    dockerfile = Path(argv[1]) if len(argv) > 1 else DOCKERFILE
    try:
        print((pin if argv[0] == "pin" else check)(dockerfile))
    except PinError as error:
        print(f"base image: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
