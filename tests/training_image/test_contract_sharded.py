"""Healing on the sharded path on CPU (gloo): the contracted model (the student) sharded with
FSDP2 over two ranks and the source (the teacher) sharded beside it over the same ranks,
computes in fp32 the distillation losses and weights one process computes; and the chunked distillation loss is
F.kl_div's of the whole logits (fp32)."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from shared.shapes import SIZES
from training_image import parallel
from training_image.contract import Distillation, contract_blocks
from training_image.model import Decoder, chunked_kl_divergence
from training_image.train import Trainer, TrainPlan

from .conftest import free_port, gloo_group

PLAN = TrainPlan(turns=1, cycle_steps=[6], lr=3e-3, seq_len=16, batch_size=8, seed=3)
REL = 1e-5  # fp32: the ranks' reductions add in another order


def _windows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    return torch.randint(0, SIZES["debug"].vocab_size, (48, PLAN.seq_len + 1), generator=generator)


def _source() -> Decoder:
    """The debug shape with confident predictions (a head 30 x its initial scale), so that the
    distance to the source is a loss worth healing and not float noise."""
    source = Decoder(SIZES["debug"]).init_weights(0)
    with torch.no_grad():
        source.lm_head.weight.mul_(30)
    return source


def _heal(strategy: str, loss: str) -> dict:
    """Contract the debug model's middle blocks by half (the same on every rank: no statistics are
    exchanged here), then heal toward the source, the teacher sharded as the student is (as a
    contract job lays them out); the step losses, the student's full weights and the share of
    the teacher's blocks and embeddings this rank holds."""
    source = _source()
    student, _ = contract_blocks(source, source.config, _windows()[:8], 0.5, ["1", "2"])
    with torch.no_grad():  # a student that starts away from the source
        student.lm_head.weight.mul_(0.5)
    sharded = parallel.shards(strategy, dist.get_world_size() if dist.is_initialized() else 1)
    teacher = parallel.frozen_model(
        source.config, torch.device("cpu"),
        functools.partial(parallel.load_shards, files=[], sources=dict(source.named_parameters())), sharded=sharded)
    trainer = Trainer(Distillation(student, teacher, loss), _windows(), None, PLAN, strategy=strategy, log=None,
                      autocast=False)
    trainer.run()
    # After the steps' forward passes: what stays of the teacher's blocks and embeddings on this rank
    # (sharded, each unit gathered to run and freed after: every one of them a shard again).
    parts = [p for name, p in teacher.named_parameters() if not name.startswith(("norm", "lm_head"))]
    assert all(isinstance(p, DTensor) for p in parts) == sharded
    held = sum(_local(p).numel() for p in parts)
    whole = parallel.full_model(student)
    return {"losses": trainer.losses, "sharded": trainer.sharded, "teacher_share": held / source.parameter_count(),
            "state": whole.state_dict() if whole is not None else None}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _worker(rank: int, world_size: int, port: int, out: str, loss: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world_size, port):
        result = _heal("fsdp", loss)
        if rank == 0:
            torch.save(result, out)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kl", "kl+lm"])
def test_two_sharded_ranks_heal_as_one_process_does(tmp_path, loss):
    torch.set_num_threads(1)
    single = _heal("ddp", loss)
    out = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, free_port(), out, loss), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    assert two["sharded"] and not single["sharded"]
    # The teacher's blocks and embeddings: half of them on each of the two ranks, all of them on one.
    config = SIZES["debug"]
    sharded_part = 1 - (config.vocab_size * config.dim + config.dim) / config.parameters()  # all but the head and norm
    assert single["teacher_share"] == pytest.approx(sharded_part, rel=1e-9)
    assert two["teacher_share"] == pytest.approx(sharded_part / 2, rel=0.01)
    assert two["losses"] == pytest.approx(single["losses"], rel=REL)
    assert min(single["losses"]) > 0.1  # not vacuous: a distance well above float noise at every step
    for name, value in single["state"].items():
        torch.testing.assert_close(two["state"][name], value, rtol=1e-4, atol=1e-4, msg=name)


def test_chunked_distillation_loss_is_kl_div_of_the_whole_logits_fp32():
    generator = torch.Generator().manual_seed(0)
    tokens, dim, vocab = 37, 16, 50
    hidden = torch.randn(tokens, dim, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=generator, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(tokens, dim, generator=generator), torch.randn(vocab, dim, generator=generator)
    whole = F.kl_div(F.log_softmax(hidden @ weight.t(), -1), F.log_softmax(teacher_hidden @ teacher_weight.t(), -1),
                     log_target=True, reduction="batchmean")
    grads = torch.autograd.grad(whole, (hidden, weight))
    chunked = chunked_kl_divergence(hidden, weight, teacher_hidden, teacher_weight, chunk_tokens=5)  # 8 chunks, the last short
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6) and whole.item() > 1
    for got, expected in zip(torch.autograd.grad(chunked, (hidden, weight)), grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    same = chunked_kl_divergence(teacher_hidden, teacher_weight, teacher_hidden, teacher_weight, chunk_tokens=5)
    assert abs(same.item()) < 1e-6  # no distance to itself


def _job(root: str, sharded: bool) -> dict:
    from shared.contracts import PRECISION_ENV
    from shared.memory import Layout
    from shared.settings import ContractSettings
    from training_image.jobs import run_contract_job

    os.environ[PRECISION_ENV] = "fp32"
    settings = ContractSettings(source_model_id="model-abc", contraction_ratio=0.5, num_layers_to_contract=2,
                                train_steps=3)
    layout = Layout(strategy="fsdp", micro_batch=2) if sharded else Layout(micro_batch=2)
    return run_contract_job(settings, Path(root), "contract-1", log=lambda line: None, layout=layout).model_dump()


def _job_worker(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))  # as torchrun sets them
    with gloo_group(rank, world_size, port):
        metrics = _job(root, sharded=True)
        if rank == 0:
            torch.save(metrics, out)


@pytest.mark.slow
def test_a_contract_job_laid_out_sharded_on_two_ranks_delivers_what_one_process_does(ml_root, tmp_path, monkeypatch):
    """The whole job (calibration shared between the ranks, the cut, healing with the student
    sharded, the delivered weights gathered from the shards), fp32, against one process."""
    from shared.contracts import PRECISION_ENV
    from training_image.modeldir import load_model_dir

    monkeypatch.setenv(PRECISION_ENV, "fp32")
    torch.set_num_threads(1)
    alone_root = tmp_path / "alone"
    shutil.copytree(ml_root, alone_root)
    alone = _job(str(alone_root), sharded=False)
    out = str(tmp_path / "two.pt")
    mp.spawn(_job_worker, args=(2, free_port(), str(ml_root), out), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    assert two["config"] == alone["config"] and two["layers_contracted"] == alone["layers_contracted"]
    for key in ("perplexity_before", "perplexity_after_pruning", "perplexity_after_healing"):
        assert two[key] == pytest.approx(alone[key], rel=REL), key
    # The distillation loss of this near-uniform debug source is about 1e-5: a difference of near-equal
    # sums, whose fp32 rounding is absolute, not relative. The cut blocks' projections are refit to the
    # gap between two residual streams (contract.reconstruct), which each rank computes on its own
    # batches of windows: weights one fp32 rounding apart move that loss by about 1e-9.
    assert [c["loss"] for c in two["cycles"]] == pytest.approx([c["loss"] for c in alone["cycles"]], rel=REL, abs=1e-8)
    assert two["healing_kept"] == alone["healing_kept"]
    delivered, _ = load_model_dir(ml_root / "model")
    expected, _ = load_model_dir(alone_root / "model")
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(delivered.state_dict()[name], value, rtol=1e-4, atol=1e-4, msg=name)
