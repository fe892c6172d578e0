"""The chunked loss is F.cross_entropy of the head's logits, without the logits: same value and
gradients (fp32: within 1e-5; bf16 autocast: within bf16's rounding), targets of IGNORE_INDEX
left out, and evaluation computes it within the trainer's micro-batch and precision."""

import math

import pytest
import torch
import torch.nn.functional as F

from shared.memory import IGNORE_INDEX, loss_chunk_tokens
from shared.shapes import SIZES
from training_image.evaluate import heldout_loss
from training_image.model import Decoder, chunked_cross_entropy


def _case(n=60, c=24, v=50, ignored_every=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g, requires_grad=True)
    weight = (torch.randn(v, c, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::ignored_every] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 7, 60, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fp32_value_and_gradients_equal_cross_entropy_of_the_logits(chunk, reduction):
    hidden, weight, targets = _case()
    loss = chunked_cross_entropy(hidden, weight, targets, reduction, chunk_tokens=chunk)
    grads = torch.autograd.grad(loss * 1.5, (hidden, weight))
    reference = F.cross_entropy(hidden @ weight.t(), targets, reduction=reduction, ignore_index=IGNORE_INDEX)
    reference_grads = torch.autograd.grad(reference * 1.5, (hidden, weight))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert grads[0][::4].abs().max() == 0  # an ignored target sends nothing back


def test_bf16_autocast_matches_the_bf16_logits_in_fp32():
    # The head's matmul in bf16 (as autocast runs it), the log-softmax in fp32 in both.
    hidden, weight, targets = _case(n=40, c=32, v=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=9)
        logits = F.linear(hidden, weight)
    assert logits.dtype == torch.bfloat16
    reference = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def test_a_batch_with_no_scored_target_has_zero_loss_and_zero_gradients():
    hidden, weight, targets = _case()
    targets[:] = IGNORE_INDEX
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=16)
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_the_chunk_holds_a_fixed_budget_of_logits():
    assert loss_chunk_tokens(128256) == 523  # 256 MiB of fp32 logits at Llama 3's vocabulary
    assert loss_chunk_tokens(512) == 131072


def test_the_model_returns_the_loss_alone_and_equals_the_logits_loss():
    torch.manual_seed(0)
    model = Decoder(SIZES["debug"]).init_weights()
    idx = torch.randint(0, model.config.vocab_size, (2, 17))
    targets = idx.roll(-1, 1)
    targets[0, :5] = IGNORE_INDEX  # a prompt that is not scored
    loss = model(idx, targets)
    assert loss.shape == ()
    logits = model(idx)
    reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


def test_evaluation_averages_over_scored_targets_at_any_micro_batch():
    """Targets a window flags as not scored (data.NOT_TARGET, as conversations flag all but the
    assistant's tokens) are left out of the mean, whatever the micro-batch."""
    from training_image.data import FLAG_SHIFT, NOT_TARGET

    torch.manual_seed(0)
    model = Decoder(SIZES["debug"]).init_weights()
    tokens = torch.randint(0, model.config.vocab_size, (5, 13))
    flags = torch.zeros_like(tokens)
    flags[:, 4:8] = NOT_TARGET  # targets 3..6 of each window are not scored
    windows = tokens | (flags << FLAG_SHIFT)
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    targets = tokens[:, 1:].masked_fill(flags[:, 1:].bool(), IGNORE_INDEX)
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX).item()
    unweighted = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    for micro_batch in (1, 2, 8):
        assert heldout_loss(model, windows, micro_batch) == pytest.approx(want, rel=1e-5)
    assert want != pytest.approx(unweighted, rel=1e-3)
    bf16 = heldout_loss(model, windows, 2, autocast=True)
    assert bf16 == pytest.approx(want, rel=2e-2) and bf16 != want  # bf16 matmuls: close, not equal


def test_gradients_are_computed_in_the_forward_pass_only_where_wanted():
    """The loss computes its gradients while each chunk's logits are at hand, and only with grad
    mode on: under no_grad (evaluation) it keeps nothing; its one backward pass scales them."""
    hidden, weight, targets = _case()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        with torch.no_grad():
            chunked_cross_entropy(hidden, weight, targets, chunk_tokens=7)
        assert saved == []
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=7)
    assert saved == [hidden.shape, weight.shape]  # the two gradients, nothing vocabulary-wide per token
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()
