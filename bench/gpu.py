"""Training throughput on one GPU within a fixed budget: the product's Trainer against
transformers' LlamaForCausalLM under the same AdamW, both in bf16, on the same random batches.
bench/gpu.sh runs it (docs/gpu.md); --dry runs every path on the CPU with tiny shapes.

In order of value, each run only if the budget has room for it: the 1B Llama shape eager, then
compiled (each block, ours and HF's alike), then medium and large eager. Per run and loop:
tokens/s, MFU, the utilization the ETA assumes (shared/prices.json), and peak memory. The
figures go to stdout and, after every run (so that a run cut short keeps the ones before), to
FIGURES.json and FIGURES.txt.

MFU counts the attention FLOPs: per token 6N + 6·L·H·D·T (N the parameters that multiply: all
but an untied input embedding; L layers, H query heads, D head dim, T seq_len; the score and
value matmuls of a causal mask, half of the 12·L·H·D·T of full attention) over the card's dense
bf16 peak. The ETA's figure is the same tokens/s over the FLOPs the ETA counts, 6 x parameters
per token (shared.pricing), so it is the number that replaces model_flops_utilization.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import signal
import sys
import time
from pathlib import Path

import torch
import transformers

from bench.train import hf_llama, peak_flops
from shared.pricing import LLAMA_SHAPES
from shared.shapes import SIZES, ModelConfig
from training_image.model import Decoder
from training_image.train import GRAD_CLIP, Trainer, TrainPlan, _adamw

# (shape, compiled blocks), in order of value. The dry run keeps the paths, on tiny shapes.
RUNS = (("llama-1b", False), ("llama-1b", True), ("medium", False), ("large", False))
DRY_SHAPES = {"llama-1b": "debug", "medium": "debug", "large": "tiny"}
SHAPES = {**SIZES, **LLAMA_SHAPES}
LR = 1e-4


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """6N + 6·L·H·D·T, summed over the layers (a contracted model's layers differ)."""
    multiplying = config.parameters() - (0 if config.tie_embeddings else config.vocab_size * config.dim)
    attention = sum(6 * layer.n_heads * config.head_dim * seq_len for layer in config.layers)
    return 6 * multiplying + attention


def eta_flops_per_token(config: ModelConfig) -> float:
    """What shared.pricing counts per token for the ETA: 6 x parameters."""
    return 6 * config.parameters()


class OutOfTime(BaseException):  # not an Exception: code under measurement must not swallow it
    pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _start_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _timed(step, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds of `steps` calls of step() after `warmup` untimed ones (compilation happens there)."""
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - started


def _compile(modules, device: torch.device) -> None:
    """torch.compile each module; on the CPU (the dry run) without inductor's code generation,
    which takes minutes there, so that the dry run still traces every block through dynamo and
    AOT autograd."""
    for module in modules:
        module.compile(backend="inductor" if device.type == "cuda" else "aot_eager")


def fusion_loop(config, windows, seq_len, batch, warmup, steps, compiled, device) -> dict:
    """The product's Trainer, bf16, one process."""
    _start_memory(device)
    with torch.device(device):  # made where it runs: no CPU-side copy of a 1B model
        model = Decoder(config)
    model.init_weights(0)
    if compiled:
        _compile(model.blocks.values(), device)
    plan = TrainPlan(turns=1, cycle_steps=[warmup + steps], lr=LR, seq_len=seq_len, batch_size=batch)
    trainer = Trainer(model, windows, None, plan, device=device, log=None, autocast=True)
    seconds = _timed(lambda: trainer.run(max_steps=1), warmup, steps, device)
    peak = _peak_gib(device)
    del trainer, model
    return {"seconds": seconds, "peak_memory_gib": peak}


def hf_loop(config, windows, seq_len, batch, warmup, steps, compiled, device) -> dict:
    """transformers' Llama of the same shape, the same AdamW (training_image.train's: fused,
    decay on matrices only), clipping and bf16 autocast, on the same batches."""
    _start_memory(device)
    with torch.device(device):
        model = hf_llama(config).train()
    if compiled:
        _compile(model.model.layers, device)
    optimizer = _adamw(model, LR)
    done = 0

    def step() -> None:
        nonlocal done
        rows = windows[done * batch:(done + 1) * batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            # HF shifts the labels itself; no KV cache in training.
            loss = model(input_ids=rows[:, :-1], labels=rows[:, :-1], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done += 1

    seconds = _timed(step, warmup, steps, device)
    peak = _peak_gib(device)
    del model, optimizer
    return {"seconds": seconds, "peak_memory_gib": peak}


def measure(shape: str, compiled: bool, args, device: torch.device, peak: float | None) -> dict:
    config = SHAPES[DRY_SHAPES[shape] if args.dry else shape]
    seq_len, batch = args.seq_len, args.batch
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, config.vocab_size, ((args.warmup + args.steps) * batch, seq_len + 1), generator=generator)
    tokens = args.steps * batch * seq_len
    record = {
        "shape": shape, "measured_shape": config_name(config), "compiled": compiled, "parameters": config.parameters(),
        "seq_len": seq_len, "batch": batch, "timed_steps": args.steps, "flops_per_token": flops_per_token(config, seq_len),
    }
    for name, loop in (("fusion", fusion_loop), ("hf", hf_loop)):
        result = loop(config, windows, seq_len, batch, args.warmup, args.steps, compiled, device)
        rate = tokens / result["seconds"]
        result["tokens_per_second"] = rate
        result["mfu"] = rate * record["flops_per_token"] / peak if peak else None
        result["eta_utilization"] = rate * eta_flops_per_token(config) / peak if peak else None
        record[name] = result
    record["ratio_fusion_to_hf"] = record["fusion"]["tokens_per_second"] / record["hf"]["tokens_per_second"]
    return record


def config_name(config: ModelConfig) -> str:
    return next(name for name, known in SHAPES.items() if known == config)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(figures: dict) -> str:
    lines = [
        f"card: {figures['card']} | torch {figures['torch']} | transformers {figures['transformers']} | "
        f"python {figures['python']} | dense bf16 peak {figures['peak_bf16_flops'] or 0:.3g} FLOP/s"
        f"{' (nominal: dry run)' if figures['dry'] else ''}",
        "MFU: (6N + 6*L*H*D*T) x tokens/s / peak;  ETA util.: 6 x parameters x tokens/s / peak "
        "(what replaces model_flops_utilization in shared/prices.json)",
        f"{'run':34s}{'loop':8s}{'tokens/s':>12s}{'MFU':>8s}{'ETA util.':>11s}{'peak GiB':>10s}{'vs HF':>8s}",
    ]
    for run in figures["runs"]:
        label = f"{run['shape']}{' (' + run['measured_shape'] + ')' if run['measured_shape'] != run['shape'] else ''}, " \
                f"{'compiled' if run['compiled'] else 'eager'}"
        if "error" in run:
            lines.append(f"{label:34s}{run['error']}")
            continue
        for name in ("fusion", "hf"):
            loop = run[name]
            ratio = f"{run['ratio_fusion_to_hf']:.2f}" if name == "fusion" else ""
            lines.append(f"{label if name == 'fusion' else '':34s}{name:8s}{loop['tokens_per_second']:12.0f}"
                         f"{_pct(loop['mfu']):>8s}{_pct(loop['eta_utilization']):>11s}{_gib(loop['peak_memory_gib']):>10s}{ratio:>8s}")
    for skipped in figures["skipped"]:
        lines.append(f"{skipped}: skipped, the {figures['budget_s']:.0f} s budget is spent")
    lines.append(f"total {figures['seconds']:.0f} s")
    return "\n".join(lines)


def _write(figures: dict, out: Path) -> str:
    text = report(figures)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    out.with_suffix(".txt").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="on the CPU, tiny shapes: every path, no GPU")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu"), help="figures to OUT.json and OUT.txt")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no run starts past this; one running stops at it")
    parser.add_argument("--min-run-s", type=float, default=40.0, help="a run starts only with this much budget left")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per loop (compilation happens there)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loop")
    parser.add_argument("--peak-flops", type=float, help="dense bf16 peak of a card bench/train.py's table lacks")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.dry:
        device = torch.device("cpu")
        args.seq_len, args.batch = args.seq_len or 32, args.batch or 2
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 1)
        peak, card = args.peak_flops or 1e12, "CPU (dry run)"
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device here (--dry runs on the CPU)")
        # 4 x 2048 tokens a step: a 1B model with its fp32 AdamW state beside one step's activations.
        args.seq_len, args.batch = args.seq_len or 2048, args.batch or 4
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer's runtime.device() sets it
        peak, card = args.peak_flops or peak_flops(device), torch.cuda.get_device_name(device)
    figures = {
        "card": card, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "peak_bf16_flops": peak, "dry": args.dry, "budget_s": args.budget_s,
        "precision": "bf16 (autocast; fp32 weights and AdamW state)", "runs": [], "skipped": [], "seconds": 0.0,
    }
    print(report(figures).splitlines()[0], flush=True)

    def out_of_time(signum, frame):
        raise OutOfTime()

    signal.signal(signal.SIGALRM, out_of_time)
    failures = 0
    for shape, compiled in RUNS:
        left = args.budget_s - (time.monotonic() - started)
        label = f"{shape}, {'compiled' if compiled else 'eager'}"
        if left < args.min_run_s:
            figures["skipped"].append(label)
            continue
        print(f"== {label} ({left:.0f} s of budget left)", flush=True)
        signal.alarm(max(1, int(left)))
        try:
            figures["runs"].append(measure(shape, compiled, args, device, peak))
        except (Exception, OutOfTime) as error:  # one run's failure (out of memory, a compile error) leaves the others
            # The alarm may land inside a compiler that wraps it in an error of its own.
            spent = isinstance(error, OutOfTime) or time.monotonic() - started >= args.budget_s
            reason = "stopped: out of budget" if spent else \
                f"failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
            figures["runs"].append({"shape": shape, "measured_shape": shape, "compiled": compiled, "error": reason})
            failures += 1
        finally:
            signal.alarm(0)
        figures["seconds"] = time.monotonic() - started
        _write(figures, args.out)
    figures["seconds"] = time.monotonic() - started
    print(_write(figures, args.out), flush=True)
    print(f"figures: {args.out.with_suffix('.json')} and {args.out.with_suffix('.txt')}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
