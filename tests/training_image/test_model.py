"""The decoder's hand-written gradients agree with autograd's for the same expressions, and its
attention computes what scaled_dot_product_attention does, in the dtype it says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training_image.model import CPU_FP32_ATTENTION_MAX_LEN, RMSNorm, attend


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


def _qkv(length: int, dtype: torch.dtype, grad: bool):
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, 4, length, 16), (2, 2, length, 16), (2, 2, length, 16)]  # 4 query heads, 2 kv heads
    return [torch.randn(*shape, generator=generator).to(dtype).requires_grad_(grad) for shape in shapes]


def test_training_attention_on_a_cpu_in_bf16_computes_in_fp32_up_to_its_length_and_returns_bf16():
    """Precision: bf16 inputs, compared with fp32 attention of the same bf16 values."""
    q, k, v = _qkv(CPU_FP32_ATTENTION_MAX_LEN, torch.bfloat16, grad=True)
    upstream = torch.randn(q.shape).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = attend(q, k, v, is_causal=True)
    grads = torch.autograd.grad(ours, (q, k, v), upstream)
    fp32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*fp32, is_causal=True, enable_gqa=True)
    expected = torch.autograd.grad(reference, fp32, upstream.float())

    assert ours.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    # Only the rounding of the fp32 result to bf16 apart: bf16 attention itself is further off.
    torch.testing.assert_close(ours.float(), reference, atol=0, rtol=2**-8)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.float(), want, atol=1e-6, rtol=2**-8)


@pytest.mark.parametrize("case", ["longer", "inference"])
def test_attention_keeps_bf16_beyond_its_length_and_in_inference(case):
    """Precision: bf16 in and out; the kernel's own bf16 result, bit for bit."""
    length = CPU_FP32_ATTENTION_MAX_LEN + 1 if case == "longer" else 64
    q, k, v = _qkv(length, torch.bfloat16, grad=case == "longer")
    ours = attend(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), atol=0, rtol=0)
    fp32 = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), is_causal=True, enable_gqa=True)
    assert not torch.equal(ours, fp32.to(torch.bfloat16))  # the test can tell the two apart
