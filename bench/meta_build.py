"""Host memory of a sharded (FSDP) run's model build, per rank, two gloo ranks on the CPU.

Eager: every rank loads the base, grows it and shards the grown model (the whole model passes
through every rank's memory). Meta: the grown model is built on the meta device, sharded, and
each rank reads only its rows of the base's files (training_image.jobs.grown_model). The figure
is each rank's peak memory over what it held before the build: resident (VmHWM) and anonymous
(RssAnon, sampled), against the fp32 bytes of the whole grown model and of one rank's shard.

    .venv/bin/python bench/meta_build.py [--size small] [--ranks 2]
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from shared.memory import Layout
from shared.shapes import SIZES, grown_config
from training_image import jobs, parallel
from training_image.data import stdlib_corpus
from training_image.model import Decoder
from training_image.modeldir import save_model_dir
from training_image.tokenizer import train_tokenizer


def _status(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS: resident now, VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rank(rank: int, world: int, port: int, base: str, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from what is resident now
        before, anon_before = _status("VmRSS"), _status("RssAnon")
        anon_peak, done = [anon_before], threading.Event()

        def sample() -> None:  # the kernel keeps no peak of anonymous memory alone
            while not done.wait(0.002):
                anon_peak[0] = max(anon_peak[0], _status("RssAnon"))

        sampler = threading.Thread(target=sample)
        sampler.start()
        layout = Layout(strategy="fsdp") if mode == "meta" else Layout()  # the default layout grows eagerly
        _, _, model, materialize = jobs.grown_model(Path(base), layout, world)
        parallel.wrap(model, strategy="fsdp", activation_checkpointing=False, world_size=world,
                      device=torch.device("cpu"), materialize=materialize)
        done.set()
        sampler.join()
        held = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())
        Path(f"{out}.{rank}").write_text(json.dumps({
            "peak": _status("VmHWM") - before, "anon": max(anon_peak[0], _status("RssAnon")) - anon_before, "held": held,
        }))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    config = SIZES[args.size]
    whole = grown_config(config).parameters() * 4
    with tempfile.TemporaryDirectory(prefix="fusion-meta-build-") as work:
        tokenizer = train_tokenizer(stdlib_corpus(200_000), 512)
        base = save_model_dir(Path(work) / "base", Decoder(config).init_weights(0), tokenizer)
        print(f"{args.size}: grown model {grown_config(config).parameters():,} parameters, "
              f"{whole / 2**20:.0f} MiB in fp32; {args.ranks} gloo ranks")
        results = {}
        for mode in ("eager", "meta"):
            out = str(Path(work) / mode)
            mp.spawn(_rank, args=(args.ranks, _free_port(), str(base), mode, out), nprocs=args.ranks, join=True)
            results[mode] = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(args.ranks)]
            peaks = " ".join(f"{r['peak'] / 2**20:.0f}" for r in results[mode])
            anon = " ".join(f"{r['anon'] / 2**20:.0f}" for r in results[mode])
            held = " ".join(f"{r['held'] / 2**20:.0f}" for r in results[mode])
            print(f"  {mode:5s} build, per rank: peak resident {peaks} MiB, of it anonymous {anon} MiB; "
                  f"parameters held after {held} MiB")
        for figure, what in (("anon", "anonymous"), ("peak", "resident")):
            ratio = max(r[figure] for r in results["meta"]) / max(r[figure] for r in results["eager"])
            print(f"  ratio meta / eager, peak {what} (largest rank) {ratio:.2f}")
        print(f"  (a rank's shard is {1 / args.ranks:.2f} of the model; the resident peak also counts the pages of the "
              "base's files a rank reads through their memory map: page cache, shared by the host's ranks)")


if __name__ == "__main__":
    main()
