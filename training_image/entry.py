"""`train`: the training container's entry point (docs/architecture.md §7).

SageMaker runs it with the /opt/ml tree in place; FUSION_ML_ROOT relocates that tree so the same
entry point runs anywhere (the local stack, the tests). It reads hyperparameters.json with the
API's own settings models, then either grows and trains the base model of the `model` channel on
the `training` channel (job_type "train"), or contracts it (job_type "contract").

Output: the model directory in model/, metrics.json there and in output/data/, `name=value`
metric lines on stdout, failure text in output/failure with a non-zero exit. Checkpoints go to
checkpoints/ at every cycle's end, every 10 minutes, and every FUSION_CHECKPOINT_EVERY steps when
that is set; SIGTERM finishes the step, writes one and exits with 143 (outside the training loop
it exits with 143 at once); a restart resumes from the last one and ends with the weights an
uninterrupted run would have. A sharded (FSDP) model's checkpoints are torch.distributed.checkpoint
folders (training_image.checkpoint), which resume at another world size too.

With several GPUs or several instances (resourceconfig.json lists the hosts) the entry point
runs torchrun, one process per GPU. How the model spreads over them comes from the memory plan
the launcher passes beside the settings (strategy, micro_batch, activation_checkpointing in
hyperparameters.json): DDP, or FSDP with its sharded checkpoints. The entry point stays
torchrun's parent (PID 1): it passes SIGTERM on, and when a rank dies without a word (the
kernel's out-of-memory killer sends SIGKILL) it writes the failure text no rank could.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from shared.memory import Layout
from shared.shapes import grown_config
from shared.settings import ContractSettings, TrainSettings, from_hyperparameters
from training_image.growth import grow, sources as growth_sources
from training_image.model import Decoder
from training_image.modeldir import load_model_dir, open_model_dir
from training_image import parallel, runtime, stopping
from training_image.stopping import SHUTDOWN_TIMEOUT, TrainingStopped
from training_image.train import Trainer, TrainPlan

MASTER_PORT = 29500
EXIT_STOPPED = 128 + 15


def main() -> int:
    root = runtime.ml_root()
    launch = torchrun_command(root)
    if launch is not None:
        return supervise(launch, root)
    stopping.install()
    try:
        return _run(root)
    except TrainingStopped as stop:  # one that landed outside _run's own handlers
        runtime.log(str(stop))
        return EXIT_STOPPED


def _run(root: Path) -> int:
    try:
        runtime.init_distributed()
        hyperparameters = json.loads((root / "input/config/hyperparameters.json").read_text())
        layout, hyperparameters = Layout.split(hyperparameters)
        job_type, job_id, settings = from_hyperparameters(hyperparameters)
        if job_type == "train":
            run_train_job(settings, root, job_id, layout=layout)
        else:
            run_contract(settings, root, job_id)
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
        if dist.is_initialized():
            dist.destroy_process_group()


class RankDied(RuntimeError):
    """A training process ended with an error it could not report."""


def supervise(command: list[str], root: Path) -> int:
    """Run torchrun as a child; its exit status (EXIT_STOPPED after a SIGTERM).

    SIGTERM is passed on to torchrun, which passes it on to every rank and gives them
    SHUTDOWN_TIMEOUT to checkpoint. A failed run whose ranks wrote no output/failure (killed by a
    signal) gets one here, so that SageMaker's FailureReason says what happened.
    """
    stopped: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum, frame) -> None:
        stopped.append(signum)
        if child is not None:
            child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        child = subprocess.Popen(command)
        if stopped:
            child.send_signal(signal.SIGTERM)
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        return EXIT_STOPPED
    if code != 0 and not (root / "output/failure").exists():
        runtime.write_failure(root, RankDied(
            f"a training process ended without reporting an error (torchrun exited with {code}); "
            "a rank killed by signal 9 has most often run out of host memory"
        ))
    return code


def run_contract(settings: ContractSettings, root: Path, job_id: str) -> None:
    try:
        from training_image.contract import run_contract_job
    except ImportError as error:
        if error.name != "training_image.contract":
            raise
        raise RuntimeError("this training image cannot contract models: training_image.contract is missing") from None
    run_contract_job(settings, root, job_id)


def run_train_job(settings: TrainSettings, root: Path, job_id: str, log=None, layout: Layout | None = None) -> dict:
    """Grow the base model, train it in turns of cycles, write model/ and metrics.json; the metrics."""
    log = log or runtime.log
    layout = layout or Layout()
    started = time.monotonic()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    base_config, tokenizer, model, materialize = grown_model(root / "input/data/model", layout, world_size)
    config = model.config
    if settings.seq_len > base_config.context_length:
        raise ValueError(f"seq_len={settings.seq_len} exceeds the base model's context length {base_config.context_length}")
    if tokenizer.get_vocab_size() > base_config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model only {base_config.vocab_size}")
    data = runtime.prepare_tokens(root, tokenizer, settings.seq_len)
    train_windows, heldout_windows = data.train_windows(), data.heldout_windows()
    device = runtime.device()
    model.train()
    plan = TrainPlan(
        turns=settings.turns,
        cycle_steps=settings.cycle_steps(),
        lr=settings.lr,
        seq_len=settings.seq_len,
        batch_size=runtime.batch_size(config.parameters()),
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
        device=device,
        log=log if runtime.rank() == 0 else None,
        materialize=materialize,
    )
    log(
        f"training {config.parameters():,} parameters ({base_config.n_layers} -> {config.n_layers} blocks) "
        f"on {len(train_windows)} windows of {settings.seq_len} tokens, {plan.batch_size} per step, "
        f"{plan.total_steps} steps; {layout.strategy} over {trainer.world_size} ranks, micro-batches of "
        f"{trainer.micro_batch}{', recomputing activations' if layout.activation_checkpointing else ''}"
    )
    trainer.resume()
    setup_seconds = time.monotonic() - started
    with trainer.stop_on_sigterm():
        state = trainer.run()
    final = state.cycles[-1]["perplexity"] if state.cycles else None
    metrics = {
        "job_id": job_id,
        "job_type": "train",
        "config": config.model_dump(),
        "parameters_before": base_config.parameters(),
        "parameters_after": config.parameters(),
        "depth_before": base_config.n_layers,
        "depth_after": config.n_layers,
        "training_tokens": state.step * plan.seq_len,
        "tokens_processed": state.tokens_seen,
        "tokens_per_second": round(trainer.tokens_per_second(), 1),
        "wall_time_s": round(setup_seconds + state.wall_seconds, 2),
        "sequences_per_step": plan.batch_size,
        "cycles": state.cycles,
        "final_perplexity": final,
    }
    whole = parallel.full_model(model)  # every rank takes part in gathering the shards
    if runtime.rank() == 0:
        runtime.write_outputs(root, whole, tokenizer, metrics)
    return metrics


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


def torchrun_command(root: Path) -> list[str] | None:
    """The torchrun command that re-launches this entry point over all GPUs and hosts, or None.

    None when already under torchrun, or when there is one process to run (one host, at most
    one GPU). Ranks follow resourceconfig.json: node rank = the current host's index in hosts,
    the first host is the rendezvous master. Sets NCCL's (and gloo's) socket interface to
    resourceconfig.json's network_interface_name for the workers, unless it is set already.
    """
    if "LOCAL_RANK" in os.environ:
        return None
    hosts, current = ["localhost"], "localhost"
    resources = root / "input/config/resourceconfig.json"
    if resources.is_file():
        config = json.loads(resources.read_text())
        hosts, current = config["hosts"], config["current_host"]
        if config.get("network_interface_name"):
            for variable in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
                os.environ.setdefault(variable, config["network_interface_name"])
    gpus = torch.cuda.device_count()
    if len(hosts) == 1 and gpus <= 1:
        return None
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={len(hosts)}",
        f"--node_rank={hosts.index(current)}",
        f"--nproc_per_node={max(1, gpus)}",
        f"--master_addr={hosts[0]}",
        f"--master_port={MASTER_PORT}",
        # Workers get SIGTERM and then SIGKILL this much later (torchrun's default is 30 s): time
        # for rank 0 to finish its step and write the checkpoint within SageMaker's grace.
        f"--shutdown-timeout={SHUTDOWN_TIMEOUT}",
        "-m",
        "training_image.entry",
    ]


if __name__ == "__main__":
    sys.exit(main())
