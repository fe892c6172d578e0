"""Training benchmark, in one process on the same shapes and data.

Throughput: tokens/s of Fusion's trainer (the product's Trainer.run(), steady state) against a
plain Hugging Face LlamaForCausalLM + AdamW loop of the same shape, batch, data and schedule,
measured in alternating rounds so that whatever else the machine is doing weighs on both alike;
at both precisions (fp32 for both, bf16 autocast for both) and ours at its default against HF at
its default (fp32); on a GPU also MFU. Quality: held-out perplexity after 1 turn and after
2 turns from the same grown base.

    .venv/bin/python bench/train.py [--size tiny] [--seq-len 128] [--rounds 20] [--steps 2] [--threads 1]
    .venv/bin/python bench/train.py --part throughput --size medium --seq-len 512   # on a GPU: MFU
    .venv/bin/python bench/train.py --part throughput --device cuda --size llama-1b --seq-len 2048 --compile
    torchrun --nproc_per_node=8 bench/train.py --part throughput --device cuda --strategy fsdp --size large
    torchrun --standalone --nproc_per_node=1 bench/train.py --part throughput --device cuda \
        --size medium,large,llama-1b --strategy ddp,fsdp --compile both --batch 4 --seq-len 2048   # every shape, both strategies (bench/gpu.sh measures one GPU within a budget)

--strategy picks DDP or FSDP (training_image.parallel) when run under torchrun, where the HF loop
is left out (it is one process's loop), except at one rank: there FSDP shards over a one-rank
mesh, so one GPU measures FSDP's own costs (bf16 compute from fp32 shards, a gather and a free
per block) against the HF loop. --compile compiles each block (ours and HF's alike), as the
blocks are what FSDP shards (`--compile both`: without, then with); --micro-batch splits each
rank's share of the batch; --batch overrides the product's sequences per step (for both loops).
--size and --strategy take comma-separated lists, measured in one process (one tokenizer).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from shared.pricing import LLAMA_SHAPES
from shared.shapes import SIZES, ModelConfig
from training_image import parallel, runtime
from training_image.data import stdlib_corpus, token_windows
from training_image.evaluate import perplexity
from training_image.growth import grow
from training_image.model import Decoder, attend
from training_image.tokenizer import train_tokenizer
from training_image.train import GRAD_CLIP, Trainer, TrainPlan, autocast_dtype, batch_size_for, lr_at

# Dense bf16 peaks (FLOP/s) by GPU name, for MFU: the first key the name contains (PCIe and NVL
# H100s before the SXM one).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def hf_llama(config: ModelConfig, attention: str = "sdpa") -> LlamaForCausalLM:
    """The same shape as a transformers Llama; attention: its attn_implementation ("sdpa", its
    default, or "eager": its own matmul-softmax-matmul)."""
    layer = config.layers[0]
    hf = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=layer.mlp_hidden,
        num_hidden_layers=config.n_layers, num_attention_heads=layer.n_heads, num_key_value_heads=layer.n_kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.context_length, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings, attn_implementation=attention,
    )
    return LlamaForCausalLM(hf)


def hf_loop(model: LlamaForCausalLM, windows: torch.Tensor, plan: TrainPlan, batch_indices, bf16: bool) -> Callable[[int], None]:
    """The loop a user would write around the Hugging Face model: default AdamW, the same
    warm-up + cosine schedule through LambdaLR, the same clipping, bf16 autocast if asked.
    Returns run(n), which trains n more steps on the same batches as ours (batch_indices(0, step))."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, betas=(0.9, 0.95), weight_decay=0.1)
    cycle_len = plan.cycle_steps[0]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cycle_len, plan.lr) / plan.lr)
    done = 0

    def run(steps: int) -> None:
        nonlocal done
        for _ in range(steps):
            rows = windows[batch_indices(0, done)].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                # HF shifts the labels itself. No KV cache in training: building one also makes each
                # compiled layer recompile for its layer index, until dynamo gives up and runs eager.
                loss = model(input_ids=rows[:, :-1], labels=rows[:, :-1], use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1

    return run


def kernel_floor(config: ModelConfig, sequences: int, micro_batch: int, seq_len: int, device: torch.device,
                 bf16: bool) -> Callable[[int], None]:
    """run(n): n steps of nothing but a training step's matrix products and attention calls, on
    random tensors of the step's shapes: each block's seven projections forward, their input and
    weight gradients backward, causal grouped-query attention forward and backward as the
    product computes it (training_image.model.attend: in fp32 on a CPU at short sequences), and
    the head's three products (logits, hidden-state and weight gradients), per micro-batch. The
    product's loop spends at least this long on a step (the norms, rotary, SwiGLU, loss
    arithmetic, optimizer and framework come on top): its time over this is its overhead."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokens, D, C, V = micro_batch * seq_len, config.head_dim, config.dim, config.vocab_size
    rand = lambda *shape, grad=False: torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)  # noqa: E731
    shapes: dict = {}  # one set of tensors per distinct layer shape, run once per layer

    def tensors(layer):
        H, K, M = layer.n_heads, layer.n_kv_heads, layer.mlp_hidden
        # (weight, its input) of q, k, v, o, gate, up, down
        projections = [(rand(H * D, C), rand(tokens, C)), (rand(K * D, C), rand(tokens, C)), (rand(K * D, C), rand(tokens, C)),
                       (rand(C, H * D), rand(tokens, H * D)), (rand(M, C), rand(tokens, C)), (rand(M, C), rand(tokens, C)),
                       (rand(C, M), rand(tokens, M))]
        attention = (rand(micro_batch, H, seq_len, D, grad=True), rand(micro_batch, K, seq_len, D, grad=True),
                     rand(micro_batch, K, seq_len, D, grad=True), rand(micro_batch, H, seq_len, D))
        return projections, attention, [rand(tokens, w.shape[0]) for w, _ in projections]

    layers = [shapes[layer] if layer in shapes else shapes.setdefault(layer, tensors(layer)) for layer in config.layers]
    head, hidden, logits = rand(V, C), rand(tokens, C), rand(tokens, V)

    def run(steps: int) -> None:
        for _ in range(steps * (sequences // micro_batch)):
            for projections, (q, k, v, grad), output_grads in layers:
                for weight, inputs in projections:
                    inputs @ weight.t()
                for (weight, inputs), output_grad in zip(projections, output_grads):
                    output_grad @ weight  # the input's gradient
                    output_grad.t() @ inputs  # the weight's
                attend(q, k, v, is_causal=True).backward(grad)
            hidden @ head.t(), logits @ head, logits.t() @ hidden

    return run


def _timed(run: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). CPU time is what contention from other
    processes on a shared machine disturbs least; wall time is what a user waits."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU, from its name; None when the table does not know it."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def throughput(
    config: ModelConfig, windows: torch.Tensor, seq_len: int, rounds: int, steps: int, device: torch.device,
    ours_bf16: bool | None, hf_bf16: bool, *, strategy: str = "ddp", compile_blocks: bool = False,
    micro_batch: int | None = None, batch: int | None = None, base: Decoder | None = None, floor: bool = False,
    hf_attention: str = "sdpa",
) -> None:
    """Steady-state steps of the product's Trainer.run() against the HF loop, in alternating
    rounds (A B B A A B ...); the figure is the median over rounds of each round's ratio.
    ours_bf16 None: the Trainer's own choice (autocast_dtype). base: the initial weights (copied).
    floor: also time kernel_floor at the HF loop's precision in the same rounds (one process)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    batch = batch or batch_size_for(config.parameters())
    batch += (-batch) % world
    plan = TrainPlan(turns=1, cycle_steps=[(rounds + 1) * steps], lr=1e-3, seq_len=seq_len, batch_size=batch)
    ours = (copy.deepcopy(base) if base is not None else Decoder(config).init_weights(0)).train()
    if compile_blocks and strategy == "fsdp" and world == 1:
        parallel.compile_blocks(ours)  # the product's compilation, before the one-rank sharding below
    if strategy == "fsdp" and world == 1:
        if not dist.is_initialized():
            raise SystemExit("--strategy fsdp on one process needs a process group: run it under torchrun --nproc_per_node=1")
        parallel.shard(ours, device)  # a one-rank mesh: the Trainer takes the model as it is
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The product's own path: the Trainer compiles the blocks itself (parallel.compile_blocks).
    trainer = Trainer(ours, windows, None, plan, strategy=strategy, micro_batch=micro_batch, device=device,
                      log=None, autocast=ours_bf16, compile=compile_blocks and not parallel.is_sharded(ours))
    precision = lambda bf16: "bf16 autocast" if bf16 else "fp32"  # noqa: E731
    ours_precision = precision(trainer.autocast) + (" (its default)" if ours_bf16 is None else "")
    if trainer.sharded:
        ours_precision = f"FSDP, {parallel.mixed_precision(device).param_dtype or torch.float32} compute"
    print(f"precision: fusion {ours_precision}, HF {precision(hf_bf16)}; HF attention: {hf_attention}")
    loops = {"fusion": lambda: trainer.run(max_steps=steps)}
    reference = hf = compiled_reference = hf_compiled = None
    if world == 1:
        with torch.device(device):  # initialized where it runs: no minutes of CPU init for 1B
            reference = hf_llama(config, hf_attention).train()
        hf = hf_loop(reference, windows, plan, trainer.batch_indices, hf_bf16)
        loops["hf"] = lambda: hf(steps)
        if compile_blocks:  # compiled ours against HF both eager and compiled (each layer)
            compiled_reference = copy.deepcopy(reference)
            for layer in compiled_reference.model.layers:
                layer.compile()
            hf_compiled = hf_loop(compiled_reference, windows, plan, trainer.batch_indices, hf_bf16)
            loops["hf compiled"] = lambda: hf_compiled(steps)
        if floor:
            kernels = kernel_floor(config, batch, trainer.micro_batch, seq_len, device, hf_bf16)
            loops["floor"] = lambda: kernels(steps)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in loops}
    for r in range(rounds + 1):  # round 0 warms both up and is not counted
        order = ["fusion", "hf", "hf compiled", "floor"] if r % 2 else ["floor", "hf compiled", "hf", "fusion"]
        for name in [n for n in order if n in loops]:
            measured = _timed(loops[name], device)
            if r:
                times[name].append(measured)
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    micro = trainer.micro_batch
    del trainer, ours, loops, reference, hf, compiled_reference, hf_compiled  # the next measurement gets the GPU's memory whole
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if runtime.rank() != 0:
        return
    tokens = steps * batch * seq_len
    rate = {name: (statistics.median(tokens / w for w, _ in t), statistics.median(tokens / c for _, c in t)) for name, t in times.items()}
    print(f"throughput on {world} x {_device_name(device)} ({strategy}{', compiled blocks' if compile_blocks else ''}, "
          f"micro-batches of {micro}): {config.parameters():,} parameters, batch {batch} x seq_len {seq_len}, "
          f"{rounds} alternating rounds of {steps} steps, torch threads {torch.get_num_threads()}")
    print(f"{'':22s}{'wall tokens/s':>15s}{'CPU-time tokens/s':>20s}   (medians over rounds)")
    print(f"  fusion trainer    {rate['fusion'][0]:15.0f}{rate['fusion'][1]:20.0f}")
    if "hf" in rate:
        ratios = [(h[0] / f[0], h[1] / f[1]) for f, h in zip(times["fusion"], times["hf"])]
        wall_ratio, cpu_ratio = statistics.median(r[0] for r in ratios), statistics.median(r[1] for r in ratios)
        print(f"  HF Llama + AdamW  {rate['hf'][0]:15.0f}{rate['hf'][1]:20.0f}")
        print(f"  ratio fusion / HF {wall_ratio:15.2f}{cpu_ratio:20.2f}   (median of per-round ratios; must be >= 1.0, goal 1.5)")
        print(f"  per-round wall ratios: {' '.join(f'{r[0]:.2f}' for r in ratios)}")
        print(f"  per-round CPU ratios:  {' '.join(f'{r[1]:.2f}' for r in ratios)}")
    if "hf compiled" in rate:
        ratios = [(h[0] / f[0], h[1] / f[1]) for f, h in zip(times["fusion"], times["hf compiled"])]
        print(f"  HF compiled layers{rate['hf compiled'][0]:15.0f}{rate['hf compiled'][1]:20.0f}")
        print(f"  ratio fusion / HF compiled {statistics.median(r[0] for r in ratios):6.2f}"
              f"{statistics.median(r[1] for r in ratios):20.2f}   (median of per-round ratios)")
    if "floor" in rate:
        hf_over = [h[1] / k[1] for h, k in zip(times["hf"], times["floor"])]
        over = [f[1] / k[1] for f, k in zip(times["fusion"], times["floor"])]
        print(f"  matmuls + attention alone {rate['floor'][0]:7.0f}{rate['floor'][1]:20.0f}   (kernel_floor: what the product's loop spends at least)")
        print(f"  HF / floor {statistics.median(hf_over):5.2f}; fusion / floor {statistics.median(over):.2f}"
              f"   (CPU time, medians of per-round ratios)")
    peak = peak_flops(device)
    if peak_memory is not None:
        print(f"  peak GPU memory (both loops) {peak_memory:.1f} GiB; bf16 dense peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    if device.type == "cuda":
        for name, label in (("fusion", "fusion trainer"), ("hf", "HF Llama + AdamW")):
            if name not in rate:
                continue
            # Tokens/s are of all ranks: over the peak of all their GPUs.
            mfu = f"{6 * config.parameters() * rate[name][0] / (peak * world):.1%}" if peak else "unknown (peak not in the table)"
            print(f"  MFU {label:18s} {mfu}   (6 x parameters x tokens/s / bf16 dense peak; goal >= 45%)")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def quality(config: ModelConfig, train: torch.Tensor, heldout: torch.Tensor, seq_len: int, cycles: int, steps: int, lr: float) -> None:
    base = Decoder(config).init_weights(0)
    results = {}
    for turns in (1, 2):
        model, _ = grow(base, config)
        plan = TrainPlan(turns=turns, cycle_steps=[steps] * cycles, lr=lr, seq_len=seq_len,
                         batch_size=batch_size_for(model.config.parameters()))
        started = time.monotonic()
        Trainer(model, train, None, plan, log=None).run()
        results[turns] = (perplexity(model, heldout), time.monotonic() - started)
    before = perplexity(grow(base, config)[0], heldout)
    print(f"quality: grown {config.n_layers}-block base, {cycles} cycles x {steps} steps per turn, lr {lr}, "
          f"{len(heldout)} held-out windows of {seq_len} tokens")
    print(f"  perplexity before training {before:10.2f}")
    for turns, (ppl, seconds) in results.items():
        print(f"  after {turns} turn{'s' if turns > 1 else ' '}            {ppl:10.2f}   ({seconds:.0f} s)")
    print(f"  ratio 2 turns / 1 turn     {results[2][0] / results[1][0]:10.3f}   (must be < 1)")


def _listed(allowed):
    """An argparse type: a comma-separated list of names, each one of `allowed`."""
    def parse(text: str) -> list[str]:
        names = [name for name in text.split(",") if name]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{','.join(unknown) or text!r}: expected one or more of {', '.join(allowed)}")
        return names

    return parse


def _precisions(args, config: ModelConfig, train: torch.Tensor, device: torch.device, **options) -> None:
    """throughput() at each precision pairing --precision asks for."""
    default = autocast_dtype(device) is not None
    pairs = {"fp32": (False, False), "bf16": (True, True), "default": (None, False)}
    for name, (ours, hf) in pairs.items():
        if args.precision not in ("all", name):
            continue
        if name == "default" and args.precision == "all" and not default:
            print("fusion at its default (fp32 on this machine: no bf16 hardware) vs HF at its default (fp32): "
                  "the fp32 comparison above\n")
            continue
        throughput(config, train, args.seq_len, args.rounds, args.steps, device, ours, hf,
                   micro_batch=args.micro_batch, batch=args.batch, floor=args.floor, hf_attention=args.hf_attention, **options)
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shapes = {**SIZES, **LLAMA_SHAPES}
    parser.add_argument("--size", default="tiny", type=_listed(shapes), help=f"one or more of {', '.join(shapes)}, comma-separated")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per loop per round")
    parser.add_argument("--quality-size", default="debug", choices=sorted(SIZES))
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--steps-per-cycle", type=int, default=150)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU, the same for both loops (0: torch's choice)")
    parser.add_argument("--part", default="all", choices=("all", "throughput", "quality"))
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when there is one")
    parser.add_argument("--strategy", default="ddp", type=_listed(("ddp", "fsdp")), help="over the ranks of torchrun: ddp, fsdp or ddp,fsdp")
    parser.add_argument("--compile", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                        help="torch.compile each block (both: without, then with)")
    parser.add_argument("--micro-batch", type=int, help="sequences per forward/backward on one rank")
    parser.add_argument("--batch", type=int, help="sequences per step (default: the product's rule for the size)")
    parser.add_argument("--floor", action="store_true",
                        help="also time a step's matmuls and attention alone (kernel_floor): the product's overhead over its kernels")
    parser.add_argument("--hf-attention", default="sdpa", choices=("sdpa", "eager"),
                        help="transformers' attn_implementation: sdpa (its default) or eager (matmul, softmax, matmul)")
    parser.add_argument("--corpus-chars", type=int, default=3_000_000, help="characters of stdlib text to tokenize")
    parser.add_argument("--precision", default="all", choices=("all", "fp32", "bf16", "default"),
                        help="throughput: fp32 vs fp32, bf16 vs bf16, ours at its default vs HF at its default (fp32)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    runtime.init_distributed()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = runtime.device()  # this rank's GPU, TF32 on as in the trainer

    corpus = stdlib_corpus(args.corpus_chars)
    parts = [("throughput", args.size), ("quality", [args.quality_size])]
    for part, sizes in parts if args.part == "all" else [p for p in parts if p[0] == args.part]:
        configs = [shapes[size] for size in sizes]
        tokenizer = train_tokenizer(corpus, min(32768, *(c.vocab_size for c in configs)))  # ids stay below any vocab
        train, heldout = token_windows(tokenizer, corpus, args.seq_len)
        if part == "throughput":
            for config in configs:
                base = Decoder(config).init_weights(0)  # once: copied for each measurement
                for strategy in args.strategy:
                    for compile_blocks in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
                        _precisions(args, config, train, device, strategy=strategy, compile_blocks=compile_blocks, base=base)
                del base
        else:
            config = configs[0]
            quality(config, train, heldout, args.seq_len, args.cycles, args.steps_per_cycle, args.lr)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
