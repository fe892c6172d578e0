"""The decoder's hand-written gradients agree with autograd's for the same expressions."""

from __future__ import annotations

import torch

from training_image.model import RMSNorm


def _reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def test_rms_norm_matches_autograd_of_its_formula_in_value_and_gradients():
    generator = torch.Generator().manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=generator))
    x = (torch.randn(3, 5, 16, generator=generator) * 3).requires_grad_()
    upstream = torch.randn(3, 5, 16, generator=generator)

    ours = norm(x)
    grads = torch.autograd.grad(ours, (x, norm.weight), upstream)
    reference = _reference_rms_norm(x, norm.weight, 1e-5)
    expected = torch.autograd.grad(reference, (x, norm.weight), upstream)

    torch.testing.assert_close(ours, reference)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert grads[1].abs().sum() > 0


def test_rms_norm_of_bf16_activations_keeps_the_dtypes_of_its_formula():
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).requires_grad_()
    norm = RMSNorm(32, eps=1e-5)
    out = norm(x)
    out.sum().backward()
    reference = _reference_rms_norm(x.detach(), norm.weight.detach(), 1e-5)
    assert out.dtype == reference.dtype and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference)
