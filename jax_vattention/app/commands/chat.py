"""``vattention generate --chat "question"``: one question through the model's chat template, the
answer printed as it is generated.

The answer streams through the :class:`~jax_vattention.engine.Engine`: each engine step decodes
one token, and the text of the tokens so far is printed as they arrive. Text is decoded from all the answer's tokens each time and only the new
suffix is printed, so a character split over several byte-level tokens comes out whole.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def chat_prompt(tokenizer, question: str) -> list[int]:
    """The token ids of ``question`` as the user's message, under the model's chat template."""
    if not hasattr(tokenizer, "apply_chat_template"):
        raise ValueError("--chat needs a chat template: a .gguf model carries one (try --model smollm2-135m), "
                         "a checkpoint directory has it in chat_template.jinja or tokenizer_config.json; "
                         "without one use --prompt")
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False).ids  # the template writes any BOS itself


def stream_chat(model, tokenizer, question: str, *, stop_tokens: tuple[int, ...], max_new_tokens: int,
                max_len: int, layout: str, backend: str, temperature: float, top_k: int, top_p: float,
                seed: int, out: TextIO | None = None, kv_dtype: str | None = None) -> list[int]:
    """Generate the answer to ``question``, printing its text to ``out`` (default: standard
    output) as tokens arrive; a line on standard error then gives the counts and the time.
    ``kv_dtype``: what the cache holds (``--kv-dtype``; None: the model's dtype).

    Returns the answer's token ids (with the stop token that ended it, if any).
    """
    out = sys.stdout if out is None else out
    import jax_vattention as jv
    from jax_vattention.app.assembly import cache_config_for
    from jax_vattention.engine import Engine, EngineConfig, Request

    config = model.config
    prompt = chat_prompt(tokenizer, question)
    if len(prompt) + max_new_tokens > max_len:
        raise ValueError(f"the chat prompt has {len(prompt)} tokens; with --max-new-tokens {max_new_tokens} "
                         f"it needs --max-len of at least {len(prompt) + max_new_tokens}")
    cache_config = cache_config_for(config, max_batch=1, max_len=max_len, layout=layout, kv_dtype=kv_dtype)
    # Each engine step decodes one token, so the printed answer grows token by token.
    engine_config = EngineConfig(backend=backend, max_stop_tokens=max(1, len(stop_tokens)), seed=seed)
    answer: list[int] = []
    shown = ""
    started = time.perf_counter()
    with jv.CacheManager(cache_config) as manager:
        engine = Engine(model, manager, engine_config)
        engine.submit(Request(prompt=prompt, max_new_tokens=max_new_tokens, stop_tokens=tuple(stop_tokens),
                              temperature=temperature, top_k=top_k, top_p=top_p))
        while not engine.idle:
            answer += [event.token for event in engine.step()]
            text = tokenizer.decode(answer)
            if text.startswith(shown) and not text.endswith("\ufffd"):  # whole characters only
                out.write(text[len(shown):])
                out.flush()
                shown = text
    text = tokenizer.decode(answer)
    out.write(text[len(shown):] + "\n")
    seconds = time.perf_counter() - started
    print(f"({len(prompt)} prompt tokens, {len(answer)} answer tokens in {seconds:.2f} s, compilation "
          f"included)", file=sys.stderr)
    return answer
