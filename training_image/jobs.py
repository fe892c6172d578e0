"""The container's jobs: read hyperparameters.json, run a train, contract or evaluate job, write its
outputs, and turn every failure into SageMaker's failure text (docs/architecture.md §7).

The algorithms live beside it: growth and training in training_image.growth and .train,
contraction in training_image.contract, evaluation in training_image.evaluation; this module is
what the job types share around them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from shared.contracts import ContractMetrics, Hyperparameters, Metrics, TrainMetrics
from shared.memory import Layout
from shared.settings import (
    CONTRACT_CALIBRATION_WINDOWS,
    CONTRACT_HELDOUT_WINDOWS,
    CONTRACT_SEQ_LEN,
    ContractSettings,
    TrainSettings,
)
from shared.shapes import ModelConfig, grown_config
from shared.training_jobs import VALIDATION_CHANNEL
from training_image import parallel, runtime, stopping
from training_image.contract import (
    HEAL_LR,
    Distillation,
    StreamedSource,
    block_influence,
    choose_blocks,
    contract_streamed,
    student_sources,
)
from training_image.evaluate import DEFAULT_EVAL_BATCH, heldout_loss
from training_image.evaluation import held_out, run_evaluate_job
from training_image.growth import grow, sources as growth_sources
from training_image.model import Decoder
from training_image.precision import computes_in_bf16, precision_setting
from training_image.modeldir import archive_of, load_model_dir, open_model_dir, unpack
from training_image.stopping import TrainingStopped
from training_image.train import Trainer, TrainPlan

EXIT_STOPPED = 128 + 15


def run(root: Path) -> int:
    """Run the job hyperparameters.json describes; the process's exit status."""
    completed = False
    try:
        precision_setting()  # a bad FUSION_PRECISION fails the job before any work, naming itself
        runtime.init_distributed()
        job = Hyperparameters.parse(json.loads((root / "input/config/hyperparameters.json").read_text()))
        if job.job_type == "train":
            run_train_job(job.run_settings(), root, job.job_id, layout=job.layout)
        elif job.job_type == "evaluate":
            run_evaluate_job(job.settings, root, job.job_id)
        else:
            run_contract_job(job.settings, root, job.job_id, layout=job.layout)
        completed = True
        return 0
    except TrainingStopped as stop:
        runtime.log(str(stop))
        return EXIT_STOPPED
    except Exception as error:  # the one place every failure becomes SageMaker's failure text
        traceback.print_exc()
        if stopping.requested():
            # Stopping ranks leave their collectives: what that breaks in this one is no failure.
            runtime.log(f"stopped by SIGTERM ({type(error).__name__}: {error})")
            return EXIT_STOPPED
        runtime.write_failure(root, error)
        return 1
    finally:
        parallel.leave(completed)


def run_train_job(settings: TrainSettings, root: Path, job_id: str, log=None, layout: Layout | None = None) -> TrainMetrics:
    """Grow the base model, train it in turns of cycles, write model/ and metrics.json; the metrics."""
    log = log or runtime.log
    layout = layout or Layout()
    started = time.monotonic()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    base_config, tokenizer, model, materialize = grown_model(model_source(root), layout, world_size)
    config = model.config
    if settings.seq_len > base_config.context_length:
        raise ValueError(f"seq_len={settings.seq_len} exceeds the base model's context length {base_config.context_length}")
    if tokenizer.get_vocab_size() > base_config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model only {base_config.vocab_size}")
    validation = runtime.has_channel(root, VALIDATION_CHANNEL)
    data = runtime.prepare_tokens(root, tokenizer, settings.seq_len, hold_out=not validation)
    train_windows, heldout_windows, held = data.train_windows(), data.heldout_windows(), data
    if validation:  # the user's validation set, of the same kind as the training data
        held = runtime.prepare_tokens(root, tokenizer, settings.seq_len, VALIDATION_CHANNEL, hold_out=False)
        if held.kind != data.kind:
            raise ValueError(f"the validation set is {held.kind} and the training data {data.kind}: give one kind")
        heldout_windows = held.sample_windows()
    heldout = held_out(heldout_windows, "validation" if validation else "split", held)
    if data.chat is not None:
        log(f"conversations: {data.chat['examples']} examples, {data.chat['examples_cut']} cut to {settings.seq_len + 1} "
            f"tokens, {data.chat['assistant_tokens']} of {data.chat['tokens']} tokens the assistant's, "
            f"{data.chat['padding_tokens']} padding")
    device = runtime.device()
    model.train()
    plan = TrainPlan(
        turns=settings.turns,
        cycle_steps=settings.cycle_steps(),
        lr=settings.lr,
        seq_len=settings.seq_len,
        batch_size=runtime.batch_size(config.parameters(), settings.seq_len),
    )
    trainer = Trainer(
        model,
        train_windows,
        heldout_windows,
        plan,
        job_id=job_id,
        job_type="train",
        checkpoint_dir=root / "checkpoints",
        checkpoint_every=int(os.environ.get("FUSION_CHECKPOINT_EVERY", "0")),
        micro_batch=layout.micro_batch,
        strategy=layout.strategy,
        activation_checkpointing=layout.activation_checkpointing,
        defer_gradient_sync=layout.defer_gradient_sync,
        device=device,
        log=log if runtime.rank() == 0 else None,
        materialize=materialize,
    )
    log(
        f"training {config.parameters():,} parameters ({base_config.n_layers} -> {config.n_layers} blocks) "
        f"on {len(train_windows)} windows of {settings.seq_len} tokens, {plan.batch_size} per step, "
        f"{plan.total_steps} steps; {layout.strategy} over {trainer.world_size} ranks, micro-batches of "
        f"{trainer.micro_batch}{', recomputing activations' if layout.activation_checkpointing else ''}; "
        f"computing in {trainer.precision}"
    )
    trainer.resume()
    setup_seconds = time.monotonic() - started
    with trainer.stop_on_sigterm():
        state = trainer.run()
    metrics = TrainMetrics(
        job_id=job_id,
        job_type="train",
        **_sizes(base_config, config),
        training_tokens=state.step * plan.seq_len,
        tokens_processed=state.tokens_seen,
        tokens_per_second=round(trainer.tokens_per_second(), 1),
        wall_time_s=round(setup_seconds + state.wall_seconds, 2),
        sequences_per_step=plan.batch_size,
        precision=trainer.precision,
        cycles=state.cycles,
        final_perplexity=state.cycles[-1]["perplexity"] if state.cycles else None,
        heldout=heldout,
    )
    _write_outputs(root, model, tokenizer, metrics)
    return metrics


def run_contract_job(settings: ContractSettings, root: Path, job_id: str,
                     log: Callable[[str], None] | None = None, layout: Layout | None = None) -> ContractMetrics:
    """Contract the model of the `model` channel on the `training` channel's text; write model/ and metrics.

    As the memory plan counts it (shared.memory.plan_contract), no rank holds the whole source
    to choose and cut: the source is read from its files one block at a time
    (contract.StreamedSource), the calibration windows streamed through each block in turn, and
    the chosen blocks cut one at a time. The contracted model (the student) is then made on the
    meta device and each rank reads its own part of it (its shard, or under DDP all of it) from
    the source's files and the cut blocks; the source, read the same way in the precision
    healing computes in, is its frozen teacher, sharded like the student when the layout shards
    it. The student heals as the layout says: replicated (DDP) or sharded (FSDP2), its
    micro-batch, its activations recomputed or not."""
    # Metric lines from rank 0 only: SageMaker would count every rank's.
    log = log or (runtime.log if runtime.rank() == 0 else lambda line: None)
    layout = layout or Layout()
    started = time.monotonic()
    source_config, tokenizer, files, names = open_model_dir(model_source(root))
    n_layers = settings.num_layers_to_contract
    if n_layers > source_config.n_layers:
        raise ValueError(
            f"num_layers_to_contract={n_layers} exceeds the source model's depth {source_config.n_layers}"
        )
    seq_len = min(CONTRACT_SEQ_LEN, source_config.context_length)
    data = runtime.prepare_tokens(root, tokenizer, seq_len)
    train_windows, heldout_windows = data.train_windows(), data.heldout_windows()[:CONTRACT_HELDOUT_WINDOWS]
    calibration = train_windows.sample(CONTRACT_CALIBRATION_WINDOWS)
    device = runtime.device()
    source = StreamedSource(source_config, files, names, device)

    before = _report(log, "source", source_config.parameters(), source.heldout_loss(heldout_windows))
    influence = block_influence(source, calibration)
    chosen = choose_blocks(influence, n_layers, source_config.ids())
    log("block influence: " + " ".join(f"{b}={influence[b]:.4f}" for b in source_config.ids()))
    log(f"contracting blocks {chosen} by {settings.contraction_ratio:g}")
    config, cut = contract_streamed(source, calibration, settings.contraction_ratio, chosen)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    sharded = parallel.shards(layout.strategy, world_size)
    bf16 = computes_in_bf16(device)
    with torch.device("meta"):
        model = Decoder(config)
    materialize = functools.partial(parallel.load_shards, files=files, sources=student_sources(source, config, cut))

    healed, kept, cycles, tokens_processed, tokens_per_second = None, None, [], 0, 0.0
    precision = "bf16" if bf16 else "fp32"  # the healing's (the rest is fp32 forward passes)
    if settings.train_steps > 0:
        # The teacher: forward passes only, in the precision healing computes in, sharded with the student.
        teacher = parallel.frozen_model(
            source_config, device, functools.partial(parallel.load_shards, files=files, sources=source.source_names()),
            dtype=torch.bfloat16 if bf16 else torch.float32, sharded=sharded)
        trainer = _healer(model, teacher, config, train_windows, heldout_windows, settings.train_steps, seq_len, root,
                          job_id, log, layout, device, materialize)
    else:
        parallel.wrap(model, strategy=layout.strategy, activation_checkpointing=False, world_size=world_size,
                      device=device, materialize=materialize, bf16=bf16)
    del cut, materialize  # the contracted blocks now live in the student
    # Within the plan: the held-out passes run at the healing's micro-batch (the logits of a
    # chunk of that many windows), not at a batch of their own beside the optimizer's state.
    eval_batch = trainer.micro_batch if settings.train_steps > 0 else (layout.micro_batch or DEFAULT_EVAL_BATCH)
    pruned = _measure(log, "pruned", model, heldout_windows, eval_batch)
    if settings.train_steps > 0:
        # Healing with few tokens can do more harm than the pruning did (its noise outweighs a
        # small loss of fit); the pruned weights are delivered then. They are the same on a
        # rerun, so a resumed job makes the same choice. This rank's part, kept on the host.
        pruned_weights = _host_copy(model)
        trainer.resume()
        with trainer.stop_on_sigterm():
            state = trainer.run()
        cycles, tokens_processed, tokens_per_second = state.cycles, state.tokens_seen, trainer.tokens_per_second()
        precision = trainer.precision
        healed = _measure(log, "healed", model, heldout_windows, eval_batch)
        kept = healed <= pruned
        if not kept:
            log(f"healing raised held-out perplexity from {pruned:.3f} to {healed:.3f}: delivering the pruned weights")
            _restore(model, pruned_weights)
        del pruned_weights

    metrics = ContractMetrics(
        job_id=job_id,
        job_type="contract",
        **_sizes(source_config, config),
        training_tokens=settings.training_tokens(),
        tokens_processed=tokens_processed,
        tokens_per_second=round(tokens_per_second, 1),
        wall_time_s=round(time.monotonic() - started, 2),
        cycles=cycles,
        final_perplexity=healed if kept else pruned,
        heldout=held_out(heldout_windows, "split", data),
        layers_contracted=chosen,
        contraction_ratio=settings.contraction_ratio,
        block_influence=influence,
        perplexity_before=before,
        perplexity_after_pruning=pruned,
        perplexity_after_healing=healed,
        healing_kept=kept,
        precision=precision,
    )
    _write_outputs(root, model, tokenizer, metrics)
    return metrics


INPUT_MODEL = "input/data/model"  # the `model` channel: a model directory (a job's uncompressed output) or a model.tar.gz


UNPACKED_MODEL = "model-source"  # where a node extracts a model.tar.gz given as the channel, once


def model_source(root: Path) -> Path:
    """The `model` channel as a folder every rank reads: the channel itself, or where it holds a
    model.tar.gz, that archive extracted once per node (its first rank extracts, all wait)."""
    channel = root / INPUT_MODEL
    archive = archive_of(channel)
    if archive is None:
        return channel
    into = root / UNPACKED_MODEL
    if runtime.local_share()[0] == 0:
        unpack(archive, into)
    runtime.wait_for_all()
    return into


def grown_model(source: Path, layout: Layout, world_size: int):
    """(base config, tokenizer, grown model, materialize) for the trainer.

    Growth comes before the model is spread over the ranks. Where the layout shards it, no rank
    builds it: the grown model is made on the meta device and, once sharded, each rank reads its
    own rows of every grown tensor from the base's files (growth is a fixed mapping of the base's
    tensors, the same on every rank), so no rank ever holds the whole model, base or grown.
    Otherwise the base is loaded and grown on the CPU (materialize is None)."""
    if parallel.shards(layout.strategy, world_size):
        base_config, tokenizer, files, names = open_model_dir(source)
        with torch.device("meta"):
            model = Decoder(grown_config(base_config))
        sources = {name: names[base] if base is not None else None for name, base in growth_sources(base_config).items()}
        return base_config, tokenizer, model, functools.partial(parallel.load_shards, files=files, sources=sources)
    base, tokenizer = load_model_dir(source)
    model, _ = grow(base, base.config)
    return base.config, tokenizer, model, None


def _sizes(before: ModelConfig, after: ModelConfig) -> dict:
    """The metrics both job types report about the model they started from and the one they made."""
    return {"config": after, "parameters_before": before.parameters(), "parameters_after": after.parameters(),
            "depth_before": before.n_layers, "depth_after": after.n_layers}


def _write_outputs(root: Path, model: Decoder, tokenizer, metrics: Metrics) -> None:
    """model/ and metrics.json, from rank 0; every rank takes part in gathering a sharded model."""
    whole = parallel.full_model(model)
    if runtime.rank() == 0:
        runtime.write_outputs(root, whole, tokenizer, metrics)


def _measure(log: Callable[[str], None], stage: str, model: Decoder, heldout_windows: torch.Tensor,
             batch_size: int) -> float:
    return _report(log, stage, model.parameter_count(),
                   heldout_loss(model, heldout_windows, batch_size, across_ranks=True))


def _report(log: Callable[[str], None], stage: str, parameters: int, loss: float) -> float:
    log(f"contract_stage={stage} parameters={parameters} heldout_loss={loss:.4f} heldout_perplexity={math.exp(loss):.3f}")
    return math.exp(loss)


def _healer(model, teacher, config, train_windows, heldout_windows, steps, seq_len, root, job_id, log,
            layout: Layout, device: torch.device, materialize: parallel.Materialize) -> Trainer:
    plan = TrainPlan(turns=1, cycle_steps=[steps], lr=HEAL_LR, seq_len=seq_len,
                     batch_size=runtime.batch_size(config.parameters(), seq_len, healing_windows=len(train_windows)))
    model.train()
    return Trainer(
        Distillation(model, teacher),
        train_windows,
        heldout_windows,
        plan,
        job_id=job_id,
        job_type="contract",
        checkpoint_dir=root / "checkpoints",
        progress_every=max(1, min(10, steps // 10)),
        micro_batch=layout.micro_batch,
        strategy=layout.strategy,
        activation_checkpointing=layout.activation_checkpointing,
        device=device,
        log=log if runtime.rank() == 0 else None,
        materialize=materialize,
    )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _host_copy(model: Decoder) -> dict[str, torch.Tensor]:
    """This rank's part of `model`'s weights, copied to the host: its shards where the model is
    sharded, else the whole (never a second copy on the GPU)."""
    parallel.reshard(model)
    return {name: _local(p).detach().to("cpu", copy=True) for name, p in model.named_parameters()}


@torch.no_grad()
def _restore(model: Decoder, weights: dict[str, torch.Tensor]) -> None:
    """The weights _host_copy kept, back into `model` in place (into the shards, which are what
    is trained and gathered for delivery)."""
    parallel.reshard(model)
    for name, p in model.named_parameters():
        _local(p).copy_(weights[name])
