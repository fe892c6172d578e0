"""`fusion-publish`: the operator's command that makes a Hugging Face folder a public base model.

    fusion-publish s3://<artifacts bucket>/base-models/llama-3.2-1b/ --name llama-3.2-1b

The folder gets the same check as a tenant's POST /models (config.json and safetensors headers,
read with ranged GETs), and, when ready, a catalog entry `hf-<name>` owned by "public" that every
tenant lists and trains. Runs with the operator's AWS credentials; MODELS_TABLE names the catalog
table (a stack output).
"""

from __future__ import annotations

import argparse
import re
import sys

import boto3

from shared.hf_check import folder_model
from shared.store import PUBLIC_OWNER, Catalog

NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")


def publish(uri: str, name: str, *, catalog: Catalog, s3) -> dict:
    """The catalog record written: ready, or rejected (then nothing is written)."""
    if not NAME.match(name):
        raise ValueError(f"name {name!r} must be lower-case letters, digits, '.' and '-' (at most 63)")
    model = {**folder_model(uri, name, PUBLIC_OWNER, s3), "model_id": f"hf-{name}", "kind": "base"}
    if model["status"] == "ready" and not catalog.register(model):
        raise ValueError(f"hf-{name} is already published")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusion-publish", description=__doc__.splitlines()[0])
    parser.add_argument("uri", help="s3:// folder holding config.json, the safetensors shards and tokenizer.json")
    parser.add_argument("--name", required=True, help="the model's name; its id is hf-<name>")
    args = parser.parse_args(argv)
    try:
        model = publish(args.uri, args.name, catalog=Catalog(), s3=boto3.client("s3"))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if model["status"] != "ready":
        print(f"error: {args.uri} rejected: {model['reason']}", file=sys.stderr)
        return 1
    print(f"published {model['model_id']}: {model['family']}, {model['parameters']:,} parameters, "
          f"{model['depth']} layers, context {model['context_length']}, {model['dtype']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
