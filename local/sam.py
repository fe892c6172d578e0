"""template.yaml as CloudFormation receives it: the SAM transform applied offline by aws-sam-translator.

What CloudFormation checks (circular dependencies, the roles SAM writes for each function, the
policy templates expanded into statements) exists only after the transform, so the lint and the
permission tests read this, not the SAM source: cfn-lint on template.yaml itself reports neither a
cycle nor a retired runtime there.

aws-sam-translator pins pydantic below ours, so it lives with aws-sam-cli in .venv-sam (the
Makefile makes it); from any other interpreter the transform runs there.

    .venv-sam/bin/python -m local.sam [OUT.json]    # the transformed template (stdout without OUT)
"""

from __future__ import annotations

import copy
import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from local.resources import TEMPLATE

REPO = Path(__file__).resolve().parent.parent
SAM_PYTHON = REPO / ".venv-sam" / "bin" / "python"

# Values for the parameters without a default; the transform only needs them to be well formed.
PLACEHOLDER_PARAMETERS = {"JwtIssuer": "https://issuer.example", "JwtAudience": "fusion-client"}
# What `sam build` / `sam package` put in place of the local CodeUri and ContentUri folders.
PACKAGED_URI = "s3://fusion-packaging/code.zip"
REGION = "us-east-1"


def transformed(path: str | Path = TEMPLATE) -> dict[str, Any]:
    """The CloudFormation template the SAM transform makes of `path` (a fresh copy per call)."""
    path = Path(path).resolve()
    return copy.deepcopy(_transformed(str(path), path.stat().st_mtime_ns))


@lru_cache(maxsize=4)
def _transformed(path: str, mtime_ns: int) -> dict[str, Any]:
    try:
        import samtranslator  # noqa: F401
    except ImportError:
        return _in_sam_venv(path)
    return _translate(path)


def _in_sam_venv(path: str) -> dict[str, Any]:
    import subprocess

    if not SAM_PYTHON.exists():
        raise RuntimeError(f"{SAM_PYTHON} is missing: `make .venv-sam/.installed` (make test does) installs it")
    done = subprocess.run([str(SAM_PYTHON), "-m", "local.sam", "--template", path], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the SAM transform failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout)


def _translate(path: str) -> dict[str, Any]:
    from cfnlint.decode import decode
    from samtranslator.parser.parser import Parser
    from samtranslator.translator.translator import Translator

    template, errors = decode(path)
    if errors:
        raise ValueError(f"{path} does not parse: {errors}")
    template = json.loads(json.dumps(template))  # cfn-lint's node types to plain dicts and strings
    function_globals = template.get("Globals", {}).get("Function", {})
    if "CodeUri" in function_globals:
        function_globals["CodeUri"] = PACKAGED_URI
    for resource in template["Resources"].values():
        props = resource.get("Properties", {})
        for key in ("CodeUri", "ContentUri"):
            if key in props:
                props[key] = PACKAGED_URI
    previous = os.environ.get("AWS_DEFAULT_REGION")
    os.environ["AWS_DEFAULT_REGION"] = REGION  # the translator takes the partition from the region
    try:
        return Translator(managed_policy_map={}, sam_parser=Parser()).translate(
            sam_template=template, parameter_values=dict(PLACEHOLDER_PARAMETERS), passthrough_metadata=True,
            get_managed_policy_map=lambda: {},
        )
    finally:
        if previous is None:
            os.environ.pop("AWS_DEFAULT_REGION", None)
        else:
            os.environ["AWS_DEFAULT_REGION"] = previous


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m local.sam", description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", help="write the transformed template here (default: stdout)")
    parser.add_argument("--template", default=str(TEMPLATE))
    args = parser.parse_args(argv)
    text = json.dumps(transformed(args.template), indent=1, sort_keys=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
