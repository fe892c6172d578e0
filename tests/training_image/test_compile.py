"""The product's compiled blocks: same names, the same loss as eager (fp32, within 1e-4), and a
recompile limit that holds a contracted model's per-layer shapes."""

import pytest
import torch

from shared.shapes import SIZES, LayerShape
from training_image import parallel
from training_image.model import Decoder
from training_image.train import Trainer, TrainPlan


def test_a_contracted_models_shapes_fit_the_recompile_limit():
    import torch._dynamo

    base = SIZES["tiny"]
    layers = [LayerShape(n_heads=4 - i % 2 * 2, n_kv_heads=2, mlp_hidden=352 - 16 * i) for i in range(base.n_layers)]
    contracted = base.model_copy(update={"layers": layers})
    model = Decoder(contracted)
    with torch._dynamo.config.patch(recompile_limit=8, suppress_errors=False):
        parallel.compile_blocks(model)
        assert torch._dynamo.config.recompile_limit == base.n_layers + parallel.RECOMPILE_MARGIN
        assert torch._dynamo.config.suppress_errors  # eager where compilation fails
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in Decoder(contracted).named_parameters()]


@pytest.mark.slow
def test_compiled_training_steps_match_eager(windows):
    train, _ = windows
    plan = TrainPlan(turns=1, cycle_steps=[2], lr=1e-3, seq_len=train.shape[1] - 1, batch_size=4)
    losses = {}
    for compiled in (False, True):
        model = Decoder(SIZES["debug"]).init_weights(0)
        trainer = Trainer(model, train[:8], None, plan, log=None, autocast=False, compile=compiled)
        trainer.run()
        losses[compiled] = trainer.losses
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
