"""Chat templates as models ship them (Jinja2), rendered in a sandbox.

Both backends use this: llama.cpp reads the template from the GGUF metadata, exllamav2 from the
model's ``tokenizer_config.json``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rbee_fleet.common.errors import BadRequest

# A plain ChatML layout for models that ship no template of their own.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _raise(message: str) -> None:
    raise BadRequest(f"the model's chat template refused these messages: {message}", param="messages")


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source or FALLBACK_TEMPLATE
        self.from_model = source is not None
        self._template = env.from_string(self.source)
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
            )
        except BadRequest:
            raise
        except TemplateError as exc:
            raise BadRequest(f"the model's chat template failed on these messages: {exc}") from None
