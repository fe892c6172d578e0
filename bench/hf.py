"""Hugging Face checkpoints in and out: parity per family, artifact size by dtype, import time.

    python bench/hf.py [--skip-1b]

1. Parity: a tiny random model of each family built with transformers' own config class, saved
   sharded, imported: max |logit difference| against transformers (fp32) and whether 20 greedy
   tokens match.
2. Size: the same Qwen2-shaped model imported from an fp32 and from a bf16 checkpoint.
3. Import time of a random checkpoint of Llama 3.2 1B's shape (bf16, sharded), against the time
   to copy its bytes once (the floor any import pays), in a temporary folder removed after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.hf import hf_config, hf_names, tensor_shapes  # noqa: E402
from shared.shapes import ModelConfig, RopeScaling  # noqa: E402
from tests.training_image.test_hf_import import FAMILIES, VOCAB, hf_checkpoint, hf_greedy  # noqa: E402
from training_image.data import stdlib_corpus  # noqa: E402
from training_image.generate import generate  # noqa: E402
from training_image.hf import import_hf  # noqa: E402
from training_image.modeldir import load_model_dir  # noqa: E402
from training_image.tokenizer import train_tokenizer  # noqa: E402

LLAMA_1B = ModelConfig.uniform(
    vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, mlp_hidden=8192, context_length=131072,
    rope_theta=500000.0, tie_embeddings=True, dtype="bfloat16",
    rope_scaling=RopeScaling(type="llama3", factor=32.0, original_context_length=8192),
)


def parity(work: Path, corpus: list[str]) -> None:
    print("family   max|dlogit|  greedy20")
    for family in sorted(FAMILIES):
        hf = hf_checkpoint(work / family, family, corpus)
        import_hf(work / family, work / f"{family}-ours")
        ours, _ = load_model_dir(work / f"{family}-ours")
        tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            delta = (hf(tokens).logits - ours(tokens)).abs().max().item()
        prompt = tokens[0, :8].tolist()
        match = generate(ours, prompt, 20) == hf_greedy(hf, prompt, 20)
        print(f"{family:8} {delta:11.2e}  {'identical' if match else 'DIFFERENT'}")


def sizes(work: Path, corpus: list[str]) -> None:
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        hf_checkpoint(work / f"size-{name}", "qwen2", corpus, dtype=dtype)
        import_hf(work / f"size-{name}", work / f"size-{name}-ours")
        found[name] = sum(f.stat().st_size for f in (work / f"size-{name}-ours").glob("*.safetensors"))  # one file or shards
    print(f"artifact bytes: float32 {found['float32']:,}  bfloat16 {found['bfloat16']:,}  "
          f"ratio {found['bfloat16'] / found['float32']:.3f}")


def import_1b(work: Path, corpus: list[str]) -> None:
    source = work / "llama-1b"
    source.mkdir()
    shapes, names = tensor_shapes(LLAMA_1B), hf_names(LLAMA_1B)
    generator = torch.Generator().manual_seed(0)
    shard, shard_bytes, weight_map, files = {}, 0, {}, []

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(source / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in shard})
        files.append(name)
        shard, shard_bytes = {}, 0

    for ours, shape in shapes.items():
        shard[names[ours]] = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
        shard_bytes += shard[names[ours]].numel() * 2
        if shard_bytes > 1_000_000_000:
            flush()
    if shard:
        flush()
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (source / "config.json").write_text(json.dumps(hf_config(LLAMA_1B, None, 0)))
    train_tokenizer(corpus[:20], 2000).save(str(source / "tokenizer.json"))
    total = sum(f.stat().st_size for f in source.glob("*.safetensors"))

    started = time.perf_counter()
    for name in files:
        shutil.copyfile(source / name, work / f"copy-{name}")
    copy_seconds = time.perf_counter() - started
    started = time.perf_counter()
    import_hf(source, work / "llama-1b-ours")
    import_seconds = time.perf_counter() - started
    print(f"1B-shape import ({LLAMA_1B.parameters() / 1e9:.2f}B parameters, {total / 1e9:.2f} GB bf16, "
          f"{len(files)} shards): {import_seconds:.1f} s; copying the same bytes once: {copy_seconds:.1f} s "
          f"(ratio {import_seconds / copy_seconds:.2f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-1b", action="store_true", help="leave out the 1B-shape import (2.5 GB of disk)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus = stdlib_corpus(300_000)
    work = Path(tempfile.mkdtemp(prefix="fusion-bench-hf-"))
    try:
        parity(work, corpus)
        sizes(work, corpus)
        if not args.skip_1b:
            import_1b(work, corpus)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
