"""OpenAI-compatible request/response shapes and their validation (pydantic, at the edge).

Owns which request fields we accept and how strictly (JSON types as written: "7" is no seed, true
no token id), which we refuse (400 naming the field: every field we do not implement, unless it
carries its neutral value), how long a request's lists may be (`RequestLimits`: what a stop
string list or a prompt costs is per step or per token, so 80k stop strings slowed every batch
they joined), and how engine outputs become OpenAI JSON. No Ray, no FastAPI here, so it is
tested without a server.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from ..core.sampling_params import InvalidRequest, SamplingParams
from .errors import APIError, show


def _unicode(text: str) -> str:
    """JSON can carry a lone UTF-16 surrogate ("\\ud800"): no Unicode text, nothing a tokenizer
    can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone UTF-16 surrogate {show(text[exc.start])} at "
                         f"character {exc.start}; send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
STRICT = ConfigDict(strict=True, extra="forbid")


def _not_implemented(neutral: str) -> str:
    return f"not implemented: refused unless it is {neutral} (or absent)"


class RequestLimits(BaseModel):
    """How much one request may ask for, beyond what the body size bounds. Past a limit: 400
    naming the field and the limit."""

    model_config = ConfigDict(extra="forbid")

    max_n: int = Field(16, ge=1, description="choices per request (`n`)")
    max_stop: int = Field(16, ge=0, description="stop strings per request (OpenAI allows 4); "
                          "each is searched for in every step's new text")
    max_stop_chars: int = Field(256, ge=1, description="characters in one stop string")
    max_stop_token_ids: int = Field(256, ge=0, description="entries in `stop_token_ids`")
    max_messages: int = Field(2048, ge=1, description="chat messages per request")
    max_prompt_chars: int = Field(
        1 << 20, ge=1, description="characters of the prompt (chat: of the messages' contents "
        "together), refused before anything is rendered or tokenized")


def _too_many(field: str, got: int, limit: int, what: str) -> APIError:
    return APIError(400, f"{field} has {got} {what}; this server allows at most {limit}", field)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = STRICT

    # fields we do not implement, and the values that ask for nothing (accepted)
    NOT_IMPLEMENTED: ClassVar[dict[str, tuple]] = {
        "presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,),
        "min_tokens": (0,), "min_p": (0,), "logit_bias": ({},), "logprobs": (False, 0),
    }

    model: str | None = None
    max_tokens: int | None = Field(None, description="tokens to generate (default 64); "
                                   "deprecated in chat for max_completion_tokens")
    max_completion_tokens: int | None = Field(
        None, description="tokens to generate (default 64); give it or max_tokens, or both "
        "equal")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="vLLM extension: sample among the k likeliest")
    n: int = 1
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    user: str | None = Field(None, description="the end user's id: identifies, changes no output")
    ignore_eos: bool = Field(False, description="vLLM extension: generate past EOS")
    stop_token_ids: list[int] | None = Field(
        None, description="vLLM extension: token ids that end generation (kept in the output)")
    presence_penalty: float | None = Field(None, description=_not_implemented("0"))
    frequency_penalty: float | None = Field(None, description=_not_implemented("0"))
    repetition_penalty: float | None = Field(None, description=_not_implemented("1"))
    min_tokens: int | None = Field(None, description=_not_implemented("0"))
    min_p: float | None = Field(None, description=_not_implemented("0"))
    logit_bias: dict[str, float] | None = Field(None, description=_not_implemented("{}"))
    logprobs: bool | int | None = Field(None, description=_not_implemented("false or 0"))

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, v: float | None, info) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v}")
        return v

    def budget(self) -> tuple[int | None, str]:
        """The tokens to generate and the field that said so. OpenAI's precedence (chat):
        max_completion_tokens over the deprecated max_tokens; both given and different is
        refused rather than one silently winning. /v1/completions takes either as well."""
        new, old = self.max_completion_tokens, self.max_tokens
        if new is not None and old is not None and new != old:
            raise APIError(400, f"max_completion_tokens ({new}) and its deprecated alias "
                                f"max_tokens ({old}) disagree: send only max_completion_tokens",
                           "max_completion_tokens")
        return (new, "max_completion_tokens") if new is not None else (old, "max_tokens")

    def engine_names(self) -> dict[str, str]:
        """The request's names for the engine's `prompt` and `max_tokens`, where they differ."""
        field = self.budget()[1]
        return {"max_tokens": field} if field != "max_tokens" else {}

    def check_supported(self, limits: RequestLimits) -> None:
        for name, neutral in self.NOT_IMPLEMENTED.items():
            value = getattr(self, name)
            if value is not None and not any(value == n for n in neutral):
                allowed = " or ".join(show(n) for n in neutral)
                raise APIError(400, f"{name}={show(value)} is not supported by this server; "
                                    f"send {allowed} or leave it out", name)
        if not 1 <= self.n <= limits.max_n:
            raise APIError(400, f"n must be between 1 and {limits.max_n}, got {self.n}", "n")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > limits.max_stop:
            raise _too_many("stop", len(stops), limits.max_stop, "strings")
        for i, s in enumerate(stops):
            if len(s) > limits.max_stop_chars:
                field = "stop" if isinstance(self.stop, str) else f"stop[{i}]"
                raise _too_many(field, len(s), limits.max_stop_chars, "characters")
        ids = self.stop_token_ids or []
        if len(ids) > limits.max_stop_token_ids:
            raise _too_many("stop_token_ids", len(ids), limits.max_stop_token_ids, "entries")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true",
                           "stream_options")
        budget, field = self.budget()
        if budget is not None and budget <= 0:
            raise APIError(400, f"{field} must be >= 1, got {budget}", field)

    def sampling_params(self, choice: int = 0) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        kwargs: dict[str, Any] = {"stop": stops, "ignore_eos": self.ignore_eos,
                                  "stop_token_ids": list(self.stop_token_ids or [])}
        budget = self.budget()[0]
        if budget is not None:
            kwargs["max_tokens"] = budget
        for name in ("temperature", "top_p", "top_k"):
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


def _prompt_shape(p: Any) -> Any:
    """One clear error for the four prompt shapes (pydantic would list one per union member)."""
    if isinstance(p, str):
        return _unicode(p)
    if not isinstance(p, list):
        raise ValueError(f"prompt must be a string, a list of token ids or a list of those, "
                         f"got {show(p)}")

    def token_ids(ids: list, where: str) -> None:
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int):
                why = "booleans are not token ids" if isinstance(t, bool) else \
                    "token ids are integers"
                raise ValueError(f"{where}[{i}] is {show(t)}: {why}")

    kinds = {type(x) for x in p}
    if len(kinds) > 1:
        raise ValueError("prompt mixes token ids, strings and lists: send one kind")
    if kinds == {str}:
        for i, text in enumerate(p):
            try:
                _unicode(text)
            except ValueError as exc:
                raise ValueError(f"prompt[{i}] {exc}") from None
    elif kinds == {list}:
        for i, ids in enumerate(p):
            token_ids(ids, f"prompt[{i}]")
    else:
        token_ids(p, "prompt")
    return p


class CompletionRequest(_SamplingFields):
    NOT_IMPLEMENTED = {**_SamplingFields.NOT_IMPLEMENTED,
                       "best_of": (1,), "echo": (False,), "suffix": ("",)}

    prompt: str | list[int] | list[str] | list[list[int]]
    best_of: int | None = Field(None, description=_not_implemented("1"))
    echo: bool | None = Field(None, description=_not_implemented("false"))
    suffix: str | None = Field(None, description=_not_implemented('""'))

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, p: Any) -> Any:
        return _prompt_shape(p)

    def check_supported(self, limits: RequestLimits) -> None:
        super().check_supported(limits)
        p = self.prompt
        chars = len(p) if isinstance(p, str) else sum(len(x) for x in p if isinstance(x, str))
        if chars > limits.max_prompt_chars:
            raise _too_many("prompt", chars, limits.max_prompt_chars, "characters")

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


class ContentPart(BaseModel):
    model_config = STRICT

    type: Literal["text"] = Field(description="text only: image and audio parts are refused")
    text: Text


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    NOT_IMPLEMENTED = {**_SamplingFields.NOT_IMPLEMENTED,
                       "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",),
                       "functions": ([],), "function_call": ("none",),
                       "response_format": ({"type": "text"},)}

    messages: list[ChatMessage] = Field(min_length=1)
    top_logprobs: int | None = Field(None, description=_not_implemented("0"))
    tools: list[dict] | None = Field(None, description=_not_implemented("[]"))
    tool_choice: str | dict | None = Field(None, description=_not_implemented('"none"'))
    functions: list[dict] | None = Field(None, description=_not_implemented("[]"))
    function_call: str | dict | None = Field(None, description=_not_implemented('"none"'))
    response_format: dict | None = Field(None, description=_not_implemented('{"type": "text"}'))

    def check_supported(self, limits: RequestLimits) -> None:
        super().check_supported(limits)
        if len(self.messages) > limits.max_messages:
            raise _too_many("messages", len(self.messages), limits.max_messages, "messages")
        chars = sum(len(m.text()) for m in self.messages)
        if chars > limits.max_prompt_chars:
            raise _too_many("messages", chars, limits.max_prompt_chars,
                            "characters of content together")

    def engine_names(self) -> dict[str, str]:
        return {**super().engine_names(), "prompt": "messages"}


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
