"""Rendering a model's Jinja chat template the way transformers does.

transformers renders ``chat_template`` in a sandboxed Jinja environment with
``trim_blocks`` and ``lstrip_blocks``, a ``raise_exception`` function and a
``tojson`` filter that keeps non-ASCII text; templates rely on those, so we set
up the same environment.
"""

from __future__ import annotations

import json


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
