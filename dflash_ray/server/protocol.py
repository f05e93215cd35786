"""OpenAI-compatible request/response shapes and their validation (pydantic, at the edge).

Owns which request fields we accept, which we reject (400 naming the field), and how engine
outputs become OpenAI JSON. No Ray, no FastAPI here, so it is tested without a server.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..core.sampling_params import InvalidRequest, SamplingParams


class APIError(Exception):
    """An error with an HTTP status, rendered in OpenAI's error JSON by the ingress."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status,
            }
        }


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, description="tokens to generate (default 64)")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: generate past EOS")
    stop_token_ids: list[int] | None = Field(
        None, description="vLLM extension: token ids that end generation (kept in the output)")

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, v: float | None, info) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{info.field_name} must be a finite number")
        return v

    def check_supported(self) -> None:
        unsupported = {
            "logit_bias",
            "best_of",
            "echo",
            "suffix",
            "tools",
            "functions",
            "response_format",
            "presence_penalty",
            "frequency_penalty",
            "top_logprobs",
            "logprobs",
        }
        extra = dict(self.model_extra or {})
        if self.logprobs not in (None, False, 0):
            extra["logprobs"] = self.logprobs
        for name, value in extra.items():
            if name in unsupported and value not in (None, 0, 0.0, False, [], {}):
                raise APIError(400, f"{name} is not supported by this server", name)
        if not 1 <= self.n <= 16:
            raise APIError(400, f"n must be between 1 and 16, got {self.n}", "n")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise APIError(400, f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")

    def sampling_params(self, choice: int = 0) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        kwargs: dict[str, Any] = {"stop": stops, "ignore_eos": self.ignore_eos,
                                  "stop_token_ids": list(self.stop_token_ids or [])}
        for name in ("max_tokens", "temperature", "top_p", "top_k"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        if self.temperature is None:
            kwargs["temperature"] = 1.0  # OpenAI's default
        if self.seed is not None:
            kwargs["seed"] = self.seed + choice
        try:
            return SamplingParams(**kwargs)
        except InvalidRequest as exc:
            raise APIError(400, str(exc), exc.field) from exc


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise APIError(400, "prompt: only one prompt per request is supported", "prompt")
            p = p[0]
        if isinstance(p, str) and not p:
            raise APIError(400, "prompt is empty", "prompt")
        if isinstance(p, list) and not p:
            raise APIError(400, "prompt is empty", "prompt")
        return p


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = [c.get("text", "") for c in self.content if c.get("type") == "text"]
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, outs: list[dict]) -> dict:
    """OpenAI usage plus the speculation stats of the request's choices."""
    completion = sum(len(o["token_ids"]) for o in outs)
    steps = sum(len(o["acceptance_lengths"]) for o in outs)
    committed = sum(sum(o["acceptance_lengths"]) for o in outs)
    return {
        "prompt_tokens": prompt_tokens * len(outs),
        "completion_tokens": completion,
        "total_tokens": prompt_tokens * len(outs) + completion,
        "acceptance_length": round(committed / steps, 4) if steps else None,
        "num_drafts": steps,  # verify steps that carried drafts
        "num_draft_tokens": sum(o["num_draft_tokens"] for o in outs),
        "num_accepted_tokens": sum(o["num_accepted_tokens"] for o in outs),
    }


def completion_body(rid: str, model: str, outs: list[dict], chat: bool) -> dict:
    choices = []
    for i, o in enumerate(outs):
        choice: dict[str, Any] = {"index": i, "finish_reason": o["finish_reason"], "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": o["text"]}
        else:
            choice["text"] = o["text"]
        choices.append(choice)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(len(outs[0]["prompt_token_ids"]), outs),
    }


def chunk_body(
    rid: str, model: str, index: int, delta_text: str, finish: str | None, chat: bool, first: bool
) -> dict:
    if chat:
        delta: dict[str, Any] = {"content": delta_text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": index, "text": delta_text, "finish_reason": finish, "logprobs": None}
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
