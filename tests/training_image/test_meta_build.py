"""The sharded build on the meta device (gloo, 2 ranks): no rank holds the whole model, base or
grown, and the model it trains is bit for bit the one grown on the CPU and then sharded."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from shared.hf import INDEX
from shared.memory import Layout
from shared.shapes import grown_config
from training_image import jobs, parallel
from training_image.model import Decoder
from training_image.export import export_hf
from training_image.modeldir import save_model_dir
from training_image.train import Trainer, TrainPlan

from .conftest import free_port, gloo_group, small_config

# Grows to 6 blocks (one inserted after block 3); tied, as the embedding is then the root's unit.
CONFIG = small_config(n_layers=5, qkv_bias=True, tie_embeddings=True)
PLAN = TrainPlan(turns=1, cycle_steps=[3], lr=3e-3, seq_len=16, batch_size=4, seed=2)
FSDP = Layout(strategy="fsdp")


def _windows() -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (16, PLAN.seq_len + 1), generator=torch.Generator().manual_seed(8))


def _train(model, materialize=None) -> tuple[list[float], dict, int]:
    """Losses, the gathered final weights (rank 0) and the elements this rank held once sharded."""
    trainer = Trainer(model, _windows(), None, PLAN, strategy="fsdp", device=torch.device("cpu"), log=None,
                      materialize=materialize)
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in trainer.model.parameters())
    trainer.run()
    whole = parallel.full_model(trainer.model)
    return trainer.losses, whole.state_dict() if whole is not None else None, held


def _worker(rank: int, world_size: int, port: int, base, out: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world_size, port):
        _, _, model, materialize = jobs.grown_model(base, FSDP, world_size)
        before = {"meta": all(p.is_meta for p in model.parameters()), "sharded": False}

        def watched(sharded):  # what the rank holds when it is asked to fill its part
            before["sharded"] = all(isinstance(p, DTensor) for p in sharded.parameters())
            materialize(sharded)

        meta = _train(model, watched)
        _, _, eager_model, none = jobs.grown_model(base, Layout(), world_size)
        eager = _train(eager_model)
        if rank == 0:
            torch.save({"before": before, "meta": meta, "eager": eager, "none": none}, out)


def test_a_sharded_run_built_on_meta_trains_the_model_grown_on_the_cpu(tmp_path, tokenizer):
    base = save_model_dir(tmp_path / "base", Decoder(CONFIG).init_weights(4), tokenizer, shard_bytes=30_000)
    assert len(list(base.glob("*.safetensors"))) > 2  # each rank reads its rows across the shards
    out = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(2, free_port(), base, out), nprocs=2, join=True)
    result = torch.load(out, weights_only=False)
    assert result["before"] == {"meta": True, "sharded": True} and result["none"] is None
    (meta_losses, meta_state, meta_held), (eager_losses, eager_state, _) = result["meta"], result["eager"]
    total = grown_config(CONFIG).parameters()
    assert meta_held <= total // 2 + 1000  # its half (chunks round up), never the whole model
    assert meta_losses == eager_losses
    assert meta_state.keys() == eager_state.keys()
    for name, tensor in eager_state.items():
        assert torch.equal(meta_state[name], tensor), name
    inserted = "3_1"
    assert torch.count_nonzero(meta_state[f"blocks.{inserted}.attn.o_proj.weight"]) > 0  # trained from zeros


def test_the_meta_build_reads_a_hugging_face_folder_as_it_is(tmp_path, tokenizer):
    """One process (the rows are then whole tensors): a tenant's folder, in shards, grown on meta
    and filled from its own tensor names gives the model imported and grown on the CPU."""
    llama = CONFIG.model_copy(update={"qkv_bias": False})  # Llama has no q/k/v biases alone
    folder = export_hf(Decoder(llama).init_weights(5), tokenizer, tmp_path / "hf", shard_bytes=30_000)
    assert (folder / INDEX).is_file()
    _, _, model, materialize = jobs.grown_model(folder, FSDP, world_size=2)  # as a rank of two would
    assert all(p.is_meta for p in model.parameters())
    parallel.wrap(model, strategy="ddp", activation_checkpointing=False, world_size=1, device=torch.device("cpu"),
                  materialize=materialize)
    _, _, eager, _ = jobs.grown_model(folder, Layout(), world_size=1)
    assert model.state_dict().keys() == eager.state_dict().keys()
    for name, tensor in eager.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(model.rope_cos, eager.rope_cos)
    assert model.lm_head.weight is model.embed.weight  # still tied once materialized
