"""The memory plan's activation bytes are what autograd really saves for our decoder."""

import pytest
import torch

from shared.memory import block_activation_bytes, head_activation_bytes
from shared.shapes import SIZES
from training_image.model import Decoder


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves for the backward pass while fn runs."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _per_token(fn_of_length, batch=2, lengths=(64, 128)) -> float:
    # The difference of two lengths leaves out what does not grow with tokens (the weights,
    # their bf16 copies, the rotary tables).
    short, long = (_saved_bytes(lambda: fn_of_length(t)) for t in lengths)
    return (long - short) / (batch * (lengths[1] - lengths[0]))


@pytest.mark.parametrize("size", ["debug", "tiny"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_block_and_head_activations_match_the_plan(size, bf16):
    torch.manual_seed(0)
    config = SIZES[size]
    model = Decoder(config).init_weights()
    block = next(iter(model.blocks.values()))
    a = 2 if bf16 else 4

    def block_forward(t):
        x = torch.randn(2, t, config.dim, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            block(x, model.rope_cos[:t], model.rope_sin[:t])

    def model_forward(t):
        idx = torch.randint(0, config.vocab_size, (2, t + 1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(idx[:, :-1], idx[:, 1:])

    per_block = block_activation_bytes(config, config.layers[0], compute_bytes=a)
    assert _per_token(block_forward) == per_block
    expected_model = config.n_layers * per_block + head_activation_bytes(config, compute_bytes=a)
    assert _per_token(model_forward) == expected_model
