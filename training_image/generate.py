"""Sampling from a Decoder with a KV cache: temperature, nucleus (top-p), a token budget, EOS stop.

The prompt runs once; every new token then costs one position's forward pass, the keys and
values of the earlier positions being read from the cache instead of recomputed.
"""

from __future__ import annotations

from typing import Iterable

import torch

from training_image.model import Decoder, KVCache


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """A token id from the last position's logits (vocab,); temperature 0 is greedy."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: Decoder,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Iterable[int] = (),
    seed: int = 0,
) -> list[int]:
    """The new token ids after `prompt` (without it), ending at the first stop token (kept) or
    after max_new_tokens, or where the context is full."""
    if not prompt:
        raise ValueError("the prompt has no tokens")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    stop = set(stop)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache()
    out: list[int] = []
    tokens = torch.tensor([prompt], device=device)
    try:
        while len(out) < max_new_tokens and cache.length + tokens.shape[1] <= model.config.context_length:
            hidden = model.forward_hidden(tokens, cache)[:, -1:]  # (1, 1, C)
            logits = model.lm_head(model.norm(hidden))[0, -1]  # (vocab,)
            token = next_token(logits, temperature, top_p, generator)
            out.append(token)
            if token in stop:
                break
            tokens = torch.tensor([[token]], device=device)
    finally:
        model.train(was_training)
    return out
