"""Chat messages to prompt text.

A checkpoint whose ``tokenizer_config.json`` has a ``chat_template`` (a Jinja template, as
transformers renders it) gets that template, with ``add_generation_prompt=True``. Without one
(random weights, or a base model), or without ``jinja2`` installed, the messages are joined as
plain ``role: content`` lines followed by ``assistant:``; :attr:`ChatFormat.description` says
which, and the server reports it at start-up.
"""

from __future__ import annotations

import json
import os


class ChatFormat:
    """Renders a list of ``{"role", "content"}`` messages as one prompt string."""

    def __init__(self, template: str | None = None, special_tokens: dict | None = None):
        self._template = None
        self._special = special_tokens or {}
        self.description = "plain 'role: content' lines (no chat template)"
        if template:
            try:
                import jinja2
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                self.description += "; the checkpoint has one, but rendering it needs jinja2"
                return
            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            environment.globals["raise_exception"] = raise_exception
            self._template = environment.from_string(template)
            self.description = "the checkpoint's chat template"

    @classmethod
    def from_checkpoint(cls, directory: str | None) -> "ChatFormat":
        """The format of a checkpoint directory (its ``tokenizer_config.json``), or the plain one."""
        path = os.path.join(directory, "tokenizer_config.json") if directory else None
        if not path or not os.path.isfile(path):
            return cls()
        with open(path) as file:
            config = json.load(file)
        template = config.get("chat_template")
        if isinstance(template, list):      # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        special = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token")}
        return cls(template if isinstance(template, str) else None, special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, continue_final: bool = False) -> str:
        """The prompt for ``messages``; ``ValueError`` when the template refuses them.

        ``add_generation_prompt``: the prompt ends by opening the assistant's answer;
        ``continue_final``: it ends inside the last message, right after its content (no end-of-turn
        mark), for the model to continue it (as transformers' ``continue_final_message``).
        """
        if self._template is None:
            lines = [f"{message['role']}: {message['content']}" for message in messages]
            return "\n".join(lines + (["assistant:"] if add_generation_prompt else []))
        import jinja2

        try:
            text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._special)
        except jinja2.exceptions.TemplateError as error:
            raise ValueError(f"the chat template refused these messages: {error}") from None
        if not continue_final:
            return text
        final = messages[-1]["content"].strip()
        at = text.rfind(final) if final else -1
        if at < 0:
            raise ValueError("continue_final_message: the chat template does not show the last message's content, "
                             "so the prompt cannot end inside it")
        return text[:at + len(final)]


def _token_text(value) -> str:
    """A special token from ``tokenizer_config.json``: a string, or an object with ``content``."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)
