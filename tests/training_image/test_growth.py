"""Growth's promise: the grown model computes the base's function and adds what pricing predicts."""

from __future__ import annotations

import torch

from shared.shapes import LayerShape, ModelConfig, SIZES, growth_parameters
from training_image.growth import grow
from training_image.model import Decoder


def _assert_same_function(base: Decoder, config: ModelConfig) -> Decoder:
    tokens = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = base(tokens)
        grown, grown_config = grow(base, config)
        after = grown(tokens)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert grown.parameter_count() - base.parameter_count() == growth_parameters(config)
    assert grown_config.parameters() == grown.parameter_count()
    return grown


def test_grown_debug_model_keeps_its_logits_and_adds_the_priced_parameters():
    config = SIZES["debug"]
    base = Decoder(config).init_weights(3)
    grown = _assert_same_function(base, config)
    assert grown.block_ids == ["0", "1", "2", "3", "3_1"]
    new = grown.blocks["3_1"]
    assert torch.count_nonzero(new.attn.o_proj.weight) == 0 and torch.count_nonzero(new.mlp.down_proj.weight) == 0
    torch.testing.assert_close(new.attn.q_proj.weight, base.blocks["3"].attn.q_proj.weight)


def test_growth_copies_each_neighbour_with_its_own_shape():
    shapes = [LayerShape(n_heads=4, n_kv_heads=2, mlp_hidden=40 + 8 * i) for i in range(9)]
    config = ModelConfig(vocab_size=300, dim=32, head_dim=8, context_length=64, layers=shapes, tie_embeddings=True)
    base = Decoder(config).init_weights(0)
    grown = _assert_same_function(base, config)
    assert grown.block_ids == ["0", "1", "2", "3", "3_1", "4", "5", "6", "7", "7_1", "8"]
    assert grown.blocks["7_1"].mlp.up_proj.weight.shape == base.blocks["7"].mlp.up_proj.weight.shape
    assert grown.lm_head.weight is grown.embed.weight


def test_growth_leaves_the_base_untouched():
    config = SIZES["debug"]
    base = Decoder(config).init_weights(0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    grown, _ = grow(base, config)
    with torch.no_grad():
        grown.blocks["0"].attn.q_proj.weight.add_(1.0)
    for name, value in base.state_dict().items():
        assert torch.equal(value, before[name]), name
