"""What training keeps in memory on a CPU, against the memory plan (shared.memory).

1. Bytes a block keeps for its backward pass that are neither parameter nor buffer, at one
   length, for the Llama 3 8B and 70B block shapes with bf16 weights (as FSDP gathers them),
   against the plan's count — and the same with the q/k/v weights concatenated on each forward
   (the old attention, reproduced here) for comparison.
2. The loss's peak at a 128k vocabulary: the head's logits materialised (bf16 or fp32 logits,
   an fp32 copy, log-softmax) against the chunked loss, forward and backward.
3. The held-out evaluation's peak at a 128k vocabulary: 8 windows a forward with fp32 logits
   of the whole batch (the old evaluation, reproduced here) against the evaluation the trainer
   runs (its micro-batch, the chunked loss).
4. The distillation loss's peak at a 128k vocabulary (`--part distill`): both models' logits
   materialised (the old healing loss, reproduced here) against the chunked one, forward and
   backward.
5. A contract job's host peak (`--part contract`): the product's own contract job
   (training_image.jobs.run_contract_job) on a `small` source, on the CPU (so the host is the
   device, in fp32), against the plan's host peak for one rank (shared.memory.contract_host_bytes),
   both with the source's shape standing for the contracted model (as the price is fixed) and
   with the shape the job made.

Peaks are the process's resident-set high-water mark above what it held before the measured
call (Linux: /proc/self/clear_refs resets it), so they count every allocation, torch's or not.

    OMP_NUM_THREADS=2 .venv/bin/python bench/memory.py [--part blocks,loss,eval] [--tokens 1024]
    OMP_NUM_THREADS=2 .venv/bin/python bench/memory.py --part contract   # ~5 CPU minutes, ~3 GiB
"""

from __future__ import annotations

import argparse
import gc
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.memory import GIB, block_activation_bytes, distillation_peak_bytes, logits_peak_bytes
from shared.pricing import LLAMA_SHAPES
from shared.shapes import ModelConfig
from training_image.evaluate import heldout_loss
from training_image.model import (
    Attention,
    Block,
    Decoder,
    apply_rope,
    chunked_cross_entropy,
    chunked_kl_divergence,
    rope_tables,
)

MIB = 1 << 20


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_bytes(fn) -> int:
    """The resident-set peak while fn runs, above the resident set before it."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) * 1024


def _concatenated_qkv(self: Attention, x, cos, sin, cache=None):
    """The old attention: one matmul over the q/k/v weights concatenated on every forward."""
    B, T, _ = x.shape
    H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
    qkv = F.linear(x, torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)))
    qk, v = qkv.split(((H + K) * D, K * D), dim=-1)
    qk = apply_rope(qk.view(B, T, H + K, D).transpose(1, 2), cos, sin)
    q, k = qk.split((H, K), dim=1)
    v = v.view(B, T, K, D).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


def block_saved(config: ModelConfig, tokens: int, concatenated: bool) -> int:
    """Bytes one block (bf16 weights, no autocast) saves for backward at `tokens` tokens,
    parameters and buffers left out. The weights are uninitialised: what is saved does not
    depend on their values."""
    with torch.device("meta"):
        block = Block(config, config.layers[0]).to(torch.bfloat16)
    block.to_empty(device="cpu")  # bf16 from the start: 1.7 GB for a 70B block
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    if concatenated:
        block.attn.forward = _concatenated_qkv.__get__(block.attn)
    cos, sin = rope_tables(config.head_dim, tokens, config.rope_theta)  # the model's buffers
    owned = {t.untyped_storage().data_ptr() for t in [*block.parameters(), cos, sin]}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in owned:
            storages[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randn(1, tokens, config.dim, dtype=torch.bfloat16, requires_grad=True)
    fp32_on_cpu, Attention.fp32_on_cpu = Attention.fp32_on_cpu, False  # attention in bf16, as on a GPU
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x, cos, sin)
    finally:
        Attention.fp32_on_cpu = fp32_on_cpu
    return sum(storages.values())


def part_blocks(tokens: int, shapes: list[str]) -> None:
    print(f"## Bytes a block keeps for backward, bf16 weights, {tokens} tokens (MiB; parameters left out)")
    print("| shape | planned | measured | with q/k/v concatenated |")
    print("|---|---|---|---|")
    for name in shapes:
        config = LLAMA_SHAPES[name]
        planned = tokens * block_activation_bytes(config, config.layers[0], compute_bytes=2)
        measured = block_saved(config, tokens, concatenated=False)
        old = block_saved(config, tokens, concatenated=True)
        print(f"| {name} | {planned / MIB:.1f} | {measured / MIB:.1f} | {old / MIB:.1f} |")
        gc.collect()


def _materialised_loss(hidden, weight, targets):
    """The old loss: the head's logits, an fp32 copy, F.cross_entropy's log-softmax."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def _loss_peaks(cases, start: torch.Tensor, weight: torch.Tensor, *rest: torch.Tensor) -> list[int]:
    """Each (name, loss(hidden, weight, *rest)) case's forward + backward peak from the same
    hidden states, printed as a table row with its loss; the peaks in order."""
    peaks = []
    for name, fn in cases:
        hidden = start.clone().requires_grad_()
        weight.grad = torch.zeros_like(weight)  # the gradient's own storage is not the loss's
        out = {}

        def run():
            loss = fn(hidden, weight, *rest)
            loss.backward()
            out["loss"] = loss.item()

        peaks.append(peak_bytes(run))
        print(f"| {name} | {peaks[-1] / MIB:.0f} | {out['loss']:.6f} |")
    return peaks


def _ratio(before: int, after: int) -> str:
    """before / after, or why not: at toy sizes the chunked peak can read 0 (below what peak_bytes resolves)."""
    return f"{before / after:.1f}x" if after > 0 else "none (the chunked peak is below what is measured)"


def part_loss(tokens: int, dim: int, vocab: int) -> None:
    torch.manual_seed(0)
    weight = (torch.randn(vocab, dim) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    config = ModelConfig.uniform(vocab_size=vocab, dim=dim, n_layers=1, n_heads=1, n_kv_heads=1, mlp_hidden=dim, context_length=tokens)
    print(f"\n## The loss's peak, {tokens} tokens, dim {dim}, vocabulary {vocab:,}, fp32 (MiB above the inputs)")
    print("| loss | forward + backward peak | loss |")
    print("|---|---|---|")
    before, after = _loss_peaks((("logits materialised (before)", _materialised_loss),
                                 ("chunked (after)", chunked_cross_entropy)), torch.randn(tokens, dim), weight, targets)
    print(f"ratio before/after: {_ratio(before, after)}; the plan's loss peak for it (fp32): "
          f"{logits_peak_bytes(config, tokens, compute_bytes=4) / MIB:.0f} MiB (the weight gradient's "
          f"fp32 sum included; here it lands in weight.grad's transient)")


@torch.no_grad()
def _old_heldout(model: Decoder, windows: torch.Tensor, batch_size: int = 8) -> float:
    """The old evaluation: 8 windows a forward, autocast off, fp32 logits of the whole batch."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = model(batch[:, :-1]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


def part_eval(seq_len: int, vocab: int, micro_batch: int) -> None:
    torch.manual_seed(0)
    config = ModelConfig.uniform(vocab_size=vocab, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=704, context_length=seq_len)
    model = Decoder(config).init_weights()
    windows = torch.randint(0, vocab, (16, seq_len + 1))
    print(f"\n## Held-out evaluation's peak, 16 windows of {seq_len}, vocabulary {vocab:,}, fp32 (MiB above the model)")
    print("| evaluation | peak | held-out loss |")
    print("|---|---|---|")
    rows = (("8 windows a forward, whole logits (before)", lambda: _old_heldout(model, windows)),
            (f"micro-batch {micro_batch}, chunked loss (after)", lambda: heldout_loss(model, windows, micro_batch)))
    results = {}
    for name, fn in rows:
        out = {}
        results[name] = peak_bytes(lambda: out.setdefault("loss", fn()))
        print(f"| {name} | {results[name] / MIB:.0f} | {out['loss']:.6f} |")
    before, after = results.values()
    print(f"ratio before/after: {before / after:.1f}x")


def _materialised_distillation(hidden, weight, teacher_hidden, teacher_weight):
    """The old distillation loss: both models' logits whole, fp32 copies, two log-softmaxes."""
    logits = F.linear(hidden, weight)
    with torch.no_grad():
        teacher = F.linear(teacher_hidden, teacher_weight).float()
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), F.log_softmax(teacher, dim=-1), log_target=True,
                    reduction="batchmean")


def part_distill(tokens: int, dim: int, vocab: int) -> None:
    torch.manual_seed(0)
    weight = (torch.randn(vocab, dim) * 0.02).requires_grad_()
    teacher_weight, teacher_hidden = torch.randn(vocab, dim) * 0.02, torch.randn(tokens, dim)
    config = ModelConfig.uniform(vocab_size=vocab, dim=dim, n_layers=1, n_heads=1, n_kv_heads=1, mlp_hidden=dim,
                                 context_length=tokens)
    print(f"\n## The distillation loss's peak, {tokens} tokens, dim {dim}, vocabulary {vocab:,}, fp32 (MiB above the inputs)")
    print("| loss | forward + backward peak | loss |")
    print("|---|---|---|")
    before, after = _loss_peaks((("logits materialised (before)", _materialised_distillation),
                                 ("chunked (after)", chunked_kl_divergence)),
                                torch.randn(tokens, dim), weight, teacher_hidden, teacher_weight)
    print(f"ratio before/after: {_ratio(before, after)}; the plan's distillation peak for it (fp32): "
          f"{distillation_peak_bytes(config, tokens, compute_bytes=4) / MIB:.0f} MiB")


def part_contract(size: str, layers: int, micro_batch: int, corpus_bytes: int) -> None:
    import os
    import tempfile

    from shared.contracts import PRECISION_ENV
    from shared.memory import contract_host_bytes, healing_bytes
    from shared.memory import Layout
    from shared.settings import CONTRACT_SEQ_LEN, ContractSettings
    from shared.shapes import SIZES
    from training_image.data import stdlib_corpus
    from training_image.jobs import run_contract_job
    from training_image.modeldir import save_model_dir
    from training_image.tokenizer import train_tokenizer

    os.environ[PRECISION_ENV] = "fp32"  # the plan below is the fp32 one, whatever the CPU
    source_config = SIZES[size]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "ml"
        corpus = stdlib_corpus(corpus_bytes)
        tokenizer = train_tokenizer(corpus, 2048)  # fewer tokens than the model's vocabulary: allowed
        save_model_dir(root / "input/data/model", Decoder(source_config).init_weights(0), tokenizer)
        (root / "input/data/training").mkdir(parents=True)
        (root / "input/data/training/part.txt").write_text("\n".join(corpus))
        settings = ContractSettings(source_model_id="model-bench", contraction_ratio=0.5,
                                    num_layers_to_contract=layers, train_steps=1)
        layout = Layout(micro_batch=micro_batch)
        metrics = {}

        def run() -> None:
            metrics["m"] = run_contract_job(settings, root, "contract-bench", log=lambda line: None, layout=layout)

        measured = peak_bytes(run)
    student = metrics["m"].config
    print(f"contract job, {size} source ({source_config.parameters():,} parameters -> {student.parameters():,}), "
          f"{layers} layers at 0.5, 1 healing step in micro-batches of {micro_batch}, fp32 on the CPU:")
    for label, shape in (("planned (source shape, as priced)", source_config), ("planned (the shape made)", student)):
        healing = healing_bytes(source_config, shape, seq_len=CONTRACT_SEQ_LEN, micro_batch=micro_batch, strategy="ddp",
                                world_size=1, checkpointing=False, compute_bytes=4)
        planned = contract_host_bytes(source_config, shape, False, chosen_layers=layers, seq_len=CONTRACT_SEQ_LEN,
                                      healing=healing)
        print(f"  {label}: host peak {planned / MIB:.0f} MiB; measured {measured / MIB:.0f} MiB; "
              f"measured / planned {measured / planned:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="blocks,loss,eval")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of the loss measurement")
    parser.add_argument("--block-tokens", type=int, default=256)
    parser.add_argument("--shapes", default="llama-8b,llama-70b", help="block shapes (shared.pricing.LLAMA_SHAPES)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--contract-size", default="small")
    parser.add_argument("--contract-layers", type=int, default=4)
    parser.add_argument("--contract-micro-batch", type=int, default=1)
    parser.add_argument("--corpus-bytes", type=int, default=400_000)
    args = parser.parse_args()
    parts = args.part.split(",")
    if "blocks" in parts:
        part_blocks(args.block_tokens, args.shapes.split(","))
    if "loss" in parts:
        part_loss(args.tokens, args.dim, args.vocab)
    if "eval" in parts:
        part_eval(args.seq_len, args.vocab, args.micro_batch)
    if "distill" in parts:
        part_distill(args.tokens, args.dim, args.vocab)
    if "contract" in parts:
        part_contract(args.contract_size, args.contract_layers, args.contract_micro_batch, args.corpus_bytes)


if __name__ == "__main__":
    main()
