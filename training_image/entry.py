"""`train`: the training container's entry point (docs/architecture.md §7).

SageMaker runs it with the /opt/ml tree in place; FUSION_ML_ROOT relocates that tree so the same
entry point runs anywhere (the local stack, the tests). Its job runner (training_image.jobs) reads
hyperparameters.json with shared.contracts.Hyperparameters (the API's own settings models), then
either grows and trains the base model of the `model` channel on the `training` channel (job_type
"train"), or contracts it (job_type "contract").

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

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from training_image import jobs, runtime, stopping
from training_image.jobs import EXIT_STOPPED
from training_image.stopping import SHUTDOWN_TIMEOUT, TrainingStopped

MASTER_PORT = 29500


def main() -> int:
    root = runtime.ml_root()
    launch = torchrun_command(root)
    if launch is not None:
        return supervise(launch, root)
    stopping.install()
    try:
        return jobs.run(root)
    except TrainingStopped as stop:  # one that landed outside the runner's own handlers
        runtime.log(str(stop))
        return EXIT_STOPPED


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


def torchrun_command(root: Path) -> list[str] | None:
    """The torchrun command that re-launches this entry point over all GPUs and hosts, or None.

    None when already under torchrun, or when there is one process to run (one host, at most
    one GPU). Ranks follow resourceconfig.json: node rank = the current host's index in hosts,
    the first host is the rendezvous master. Sets NCCL's (and gloo's) socket interface to
    resourceconfig.json's network_interface_name for the workers, NCCL's log of its transport,
    and across hosts libfabric's provider to EFA, each unless it is set already.
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
    # NCCL says once, at its first collective (the first step), which transport it chose
    # ("Using network AWS Libfabric" over EFA, "NET/Socket" over TCP).
    os.environ.setdefault("NCCL_DEBUG", "INFO")
    os.environ.setdefault("NCCL_DEBUG_SUBSYS", "INIT,NET")
    if len(hosts) > 1:
        # Across instances (p4d, p5: the instance types that run on more than one) libfabric
        # may use EFA alone: a network without it fails at the first step instead of training
        # over TCP at a fraction of the bandwidth the plan priced.
        os.environ.setdefault("FI_PROVIDER", "efa")
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
