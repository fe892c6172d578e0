"""Training: turns of cycles of optimizer steps (docs/architecture.md §3), resumable to the very same weights.

A turn is a list of cycles; a cycle is a run of AdamW steps under one learning-rate cycle (a
short linear warm-up, then cosine decay to a tenth of the peak). Turn k+1 keeps the weights and
the optimizer state of turn k and reads the data in a fresh order.

Everything a restart needs is a pure function of what the checkpoint holds: the batch of step s
of turn t is drawn from a permutation seeded by (seed, turn, epoch), and the learning rate is a
function of the position in the cycle. So a run killed at any point and resumed from its last
checkpoint ends with exactly the weights of an uninterrupted run.

Under DDP or FSDP (training_image.parallel) every rank reads its slice of the same global batch,
so N processes compute the same update as one process with the whole batch. A sharded model
checkpoints with torch.distributed.checkpoint (training_image.checkpoint), which a run at another
world size can resume from.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable

import torch
import torch.distributed as dist
from torch import nn

from shared.contracts import LOG_RECORD, Progress
from shared.memory import Strategy
from shared.shapes import batch_size_for  # noqa: F401  (the trainer's batch rule; re-exported)
from training_image import checkpoint as distributed_checkpoint, parallel
from training_image.data import split_windows
from training_image.evaluate import heldout_loss
from training_image.model import Decoder
from training_image.precision import autocast_dtype, computes_in_bf16  # noqa: F401  (autocast_dtype: re-exported)
from training_image import stopping
from training_image.stopping import TrainingStopped  # noqa: F401  (raised by run(); re-exported)

CHECKPOINT = "checkpoint.pt"
PROGRESS = "progress.json"
METRICS_LOG = "metrics.jsonl"  # beside progress.json: one line per logged step and per held-out evaluation
CHECKPOINT_FORMAT = 1
MIN_LR_RATIO = 0.1
GRAD_CLIP = 1.0
ADAM_BETAS = (0.9, 0.95)
# Twice the averaging horizon 1 / (1 - beta2) of Adam's second moment: the warm-up Ma & Yarats
# ("On the adequacy of untuned warmup for adaptive optimization") found as good as a tuned one.
WARMUP_STEPS = round(2 / (1 - ADAM_BETAS[1]))


class TrainingDiverged(RuntimeError):
    """The loss or the gradient stopped being a finite number."""


def warmup_steps(cycle_len: int) -> int:
    """Steps of a cycle's linear warm-up: WARMUP_STEPS, or a quarter of a shorter cycle.

    The warm-up is as long as AdamW needs rather than a share of the cycle: until its
    second-moment estimate has averaged over a few 1/(1 - beta2) steps, the size of an update is
    noise, and a cycle that reached its peak rate sooner (a twentieth of a 150-step cycle is 7
    steps) threw the weights onto a plateau it took most of the cycle to leave. A short cycle keeps
    three quarters of its steps for the decay.
    """
    return max(1, min(WARMUP_STEPS, cycle_len // 4))


def lr_at(cycle_step: int, cycle_len: int, peak: float, step: int | None = None, total_steps: int | None = None) -> float:
    """Learning rate of the step at position cycle_step (0-based) of a cycle: a linear ramp to the
    peak, then cosine decay that reaches MIN_LR_RATIO x peak on the cycle's last step.

    Given the step's place in the whole run (step, 0-based, of total_steps), the ramp is also
    held under the run's own warm-up, warmup_steps(total_steps): what AdamW needs counts from its
    first step, not from a cycle's. Cycles shorter than that would otherwise each reach the peak
    within a few steps of a fresh optimizer (six cycles of 25 steps: a 6-step ramp), the plateau
    the warm-up exists to avoid; later cycles restart from an optimizer that has seen the data
    and keep their own short ramp.
    """
    warmup = warmup_steps(cycle_len)
    ramp = min(1.0, (cycle_step + 1) / warmup)
    if step is not None and total_steps is not None:
        ramp = min(ramp, (step + 1) / warmup_steps(total_steps))
    progress = max(0, cycle_step + 1 - warmup) / max(1, cycle_len - warmup)
    return peak * ramp * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class TrainPlan:
    turns: int
    cycle_steps: list[int]
    lr: float
    seq_len: int
    batch_size: int  # sequences per optimizer step, over all ranks
    seed: int = 0

    @property
    def steps_per_turn(self) -> int:
        return sum(self.cycle_steps)

    @property
    def total_steps(self) -> int:
        return self.turns * self.steps_per_turn


@dataclass
class TrainerState:
    """Where the job is. This (with weights and optimizer state) is what a checkpoint saves."""

    turn: int = 0  # 0-based turn in progress (== turns when done)
    cycle: int = 0  # 0-based cycle in progress within the turn
    cycle_step: int = 0  # steps done in the cycle in progress
    step: int = 0  # steps done in the whole job
    tokens_seen: int = 0  # real tokens through the model, all ranks
    train_seconds: float = 0.0  # time in optimizer steps (throughput)
    wall_seconds: float = 0.0  # time in run(), evaluation and checkpoints included, over restarts
    cycle_loss_sum: float = 0.0
    cycles: list[dict] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        model: Decoder,
        train_windows: torch.Tensor,
        heldout_windows: torch.Tensor | None,
        plan: TrainPlan,
        *,
        job_id: str = "local",
        job_type: str = "train",
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 0,
        checkpoint_interval_s: float | None = None,
        progress_every: int = 10,
        micro_batch: int | None = None,
        strategy: Strategy = "ddp",
        activation_checkpointing: bool = False,
        defer_gradient_sync: bool = False,
        device: torch.device | None = None,
        autocast: bool | None = None,
        log: Callable[[str], None] | None = print,
        materialize: parallel.Materialize | None = None,
        compile: bool | None = None,
    ):
        """`autocast`: compute in bf16 (True) or fp32 (False); by default as computes_in_bf16()
        says (the job's precision setting on this hardware). A replicated model autocasts its
        matmuls; a sharded one gathers its weights in bf16 (parallel.mixed_precision). Norms,
        rotary angles and the loss stay fp32 either way.
        `materialize`: `model` is on the meta device, and this fills its parameters once they are
        laid out on the ranks (parallel.wrap).
        `compile`: each block compiled (parallel.compile_blocks); by default on a GPU, where the
        compilation's minutes pay for themselves, not on a CPU.
        `checkpoint_interval_s`: seconds between periodic saves; by default scaled to what a
        save writes (checkpoint.interval_seconds).
        `defer_gradient_sync`: a sharded model synchronises its gradients on a step's last
        micro-batch only, as a replicated one always does (parallel.accumulating)."""
        if train_windows.shape[1] != plan.seq_len + 1:
            raise ValueError(f"windows hold {train_windows.shape[1]} tokens, expected seq_len+1={plan.seq_len + 1}")
        self.model = model
        self.train_windows = train_windows
        self.heldout_windows = heldout_windows
        self.plan = plan
        self.job_id, self.job_type = job_id, job_type
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.checkpoint_every = checkpoint_every
        self.progress_every = progress_every
        self.log = log or (lambda line: None)
        self.state = TrainerState()
        self.losses: list[float] = []
        self.stop_requested = False  # this process got SIGTERM (set by the handler, at any time)
        self.stop_agreed = False  # some rank had stop_requested at the last step's exchange
        self.checkpoint_due = False  # some rank's checkpoint interval had passed at that exchange

        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        if plan.batch_size % self.world_size:
            raise ValueError(f"batch of {plan.batch_size} sequences does not split over {self.world_size} ranks")
        self.rank_batch = plan.batch_size // self.world_size
        self.micro_batch = _largest_divisor_at_most(self.rank_batch, micro_batch or self.rank_batch)
        self.device = device or next(model.parameters()).device
        if self.device.type == "meta":
            raise ValueError("a model on the meta device trains on the device given as device=")
        self.bf16 = computes_in_bf16(self.device) if autocast is None else autocast
        self.network: nn.Module = parallel.wrap(
            model, strategy=strategy, activation_checkpointing=activation_checkpointing,
            world_size=self.world_size, device=self.device, materialize=materialize, bf16=self.bf16,
            compile=self.device.type == "cuda" if compile is None else compile,
        )
        self.sharded = parallel.is_sharded(self.network)
        local_world = min(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), self.world_size)  # ranks on this node
        self.checkpoint_bytes = distributed_checkpoint.bytes_per_node(
            sum(p.numel() for p in model.parameters() if p.requires_grad), self.world_size, local_world, self.sharded)
        self.checkpoint_interval_s = (distributed_checkpoint.interval_seconds(self.checkpoint_bytes)
                                      if checkpoint_interval_s is None else checkpoint_interval_s)
        self._pending_save: distributed_checkpoint.Pending | None = None
        self.defer_gradient_sync = defer_gradient_sync
        self.sharded_checkpoints = self.sharded  # also once resumed from one (another world size)
        # FSDP's policy computes in bf16 already (its weights arrive in bf16): autocast would only add casts.
        self.autocast = self.bf16 and not self.sharded
        self.optimizer = _adamw(model, plan.lr)
        self._orders: dict[tuple[int, int], torch.Tensor] = {}
        self._prefetched: dict[tuple[int, int], tuple] | None = None  # the next step's batch, read ahead

    # ---- data order -------------------------------------------------------------------------

    def batch_indices(self, turn: int, turn_step: int) -> torch.Tensor:
        """Window indices of this rank's share of the global batch of step turn_step of a turn."""
        n = len(self.train_windows)
        start = turn_step * self.plan.batch_size + self.rank * self.rank_batch
        positions = torch.arange(start, start + self.rank_batch)
        return torch.stack([self._order(turn, int(p) // n)[int(p) % n] for p in positions])

    def _order(self, turn: int, epoch: int) -> torch.Tensor:
        key = (turn, epoch)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] == turn and k[1] >= epoch - 1}
            generator = torch.Generator().manual_seed(self.plan.seed * 1_000_003 + turn * 7919 + epoch)
            # int32 where it fits: 4 bytes a window, for the two epochs a batch can straddle.
            n = len(self.train_windows)
            dtype = torch.int32 if n < 2**31 else torch.int64
            self._orders[key] = torch.randperm(n, generator=generator, dtype=dtype)
        return self._orders[key]

    # ---- the loop ---------------------------------------------------------------------------

    def run(self, max_steps: int | None = None) -> TrainerState:
        """Train to the end of the plan, or for at most max_steps more steps (a later run() goes on
        from there, as a resumed run would)."""
        plan, state = self.plan, self.state
        self._started = time.monotonic()
        self._wall_at_start = state.wall_seconds
        self._steps_at_start = state.step
        self._last_checkpoint = self._started
        last_step = plan.total_steps if max_steps is None else state.step + max_steps
        while state.turn < plan.turns:
            cycle_len = plan.cycle_steps[state.cycle]
            while state.cycle_step < cycle_len:
                if state.step >= last_step:
                    self.finish_checkpoint()
                    self._update_wall_time()
                    return state
                self._step(cycle_len)
                # One process acts on its own flag at once; ranks act on the exchanged flag, so
                # that all of them stop after the same step.
                if self.stop_agreed or (self.world_size == 1 and self.stop_requested):
                    written = self.save_checkpoint(stopping=True)
                    raise TrainingStopped(f"stopped at step {state.step}; "
                                          + ("checkpoint written" if written else "resumes from the last checkpoint"))
                # Agreed in the step's exchange: a save is collective, and every rank decides alike.
                if (self.checkpoint_every and state.step % self.checkpoint_every == 0) or self.checkpoint_due:
                    self.save_checkpoint(background=True)
            self._end_cycle(cycle_len)
        self.finish_checkpoint()
        self._update_wall_time()
        return state

    def _update_wall_time(self) -> None:
        if hasattr(self, "_started"):
            self.state.wall_seconds = self._wall_at_start + time.monotonic() - self._started

    def _step(self, cycle_len: int) -> None:
        plan, state = self.plan, self.state
        step_started = time.monotonic()
        turn_step = sum(plan.cycle_steps[: state.cycle]) + state.cycle_step
        lr = lr_at(state.cycle_step, cycle_len, plan.lr, state.step, plan.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self._prefetched.pop((state.turn, turn_step), None) if self._prefetched else None
        self._prefetched = None
        inputs, targets, starts = batch or self._load_batch(state.turn, turn_step)
        micro_batches = list(zip(inputs.split(self.micro_batch), targets.split(self.micro_batch),
                                 starts.split(self.micro_batch) if starts is not None else itertools.repeat(None)))
        loss_sum = torch.zeros((), device=self.device)
        for i, (micro_inputs, micro_targets, micro_starts) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with parallel.accumulating(self.network, last, self.defer_gradient_sync), torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.autocast
            ):
                packed = {} if micro_starts is None else {"starts": micro_starts}
                loss = self.network(micro_inputs, micro_targets, **packed)
                (loss / len(micro_batches)).backward()
            loss_sum += loss.detach().float()
        grad_norm = parallel.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        # One exchange carries the loss, the stop flag and the checkpoint-due flag, so all ranks
        # fail, stop or save at the same step, with no collective of their own. The flags are
        # sampled here; a SIGTERM after this point stays in stop_requested for the next exchange.
        # torch.full fills on the device, without a host-to-device copy.
        due = time.monotonic() - self._last_checkpoint > self.checkpoint_interval_s
        flags = torch.full((2,), 0.0, device=self.device)
        if self.stop_requested or due:
            flags = torch.tensor([float(self.stop_requested), float(due)], device=self.device)
        shared = torch.cat([(loss_sum / len(micro_batches)).reshape(1), flags])
        self._exchange(shared)
        # The next step's batch is read while the device still runs this one (the wait is below).
        self._prefetch_next(state.turn, turn_step)
        # The step's one wait for the device: loss, flags and gradient norm come back together.
        loss_value, stop, due_anywhere, norm = torch.cat((shared, grad_norm.reshape(1).to(shared.dtype))).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"training diverged: loss={loss_value} gradient norm={norm} at step {state.step + 1} "
                f"(turn {state.turn + 1}, cycle {state.cycle + 1}, lr={lr:.3g}); try a lower lr"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.stop_agreed = stop > 0
        self.checkpoint_due = due_anywhere > 0
        state.cycle_step += 1
        state.step += 1
        state.tokens_seen += plan.batch_size * plan.seq_len
        state.cycle_loss_sum += loss_value
        state.train_seconds += time.monotonic() - step_started
        self.losses.append(loss_value)
        if state.step % self.progress_every == 0 or state.cycle_step == cycle_len:
            self.log(
                f"step={state.step} turn={state.turn + 1} cycle={state.cycle + 1} train_loss={loss_value:.4f} "
                f"lr={lr:.3g} tokens_per_second={self.tokens_per_second():.1f}"
            )
            self.write_progress(loss=loss_value)
            self.log_metrics({"kind": "step", "step": state.step, "turn": state.turn + 1, "cycle": state.cycle + 1,
                              "loss": loss_value, "lr": lr})

    def _load_batch(self, turn: int, turn_step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This rank's inputs, targets (IGNORE_INDEX where no loss is taken) and, for packed
        conversations, where each begins, on the device: taken apart on the host, then copied."""
        parts = split_windows(self.train_windows[self.batch_indices(turn, turn_step)])
        if self.device.type == "cuda":  # from pinned memory the copy runs without the host waiting
            parts = tuple(part.pin_memory() if part is not None else None for part in parts)
        inputs, targets, starts = (part.to(self.device, non_blocking=True) if part is not None else None for part in parts)
        return inputs, targets, starts

    def _prefetch_next(self, turn: int, turn_step: int) -> None:
        """Load the batch of the step after (turn, turn_step), if the plan has one. The host
        gathers, splits and pins it while the device works through the step queued before it."""
        turn_step += 1
        if turn_step == self.plan.steps_per_turn:
            turn, turn_step = turn + 1, 0
        if turn < self.plan.turns:
            self._prefetched = {(turn, turn_step): self._load_batch(turn, turn_step)}

    def _exchange(self, shared: torch.Tensor) -> None:
        """[mean loss, stop flag, checkpoint-due flag] of this rank -> the mean loss and the flags
        summed over all ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(shared)
            shared[0] /= self.world_size

    def _end_cycle(self, cycle_len: int) -> None:
        state = self.state
        record = {
            "turn": state.turn + 1,
            "cycle": state.cycle + 1,
            "steps": cycle_len,
            "loss": state.cycle_loss_sum / max(1, cycle_len),
            "heldout_loss": None,
            "perplexity": None,
            "tokens": cycle_len * self.plan.seq_len,
        }
        if self.heldout_windows is not None and len(self.heldout_windows):
            # Within the plan: the micro-batch and the precision the step runs at.
            record["heldout_loss"] = heldout_loss(
                self.model, self.heldout_windows, self.micro_batch, across_ranks=True, autocast=self.autocast
            )
            record["perplexity"] = math.exp(record["heldout_loss"])
            self.log(
                f"step={state.step} turn={state.turn + 1} cycle={state.cycle + 1} "
                f"heldout_loss={record['heldout_loss']:.4f} heldout_perplexity={record['perplexity']:.3f}"
            )
        state.cycles.append(record)
        self.log_metrics({"kind": "eval", "step": state.step, **record})
        state.cycle, state.cycle_step, state.cycle_loss_sum = state.cycle + 1, 0, 0.0
        if state.cycle == len(self.plan.cycle_steps):
            state.turn, state.cycle = state.turn + 1, 0
        self.save_checkpoint(background=True)
        self.write_progress(loss=record["loss"], perplexity=record["perplexity"])

    # ---- figures ------------------------------------------------------------------------------

    @property
    def precision(self) -> str:
        """What the matmuls compute in, as metrics.json records it."""
        return "bf16" if self.bf16 else "fp32"

    def tokens_per_second(self) -> float:
        """Real tokens processed per second of training steps (all ranks)."""
        seconds = self.state.train_seconds
        return self.state.tokens_seen / seconds if seconds > 0 else 0.0

    def eta_seconds(self) -> float:
        done = self.state.step - getattr(self, "_steps_at_start", 0)
        if done <= 0:
            return 0.0
        per_step = (time.monotonic() - self._started) / done
        return per_step * (self.plan.total_steps - self.state.step)

    def write_progress(self, loss: float | None = None, perplexity: float | None = None) -> None:
        if self.rank != 0 or self.checkpoint_dir is None:
            return
        state, plan = self.state, self.plan
        done = state.turn >= plan.turns
        progress = Progress(
            job_id=self.job_id,
            job_type=self.job_type,
            turn=plan.turns if done else state.turn + 1,
            turns=plan.turns,
            cycle=len(plan.cycle_steps) if done else state.cycle + 1,
            cycles=len(plan.cycle_steps),
            step=state.step,
            total_steps=plan.total_steps,
            loss=loss,
            perplexity=perplexity if perplexity is not None else _last_perplexity(state),
            tokens_trained=state.step * plan.seq_len,
            tokens_per_second=round(self.tokens_per_second(), 1),
            eta_seconds=round(self.eta_seconds(), 1),
            updated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        _atomic_write_bytes(self.checkpoint_dir / PROGRESS, progress.model_dump_json().encode())

    def log_metrics(self, record: dict) -> None:
        """Append one line to the metrics log, the whole curve a chart needs (progress.json holds only
        the latest point). A resumed run appends again from its checkpoint: readers keep the last line
        of each (kind, step)."""
        if self.rank != 0 or self.checkpoint_dir is None:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        line = LOG_RECORD.validate_python({**record, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        with open(self.checkpoint_dir / METRICS_LOG, "a", encoding="utf-8") as file:
            file.write(line.model_dump_json() + "\n")

    # ---- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, *, background: bool = False, stopping: bool = False) -> bool:
        """Weights, optimizer and trainer state, written to a temporary file then renamed into
        place; collective. True when a checkpoint of this step is written (or being written).

        `background`: a sharded checkpoint is written by a thread while training goes on, and
        renamed in at the next save or at the end of run() (finish_checkpoint). Any save first
        waits for the one in flight.
        `stopping` (SIGTERM): the save in flight is awaited; a new one is written only where it
        fits the stop grace (checkpoint.fits_stop_grace), else the run resumes from the last."""
        self._update_wall_time()
        self._last_checkpoint = time.monotonic()
        if self.sharded_checkpoints and self.checkpoint_dir is not None:
            self.finish_checkpoint()
            if stopping and not distributed_checkpoint.fits_stop_grace(self.checkpoint_bytes):
                self.log(f"stopping without a checkpoint of step {self.state.step}: "
                         f"{self.checkpoint_bytes / 1e9:.0f} GB a node do not fit the stop grace")
                return False
            saved = distributed_checkpoint.save(self.checkpoint_dir, self.state.step, self.model, self.optimizer,
                                                self._meta(), asynchronous=background)
            if isinstance(saved, distributed_checkpoint.Pending):
                self._pending_save = saved
            return True
        if self.rank != 0 or self.checkpoint_dir is None:
            return self.checkpoint_dir is not None
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "job_id": self.job_id,
            "plan": asdict(self.plan),
            "config": self.model.config.model_dump(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": asdict(self.state),
        }
        _write_beside(self.checkpoint_dir / CHECKPOINT, lambda file: torch.save(checkpoint, file))
        return True

    def finish_checkpoint(self) -> None:
        """Wait for the save in flight, if any, and rename it in (collective)."""
        pending, self._pending_save = self._pending_save, None
        if pending is not None:
            distributed_checkpoint.finish(pending)

    def resume(self) -> bool:
        """Load the last checkpoint of this job if there is one; True when it did."""
        found = distributed_checkpoint.latest(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        if found is not None:
            return self._resume_sharded(found)
        if self.checkpoint_dir is None or not (self.checkpoint_dir / CHECKPOINT).is_file():
            return False
        checkpoint = torch.load(self.checkpoint_dir / CHECKPOINT, map_location=self.device, weights_only=False)
        if checkpoint.get("format") != CHECKPOINT_FORMAT or checkpoint.get("job_id") != self.job_id:
            self.log(f"ignoring a checkpoint of another job ({checkpoint.get('job_id')!r})")
            return False
        if checkpoint["plan"] != asdict(self.plan):
            raise ValueError(f"the checkpoint in {self.checkpoint_dir} was made with other settings: {checkpoint['plan']}")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.state = TrainerState(**checkpoint["state"])
        self.log(f"resumed from step {self.state.step} (turn {self.state.turn + 1}, cycle {self.state.cycle + 1})")
        return True

    def _meta(self) -> dict:
        return {
            "job_id": self.job_id, "plan": asdict(self.plan), "config": self.model.config.model_dump(),
            "state": asdict(self.state), "world_size": self.world_size,
        }

    def _resume_sharded(self, path: Path) -> bool:
        meta = distributed_checkpoint.read_meta(path)
        if meta.get("format") != distributed_checkpoint.FORMAT or meta.get("job_id") != self.job_id:
            self.log(f"ignoring a checkpoint of another job ({meta.get('job_id')!r})")
            return False
        if meta["plan"] != asdict(self.plan):
            raise ValueError(f"the checkpoint in {path} was made with other settings: {meta['plan']}")
        distributed_checkpoint.load(path, self.model, self.optimizer)
        self.state = TrainerState(**meta["state"])
        self.sharded_checkpoints = True
        self.log(
            f"resumed from step {self.state.step} (turn {self.state.turn + 1}, cycle {self.state.cycle + 1}), "
            f"saved by {meta['world_size']} ranks, now {self.world_size}"
        )
        return True

    @contextlib.contextmanager
    def stop_on_sigterm(self):
        """Within the block SIGTERM (SageMaker stop, spot interruption) finishes the step in
        progress, writes a checkpoint and stops the run with TrainingStopped. One that comes after
        the run's last step (its checkpoint is written) raises TrainingStopped on leaving the block."""

        def request_stop() -> None:
            self.stop_requested = True

        with stopping.deferred(request_stop):
            yield self


def train_steps(
    model: Decoder,
    windows: torch.Tensor,
    steps: int,
    lr: float,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Train `model` in place for `steps` AdamW steps of one warm-up + cosine cycle; the step losses.

    For short runs such as healing after contraction; windows are (N, seq_len + 1).
    """
    if steps <= 0:
        return []
    plan = TrainPlan(
        turns=1,
        cycle_steps=[steps],
        lr=lr,
        seq_len=windows.shape[1] - 1,
        batch_size=batch_size or batch_size_for(model.parameter_count(), windows.shape[1] - 1),
        seed=seed,
    )
    trainer = Trainer(model, windows, None, plan, log=log)
    model.train()
    trainer.run()
    return trainer.losses


def _adamw(model: nn.Module, lr: float) -> torch.optim.AdamW:
    # Decay matrices only: norms' gains and the like stay as they are.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    keep = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": keep, "weight_decay": 0.0}]
    # The fused kernel updates every tensor in one pass (on CPU as on CUDA).
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=1e-8, fused=True)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, max(1, cap)) + 1) if n % d == 0)


def _last_perplexity(state: TrainerState) -> float | None:
    return state.cycles[-1]["perplexity"] if state.cycles else None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    _write_beside(path, lambda file: file.write(data))


def _write_beside(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write target whole or not at all: into a partial file in a folder beside target's folder,
    then renamed in. Beside, not inside: SageMaker mirrors the checkpoints folder to S3, and a
    partial file there would be uploaded (and deleted again) at every write. A rename is atomic
    on one filesystem only; where the folder is a mount of its own the file is moved in first."""
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.partial"
    staging.mkdir(exist_ok=True)
    partial = staging / target.name
    with open(partial, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    try:
        os.replace(partial, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        inside = target.with_name(f".{target.name}.partial")
        shutil.move(partial, inside)
        os.replace(inside, target)
