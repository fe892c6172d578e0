"""Sampling from a model directory on this machine: what `fusion models generate` prints and what
the local stack's endpoints answer. Torch is imported when a model is run, not before."""

from __future__ import annotations

from pathlib import Path


def sample(model_dir: Path, prompt: str, *, max_tokens: int, temperature: float, top_p: float, seed: int,
           chat: list[dict[str, str]] | None = None) -> str:
    """The text the model writes after `prompt`, sampled with a KV cache, stopping at its EOS.
    With chat (a conversation ending with a user turn; prompt is then unused): the assistant's
    answer to it, the conversation rendered with the model's chat template and its generation
    prompt, as the model was trained on conversations."""
    from training_image.generate import generate
    from training_image.modeldir import load_model_dir

    model, tokenizer = load_model_dir(model_dir)
    stop = {tokenizer.eos_id}
    if tokenizer.generation and tokenizer.generation.get("eos_token_id") is not None:
        eos = tokenizer.generation["eos_token_id"]
        stop |= set(eos if isinstance(eos, list) else [eos])
    ids = tokenizer.chat_prompt_ids(chat) if chat is not None else tokenizer.prompt_ids(prompt)
    new = generate(model, ids, max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
    return tokenizer.decode([t for t in new if t not in stop])
