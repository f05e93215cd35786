"""Per-request generation settings, validated where a user hands them in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (as vLLM does)


class InvalidRequest(ValueError):
    """A request the server must refuse with 400; `field` names the offending input."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass(slots=True)
class SamplingParams:
    """How to generate for one request (the vLLM field names, so users know them).

    temperature 0 is greedy; top_k 0 disables top-k; `seed` makes sampling reproducible per
    request. `stop` strings end generation and are cut from the text; `stop_token_ids` (plus the
    model's EOS unless `ignore_eos`) end it with the token kept in `token_ids`.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()
        if self.temperature < GREEDY_BELOW:
            # logits / 1e-300 overflow to inf; a temperature this small is greedy in effect
            self.temperature = 0.0

    def validate(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequest(f"{name} must be a number, got {value!r}", name)
            if not math.isfinite(value):
                raise InvalidRequest(f"{name} must be finite, got {value!r}", name)
            return value

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise InvalidRequest(
                f"max_tokens must be an integer, got {self.max_tokens!r}", "max_tokens"
            )
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if number("temperature") < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < number("top_p") <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(
                f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}", "top_k"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise InvalidRequest(f"seed must be an integer or None, got {self.seed!r}", "seed")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest(
                f"stop must be a list of non-empty strings, got {self.stop!r}", "stop"
            )
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise InvalidRequest(
                f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}",
                "stop_token_ids",
            )
