"""Chat prompts rendered with the target tokenizer's own Jinja chat template: what the server
renders for chat requests and what drafter training renders for `{"messages": ...}` prompts, so
the two always agree."""

from __future__ import annotations

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .sampling_params import InvalidRequest

# Used when a tokenizer ships no template (ChatML, what Qwen3 uses).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _raise(message: str):
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str | None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(source or CHATML)

    def render(self, messages: list[dict], **kwargs) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, enable_thinking=False, **kwargs
            )
        except TemplateError as exc:
            raise InvalidRequest(
                f"messages: the chat template rejected them: {exc}", "messages"
            ) from exc
