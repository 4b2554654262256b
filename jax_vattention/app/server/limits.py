"""What one request may ask of the server (``vattention serve``'s limits), without the server's imports:
the command line reads the defaults even where the ``serve`` extra is not installed."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server.

    max_body_bytes : a request body's size at most (413 beyond)
    max_prompt_tokens : a prompt's tokens at most (400 beyond); None: the cache's ``max_len``
    max_waiting : requests waiting for a slot at most (429 with ``Retry-After`` beyond)
    tokenizer_threads : threads that tokenize and render chat templates, off the event loop
    """

    max_body_bytes: int = 4 << 20
    max_prompt_tokens: int | None = None
    max_waiting: int = 256
    tokenizer_threads: int = 2

    def __post_init__(self):
        for name in ("max_body_bytes", "max_waiting", "tokenizer_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be at least 1 (or None), got {self.max_prompt_tokens}")
