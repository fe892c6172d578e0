"""A catalog model served from a SageMaker real-time endpoint: its name, its tags, and the body the
serving container (Hugging Face's Text Generation Inference) takes and gives back.

`fusion models deploy` names and tags the endpoint, `POST /models/{id}/generate` invokes it, and
the local stack's stand-in answers the same bodies: one definition for all three.
"""

from __future__ import annotations

import re
from typing import Any

from shared.training_jobs import STACK_TAG

ENDPOINT_PREFIX = "fusion-"
MODEL_TAG = "fusion:model"

# What one request may ask: an answer fits API Gateway's 30 s on the smallest GPU instance.
MAX_NEW_TOKENS = 512
DEFAULT_NEW_TOKENS = 64
MAX_TEMPERATURE = 2.0
DEFAULT_TEMPERATURE = 0.8
TOP_P = 0.95


def endpoint_name(model_id: str) -> str:
    """The endpoint (and its model and endpoint config) that serves `model_id` by default:
    SageMaker's names are letters, digits and '-', at most 63."""
    return re.sub(r"-+", "-", re.sub(r"[^a-zA-Z0-9]", "-", f"{ENDPOINT_PREFIX}{model_id}"))[:63].strip("-")


def invocation(*, prompt: str | None, messages: list[dict[str, str]] | None, max_tokens: int,
               temperature: float) -> dict[str, Any]:
    """The InvokeEndpoint body: TGI's generate request for a prompt, its Messages API (the
    model's chat template) for a conversation. Temperature 0 is greedy (TGI takes no 0)."""
    sampling = {"temperature": temperature, "top_p": TOP_P} if temperature > 0 else {}
    if messages is not None:
        return {"messages": messages, "max_tokens": max_tokens, **sampling}
    return {"inputs": prompt, "parameters": {"max_new_tokens": max_tokens, "do_sample": temperature > 0,
                                             "return_full_text": False, **sampling}}


def read_invocation(body: dict[str, Any]) -> dict[str, Any]:
    """invocation()'s arguments back from its body (what a stand-in for the container reads)."""
    if "messages" in body:
        return {"prompt": None, "messages": body["messages"], "max_tokens": int(body["max_tokens"]),
                "temperature": float(body.get("temperature", 0.0))}
    parameters = body.get("parameters") or {}
    return {"prompt": body["inputs"], "messages": None, "max_tokens": int(parameters["max_new_tokens"]),
            "temperature": float(parameters.get("temperature", 0.0)) if parameters.get("do_sample") else 0.0}


def answer_text(answer: Any) -> str:
    """The generated text of TGI's answer: [{"generated_text": ...}] to a prompt, an OpenAI-style
    chat completion to a conversation. ValueError for anything else."""
    if isinstance(answer, list) and answer and isinstance(answer[0], dict) and "generated_text" in answer[0]:
        return str(answer[0]["generated_text"])
    if isinstance(answer, dict):
        if "generated_text" in answer:
            return str(answer["generated_text"])
        choices = answer.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            return str((choices[0].get("message") or {}).get("content", ""))
    raise ValueError("the endpoint's answer is neither a generation nor a chat completion")


def prompt_answer(text: str) -> list[dict[str, str]]:
    """TGI's answer to a prompt, for a stand-in of the container."""
    return [{"generated_text": text}]


def chat_answer(text: str, model: str) -> dict[str, Any]:
    """TGI's Messages API answer, for a stand-in of the container."""
    return {"object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
