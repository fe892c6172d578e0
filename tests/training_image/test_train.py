"""The trainer: schedule, exact resume, divergence, progress and checkpoint files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shared.contracts import PRECISION_ENV
from shared.shapes import SIZES
from training_image import parallel
from training_image.model import Decoder
from training_image.precision import CPU_BF16_ENV, computes_in_bf16
from training_image.train import (
    CHECKPOINT,
    MIN_LR_RATIO,
    METRICS_LOG,
    PROGRESS,
    WARMUP_STEPS,
    Trainer,
    TrainingDiverged,
    TrainingStopped,
    TrainPlan,
    autocast_dtype,
    batch_size_for,
    lr_at,
    train_steps,
    warmup_steps,
)

PLAN = TrainPlan(turns=2, cycle_steps=[3, 4], lr=3e-3, seq_len=32, batch_size=4, seed=5)


class Crash(Exception):
    pass


def _trainer(windows, checkpoint_dir=None, *, crash_at=None, stop_at=None, checkpoint_every=0) -> Trainer:
    train, heldout = windows
    model = Decoder(SIZES["debug"]).init_weights(0)
    trainer = Trainer(
        model, train[:64], heldout[:8], PLAN, job_id="job-1", checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, progress_every=1, log=None,
    )

    def log(line: str) -> None:
        if trainer.state.step == crash_at:
            raise Crash(line)
        if trainer.state.step == stop_at:
            trainer.stop_requested = True

    trainer.log = log
    return trainer


def test_lr_cycle_warms_up_then_decays_by_cosine():
    rates = [lr_at(i, 1000, 1.0) for i in range(1000)]
    assert warmup_steps(1000) == WARMUP_STEPS == 40  # what AdamW with beta2 = 0.95 needs, whatever the cycle
    assert rates[0] == pytest.approx(1 / 40) and rates[39] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(rates[:39], rates[1:40]))
    assert all(a >= b for a, b in zip(rates[39:], rates[40:]))
    assert rates[-1] == pytest.approx(MIN_LR_RATIO)


@pytest.mark.parametrize("cycle_len", [1, 2, 3, 5, 8, 25, 150, 161, 6000])
def test_every_cycle_length_ramps_to_the_peak_and_ends_on_the_floor(cycle_len):
    rates = [lr_at(i, cycle_len, 3e-3) for i in range(cycle_len)]
    peak = max(range(cycle_len), key=rates.__getitem__)
    assert rates[peak] == pytest.approx(3e-3) and peak == warmup_steps(cycle_len) - 1
    assert all(0 < r <= 3e-3 * (1 + 1e-12) for r in rates)
    assert all(a <= b for a, b in zip(rates[:peak], rates[1 : peak + 1]))
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1 :]))
    if cycle_len >= 2:  # a short cycle still spends most of its steps decaying, down to the floor
        assert peak < cycle_len / 2 and rates[-1] == pytest.approx(MIN_LR_RATIO * 3e-3)


@pytest.mark.parametrize("cycles, cycle_len, turns", [(6, 25, 1), (10, 3, 2), (1, 150, 1), (4, 100, 3)])
def test_a_fresh_optimizer_warms_up_over_the_run_whatever_the_cycles(cycles, cycle_len, turns):
    """Short cycles restart the rate, but the optimizer is new only once: its first
    warmup_steps(total) steps never run faster than that ramp; once past it, every cycle (and
    every turn, which restarts the cycles) follows its own schedule."""
    plan = TrainPlan(turns=turns, cycle_steps=[cycle_len] * cycles, lr=3e-3, seq_len=8, batch_size=2)
    at = [(c, i) for _ in range(turns) for c in range(cycles) for i in range(cycle_len)]
    rates = [lr_at(i, cycle_len, plan.lr, step, plan.total_steps) for step, (_, i) in enumerate(at)]
    run_warmup = warmup_steps(plan.total_steps)
    assert run_warmup == min(WARMUP_STEPS, plan.total_steps // 4)
    assert all(r <= plan.lr * (step + 1) / run_warmup * (1 + 1e-12) for step, r in enumerate(rates))
    assert all(r == lr_at(i, cycle_len, plan.lr) for step, ((_, i), r) in enumerate(zip(at, rates)) if step >= run_warmup)
    assert rates[-1] == pytest.approx(MIN_LR_RATIO * plan.lr) and max(rates) == pytest.approx(plan.lr)
    if cycles == 1 and turns == 1:  # one cycle: the run's warm-up is the cycle's, the schedule as before
        assert rates == [lr_at(i, cycle_len, plan.lr) for _, i in at]


def test_the_trainer_follows_the_runs_schedule(windows):
    train, _ = windows
    plan = TrainPlan(turns=2, cycle_steps=[3, 3], lr=1e-3, seq_len=train.shape[1] - 1, batch_size=2)
    model = Decoder(SIZES["debug"]).init_weights(0)
    rates = []
    trainer = Trainer(model, train, None, plan, log=None)
    step = trainer._step

    def recording(cycle_len):
        step(cycle_len)
        rates.append(trainer.optimizer.param_groups[0]["lr"])

    trainer._step = recording
    trainer.run()
    expected = [lr_at(i, 3, 1e-3, s, 12) for s, i in enumerate([0, 1, 2] * 4)]
    assert rates == expected and rates[0] < lr_at(0, 3, 1e-3)  # a fresh optimizer starts below the cycle's ramp


@pytest.fixture
def unforced(monkeypatch):
    """Neither the precision setting nor the CPU probe forced (the suite's run may force the probe)."""
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    return monkeypatch


@pytest.mark.parametrize("avx512_bf16, amx", [(False, False), (True, False), (False, True)])
def test_bf16_autocast_by_default_only_on_a_cpu_that_has_it(windows, unforced, avx512_bf16, amx):
    monkeypatch = unforced
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    has = avx512_bf16 or amx
    assert autocast_dtype(torch.device("cpu")) == (torch.bfloat16 if has else None)
    plan = TrainPlan(turns=1, cycle_steps=[1], lr=1e-3, seq_len=32, batch_size=4)
    train, _ = windows
    model = Decoder(SIZES["debug"]).init_weights(0)
    seen = []
    model.norm.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].dtype))
    trainer = Trainer(model, train[:8], None, plan, log=None)
    assert trainer.autocast is has and Trainer(model, train[:8], None, plan, log=None, autocast=not has).autocast is not has
    trainer.run()
    # The residual stream and its norm stay fp32; the norm's output is cast once to the compute
    # dtype, which the head's matmul reads (under autocast, bf16).
    compute = torch.bfloat16 if has else torch.float32
    assert seen == [(torch.float32, compute), compute]
    assert math.isfinite(trainer.losses[0])


@pytest.mark.parametrize("hardware", [False, True])
def test_the_cpu_probe_is_forced_either_way_by_its_variable(unforced, hardware):
    unforced.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: hardware)
    unforced.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    unforced.setenv(CPU_BF16_ENV, "1")
    assert autocast_dtype(cpu) == torch.bfloat16 and computes_in_bf16(cpu)
    unforced.setenv(CPU_BF16_ENV, "0")
    assert autocast_dtype(cpu) is None and not computes_in_bf16(cpu)
    unforced.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=f"{CPU_BF16_ENV}='yes': expected 0 or 1"):
        autocast_dtype(cpu)


@pytest.mark.parametrize("setting, hardware, bf16", [
    ("auto", False, False), ("auto", True, True), (None, True, True),
    ("fp32", True, False), ("fp32", False, False), ("bf16", False, True), ("bf16", True, True),
])
def test_the_precision_setting_forces_fp32_or_bf16_and_auto_follows_the_hardware(windows, unforced, setting, hardware, bf16):
    unforced.setenv(CPU_BF16_ENV, "1" if hardware else "0")
    if setting is not None:
        unforced.setenv(PRECISION_ENV, setting)
    plan = TrainPlan(turns=1, cycle_steps=[1], lr=1e-3, seq_len=32, batch_size=4)
    trainer = Trainer(Decoder(SIZES["debug"]).init_weights(0), windows[0][:8], None, plan, log=None)
    assert (trainer.bf16, trainer.autocast, trainer.precision) == (bf16, bf16, "bf16" if bf16 else "fp32")
    # A sharded model computes in the same precision through FSDP's policy instead of autocast.
    policy = parallel.mixed_precision(torch.device("cpu"))
    assert (policy.param_dtype, policy.reduce_dtype) == ((torch.bfloat16, torch.float32) if bf16 else (None, None))


def test_a_precision_setting_outside_its_values_is_refused_by_name(windows, unforced):
    unforced.setenv(PRECISION_ENV, "half")
    plan = TrainPlan(turns=1, cycle_steps=[1], lr=1e-3, seq_len=32, batch_size=4)
    with pytest.raises(ValueError, match=f"{PRECISION_ENV}='half': expected one of auto, fp32, bf16"):
        Trainer(Decoder(SIZES["debug"]).init_weights(0), windows[0][:8], None, plan, log=None)


def test_batch_rule_grows_with_model_size():
    assert batch_size_for(SIZES["debug"].parameters()) == 8
    assert batch_size_for(SIZES["large"].parameters()) == 128
    sizes = [batch_size_for(c.parameters()) for c in SIZES.values()]
    assert sizes == sorted(sizes)


def test_healing_on_a_small_dataset_takes_smaller_batches_and_more_steps_a_pass():
    from shared.shapes import HEALING_STEPS_PER_PASS, healing_batch_size

    smollm2 = 134_515_008  # SmolLM2-135M: 16 sequences of 256 a training step
    assert batch_size_for(smollm2) == 16
    # 32 windows (1% of the bench's corpus): 4 a step, 8 steps a pass.
    assert healing_batch_size(smollm2, 256, 32) == 4
    for windows in (1, 7, 8, 15, 16, 33, 100, 127, 128, 10_000):
        batch = healing_batch_size(smollm2, 256, windows)
        assert batch == min(16, 2 ** int(math.log2(max(1, windows // HEALING_STEPS_PER_PASS))))
        assert batch & (batch - 1) == 0 and batch >= 1
        assert batch == 1 or windows // batch >= HEALING_STEPS_PER_PASS
    # A dataset of whole passes of the full batch heals as training does.
    assert healing_batch_size(smollm2, 256, 16 * HEALING_STEPS_PER_PASS) == 16
    assert healing_batch_size(SIZES["debug"].parameters(), 2048, 10_000) == batch_size_for(SIZES["debug"].parameters(), 2048)


def test_the_batch_is_sized_in_tokens_up_to_the_cap():
    from shared.pricing import LLAMA_SHAPES
    from shared.shapes import BATCH_TOKENS_CAP, MIN_BATCH_SEQUENCES, batch_tokens_for

    llama_70b = LLAMA_SHAPES["llama-70b"].parameters()
    # A 70B model steps on 2M tokens, whatever the sequence length carries them.
    assert batch_tokens_for(llama_70b) == 2 * 1024 * 1024
    assert [batch_size_for(llama_70b, n) * n for n in (256, 2048, 8192)] == [2 * 1024 * 1024] * 3
    assert batch_tokens_for(10**13) == BATCH_TOKENS_CAP
    # A small model keeps its few sequences, however long or short they are.
    assert batch_size_for(SIZES["debug"].parameters(), 2048) == MIN_BATCH_SEQUENCES
    assert batch_size_for(SIZES["debug"].parameters(), 32) == MIN_BATCH_SEQUENCES


@pytest.mark.slow
def test_a_run_killed_and_stopped_then_resumed_ends_with_the_uninterrupted_weights(windows, tmp_path):
    reference = _trainer(windows)
    reference.run()

    # Killed without warning at step 9 (turn 2): the periodic checkpoint of step 8 is the last.
    crashing = _trainer(windows, tmp_path, crash_at=9, checkpoint_every=4)
    with pytest.raises(Crash):
        crashing.run()
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["state"]["step"] == 8
    # Stopped by SIGTERM's flag at step 11: a checkpoint of exactly that step.
    stopping = _trainer(windows, tmp_path, stop_at=11)
    assert stopping.resume() and stopping.state.step == 8
    with pytest.raises(TrainingStopped):
        stopping.run()
    # A half-written checkpoint (a crash mid-save) is never read.
    (tmp_path / f".{CHECKPOINT}.partial").write_bytes(b"torn")
    resumed = _trainer(windows, tmp_path)
    assert resumed.resume() and resumed.state.step == 11
    resumed.run()

    for name, value in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert resumed.state.cycles == reference.state.cycles
    assert [c["turn"] for c in reference.state.cycles] == [1, 1, 2, 2]
    progress = json.loads((tmp_path / PROGRESS).read_text())
    assert progress["step"] == progress["total_steps"] == 14 and progress["tokens_trained"] == 14 * 32
    assert progress["turn"] == 2 and progress["cycle"] == 2
    assert progress["perplexity"] == pytest.approx(reference.state.cycles[-1]["perplexity"])
    # The metrics log beside it holds the whole curve across the crash and the stop: every step
    # once (the crashed step 9 was never logged), and one held-out evaluation per cycle.
    lines = [json.loads(line) for line in (tmp_path / METRICS_LOG).read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "step"] == list(range(1, 15))
    evals = [r for r in lines if r["kind"] == "eval"]
    assert [(r["turn"], r["cycle"], r["step"]) for r in evals] == [(1, 1, 3), (1, 2, 7), (2, 1, 10), (2, 2, 14)]
    assert [r["perplexity"] for r in evals] == pytest.approx([c["perplexity"] for c in reference.state.cycles])


def test_each_turn_reads_the_data_in_a_fresh_order(windows):
    trainer = _trainer(windows)
    first = torch.cat([trainer.batch_indices(0, s) for s in range(16)])
    second = torch.cat([trainer.batch_indices(1, s) for s in range(16)])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(64))
    assert not torch.equal(first, second)


def test_a_checkpoint_of_another_job_is_ignored(windows, tmp_path):
    trainer = _trainer(windows, tmp_path)
    trainer.save_checkpoint()
    other = _trainer(windows, tmp_path)
    other.job_id = "job-2"
    assert not other.resume()


def test_non_finite_loss_fails_with_a_clear_reason_and_keeps_the_weights(windows):
    trainer = _trainer(windows)
    with torch.no_grad():
        trainer.model.embed.weight[:] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"training diverged: loss=nan .* step 1 \(turn 1, cycle 1"):
        trainer.run()
    assert trainer.state.step == 0


def test_train_steps_lowers_the_loss_in_place(windows):
    train, heldout = windows
    torch.manual_seed(0)
    model = Decoder(SIZES["debug"]).init_weights(0)
    losses = train_steps(model, train, 30, 3e-3, batch_size=8)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def test_a_run_in_pieces_of_max_steps_ends_with_the_weights_of_one_run(windows):
    whole = _trainer(windows)
    whole.run()
    pieces = _trainer(windows)
    for _ in range(3):
        pieces.run(max_steps=5)  # the second piece crosses turn and cycle ends
    assert pieces.state.step == PLAN.total_steps == 14 and len(pieces.state.cycles) == 4
    assert pieces.losses == whole.losses
    for a, b in zip(whole.model.state_dict().values(), pieces.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
