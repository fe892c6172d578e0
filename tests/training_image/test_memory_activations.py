"""The memory plan's activation bytes are what autograd really saves for our decoder: per token,
and at one length in full (nothing that is neither a parameter nor a buffer goes uncounted)."""

import pytest
import torch

from shared.memory import AUTOCAST_WEIGHT_BYTES, block_activation_bytes, head_activation_bytes, head_weight_gradient_bytes
from shared.shapes import SIZES
from training_image.model import Attention, Decoder

# fp32: everything fp32. autocast: fp32 weights, bf16 autocast (DDP on a GPU). bf16: bf16
# weights and no autocast, as FSDP's mixed-precision policy gathers them.
MODES = {"fp32": 4, "autocast": 2, "bf16": 2}


@pytest.fixture(autouse=True)
def _attention_as_on_a_gpu(monkeypatch):
    """The plan counts what a GPU keeps: attention in the compute dtype, which a CPU training in
    bf16 swaps for fp32 (training_image.model.attend)."""
    monkeypatch.setattr(Attention, "fp32_on_cpu", False)


def _saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of distinct storages autograd saves for the backward pass while fn runs, those of
    `exclude` (data pointers: the parameters and buffers) left out."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _model(size: str, mode: str) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(SIZES[size]).init_weights()
    return model.to(torch.bfloat16) if mode == "bf16" else model


def _owned(model: Decoder) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}


def _autocast_copies(module: torch.nn.Module, mode: str) -> int:
    """The bf16 copies autocast keeps of the matmul weights (the plan's autocast_weights)."""
    if mode != "autocast":
        return 0
    return AUTOCAST_WEIGHT_BYTES * sum(p.numel() for n, p in module.named_parameters() if n.endswith("proj.weight"))


def _block_forward(model: Decoder, mode: str, batch: int, length: int):
    config = model.config
    block = next(iter(model.blocks.values()))
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32

    def run():
        x = torch.randn(batch, length, config.dim, dtype=dtype, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            block(x, model.rope_cos[:length], model.rope_sin[:length])

    return block, run


def _model_forward(model: Decoder, mode: str, batch: int, length: int):
    config = model.config

    def run():
        idx = torch.randint(0, config.vocab_size, (batch, length))
        targets = torch.randint(0, config.vocab_size, (batch, length))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            model(idx, targets)

    return run


@pytest.mark.parametrize("size", ["debug", "tiny"])
@pytest.mark.parametrize("mode", list(MODES))
def test_a_block_keeps_exactly_what_the_plan_counts_at_one_length(size, mode):
    model = _model(size, mode)
    config = model.config
    batch, length = 2, 48
    block, run = _block_forward(model, mode, batch, length)
    planned = batch * length * block_activation_bytes(config, config.layers[0], compute_bytes=MODES[mode])
    assert _saved_bytes(run, _owned(model)) == planned + _autocast_copies(block, mode)


@pytest.mark.parametrize("size", ["debug", "tiny"])
@pytest.mark.parametrize("mode", list(MODES))
def test_the_model_with_its_loss_keeps_exactly_what_the_plan_counts(size, mode):
    model = _model(size, mode)
    config = model.config
    a = MODES[mode]
    per_token = config.n_layers * block_activation_bytes(config, config.layers[0], compute_bytes=a)
    per_token += head_activation_bytes(config, compute_bytes=a)
    for batch, length in ((2, 40), (3, 64)):
        saved = _saved_bytes(_model_forward(model, mode, batch, length), _owned(model))
        # Beside the per-token bytes, the loss keeps the head's weight gradient it computed in
        # its forward pass (the plan counts it once, in logits_peak_bytes).
        assert saved == batch * length * per_token + head_weight_gradient_bytes(config) + _autocast_copies(model, mode)


def test_no_weight_sized_tensor_is_kept_beyond_the_parameters():
    # The q/k/v weights concatenated on each forward were kept by autograd: a copy of the
    # attention's weights per block that no part of the plan held.
    model = _model("tiny", "bf16")
    block, run = _block_forward(model, "bf16", 1, 1)
    attention = sum(p.numel() * 2 for p in block.attn.parameters())
    assert _saved_bytes(run, _owned(model)) < attention / 4
