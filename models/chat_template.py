"""A model's Jinja chat template, rendered the way transformers does, and a tokenizer carrying it.

transformers renders ``chat_template`` in a sandboxed Jinja environment with
``trim_blocks`` and ``lstrip_blocks``, a ``raise_exception`` function and a
``tojson`` filter that keeps non-ASCII text; templates rely on those, so we set
up the same environment.

A GGUF file converted from a base (pretrained) checkpoint may carry no template. For the Gemma
family every instruction-tuned checkpoint uses one turn format (``<start_of_turn>user ...
<end_of_turn>``, the assistant called ``model``, a system message folded into the first user
turn), so a Gemma file without a template gets :data:`GEMMA_TURNS` (:func:`default_chat_template`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


# Gemma 2 and 3's turn format, as their instruction-tuned checkpoints' tokenizer_config.json writes
# it (text content; a list of parts contributes its text parts).
GEMMA_TURNS = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

_DEFAULT_TEMPLATES = {"gemma": GEMMA_TURNS, "gemma2": GEMMA_TURNS, "gemma3": GEMMA_TURNS}


def default_chat_template(architecture: str | None) -> str | None:
    """The chat template of a GGUF file's ``general.architecture`` that carries none: Gemma's
    turn format for the Gemma family, else None (a template cannot be guessed)."""
    return _DEFAULT_TEMPLATES.get(architecture)


def _raise_exception(message: str):
    raise ValueError(f"the chat template refused the messages: {message}")


def render_chat(template: str, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                **variables) -> str:
    """The prompt text of ``messages`` (``[{"role": ..., "content": ...}]``) under ``template``.

    ``variables`` (``bos_token``, ``eos_token``, ...) are visible to the template.

    Example::

        render_chat("{% for m in messages %}{{ m['content'] }}{% endfor %}",
                    [{"role": "user", "content": "hi"}])  # 'hi'
    """
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError('a chat template needs jinja2: pip install ".[demo]" (or pip install jinja2)') from None
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False,
                                                                          indent=indent)
    environment.globals["raise_exception"] = _raise_exception
    return environment.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables)


@dataclasses.dataclass(frozen=True)
class TemplatedTokenizer:
    """A ``tokenizers.Tokenizer`` with the model's special tokens and chat template.

    ``encode(text).ids`` / ``decode(ids)`` behave as a ``tokenizers.Tokenizer``'s do, so the
    generate command takes it where it takes a bare one. A rendered chat is encoded with
    ``add_special_tokens=False``, as transformers does: templates write the BOS token themselves.
    """

    tokenizer: Any
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True):
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True):
        """``encode`` of several texts; unlike ``encode``, it releases the GIL while it works."""
        return self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (``[{"role": "user", "content": ...}, ...]``)."""
        if self.chat_template is None:
            raise ValueError("the model has no chat template (tokenizer.chat_template in a GGUF file, "
                             "chat_template.jinja or tokenizer_config.json in a checkpoint): use --prompt")
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "")
