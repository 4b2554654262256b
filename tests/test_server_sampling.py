"""The sampling fields through the official ``openai`` client: each changes the answer as its
definition says, against the engine's own reference (``generate`` with the same knobs) or the
server's other answers.

The tiny model with random weights and the byte tokenizer: a token is a byte, so a stop string of
two characters is split across two tokens, and a token's text is its byte. Forks are real (the
fake driver's ``host_pages``): ``n`` samples of a prompt are one prefill and forked slots.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from server_harness import start_server, tiny_model  # noqa: E402

import jax_vattention as jv  # noqa: E402
from jax_vattention.decode.generate import generate  # noqa: E402

PROMPT = "Hello there"


@pytest.fixture(scope="module")
def server():
    running = start_server(host_pages=True, max_len=128)
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def reference(prompts, **knobs):
    """``generate``'s tokens (and logits) for the byte prompts, one row each (knobs per row)."""
    model = tiny_model()
    config = model.config
    cache = jv.KVCache.dense(num_layers=config.num_layers, max_batch=len(prompts), capacity=64,
                             kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)
    result, _ = generate(model, cache, [list(p.encode()) for p in prompts], stop_tokens=[], return_logits=True,
                         **knobs)
    return result


def text_of(tokens):
    return bytes(tokens).decode("utf-8", errors="replace")


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.max(x) - np.log(np.exp(x - np.max(x)).sum())


def streamed(stream):
    """Each choice's streamed text, finish reason and stop reason, by index."""
    texts, finish, stops = {}, {}, {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.text or "")
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
                stops[choice.index] = getattr(choice, "stop_reason", None)
    return texts, finish, stops


def test_n_samples_are_the_seeded_requests_and_stream_as_they_answer(client):
    knobs = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0)
    many = client.completions.create(n=3, seed=5, **knobs)
    assert [c.index for c in many.choices] == [0, 1, 2]
    alone = [client.completions.create(seed=5 + i, **knobs).choices[0].text for i in range(3)]
    assert [c.text for c in many.choices] == alone and len(set(alone)) == 3
    assert many.usage.completion_tokens == 24 and many.usage.prompt_tokens == len(PROMPT)
    texts, finish, _ = streamed(client.completions.create(n=3, seed=5, stream=True, **knobs))
    assert [texts[i] for i in range(3)] == alone and set(finish.values()) == {"length"}
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=2,
                                          seed=9, max_tokens=6, temperature=1.0)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content != \
        chat.choices[1].message.content


def test_best_of_returns_the_samples_of_highest_cumulative_logprob(client, server):
    knobs = dict(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=21)
    every = client.completions.create(n=4, logprobs=0, **knobs)
    totals = [sum(c.logprobs.token_logprobs) for c in every.choices]
    best = client.completions.create(n=2, best_of=4, **knobs)
    order = np.argsort(-np.asarray(totals), kind="stable")[:2]
    assert [c.text for c in best.choices] == [every.choices[i].text for i in order]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    for body, message in [({"n": 2, "best_of": 1}, "best_of=1 must be at least n=2"),
                          ({"best_of": 2, "stream": True}, "cannot stream")]:
        response = httpx.post(server.url + "/completions", json={**knobs, **body}, timeout=30)
        assert response.status_code == 400 and message in response.json()["error"]["message"]
        assert response.json()["error"]["param"] == "best_of"


def test_stop_strings_split_across_tokens_end_the_answer_streamed_or_whole(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    at = next(i for i in range(3, len(full) - 1) if "\ufffd" not in full[i:i + 2] and full.find(full[i:i + 2]) == i)
    stop = full[at:at + 2]                                         # two bytes: two tokens
    knobs = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
    whole = client.completions.create(stop=[stop, "never\u00e9"], **knobs).choices[0]
    assert whole.text == full[:at] and whole.finish_reason == "stop" and whole.stop_reason == stop
    kept = client.completions.create(stop=stop, extra_body={"include_stop_str_in_output": True}, **knobs)
    assert kept.choices[0].text == full[:at + 2]
    texts, finish, stops = streamed(client.completions.create(stop=[stop], stream=True, **knobs))
    assert texts[0] == full[:at] and finish[0] == "stop" and stops[0] == stop
    chat_full = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=16, temperature=0).choices[0].message.content
    at = next(i for i in range(2, len(chat_full) - 1) if "\ufffd" not in chat_full[i:i + 2]
              and chat_full.find(chat_full[i:i + 2]) == i)
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=16, temperature=0,
        stop=chat_full[at:at + 2], stream=True) if chunk.choices]
    assert "".join(pieces) == chat_full[:at]


def test_stop_token_ids_ignore_eos_and_min_tokens(client, server):
    knobs = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    free = reference([PROMPT], max_new_tokens=10).tokens[0]
    stop_id = free[3]
    first = free.index(stop_id)
    by_id = client.completions.create(extra_body={"stop_token_ids": [stop_id]}, **knobs).choices[0]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_id and by_id.text == text_of(free[:first])
    loaded = server.service.loaded
    before = loaded.stop_tokens
    loaded.stop_tokens = (stop_id,)          # the model's end-of-sequence token, for this test
    try:
        ended = client.completions.create(**knobs)
        assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == first + 1
        going = client.completions.create(extra_body={"ignore_eos": True}, **knobs)
        assert going.usage.completion_tokens == 10 and going.choices[0].finish_reason == "length"
        late = client.completions.create(extra_body={"min_tokens": first + 2}, **knobs)
        assert late.usage.completion_tokens >= first + 2
        assert stop_id not in list(late.choices[0].text.encode())[:first + 1]
    finally:
        loaded.stop_tokens = before


def test_penalties_bias_min_p_top_k_and_seed_are_the_engines(client):
    prompt = "a" * 16                                          # the greedy answer repeats a token
    rows = [dict(presence_penalty=2.0), dict(frequency_penalty=2.0), dict(repetition_penalty=2.0),
            dict(logit_bias={"65": 100.0}), dict(temperature=0.9, seed=77, min_p=0.05, top_k=20)]
    knobs = {"presence_penalty": [0.0] * 5, "frequency_penalty": [0.0] * 5, "repetition_penalty": [1.0] * 5,
             "logit_bias": [None] * 5, "temperature": [0.0] * 5, "prompt_seeds": [None] * 5, "min_p": [0.0] * 5,
             "top_k": [0] * 5}
    for i, row in enumerate(rows):
        for key, value in row.items():
            if key == "logit_bias":
                knobs[key][i] = {int(k): v for k, v in value.items()}
            else:
                knobs["prompt_seeds" if key == "seed" else key][i] = value
    want = reference([prompt] * 5, max_new_tokens=8, **knobs).tokens
    assert want[3] == [65] * 8                                 # the bias wins every draw
    for row, tokens in zip(rows, want):
        extra = {k: v for k, v in row.items() if k in ("repetition_penalty", "min_p", "top_k")}
        plain = {k: v for k, v in row.items() if k not in extra}
        answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=8,
                                           **{"temperature": 0, **plain}, extra_body=extra)
        assert answer.choices[0].text == text_of(tokens), row
    greedy = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    assert all(text_of(tokens) != greedy for tokens in want[:3])    # each penalty changes the answer


def test_logprobs_echo_and_chat_logprobs_are_the_models(client):
    want = reference([PROMPT], max_new_tokens=5)
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                       echo=True).choices[0]
    prompt = list(PROMPT.encode())
    assert answer.text == PROMPT + text_of(want.tokens[0])
    logprobs = answer.logprobs
    assert logprobs.tokens == [chr(t) for t in prompt] + [text_of([t]) for t in want.tokens[0]]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.text_offset == list(range(len(prompt) + 5))
    for n, token in enumerate(want.tokens[0]):
        expected = log_softmax(want.logits[0][n])
        at = len(prompt) + n
        assert abs(logprobs.token_logprobs[at] - expected[token]) < 1e-4
        top = np.argsort(-expected, kind="stable")[:2]
        assert set(logprobs.top_logprobs[at]) == {text_of([t]) for t in top} | {text_of([token])}
    assert all(isinstance(v, float) and v <= 0 for v in logprobs.token_logprobs[1:len(prompt)])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(e.token for e in content) == chat.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)
    assert all(e.bytes == list(e.token.encode()) for e in content)
    streamed_logprobs = [e.logprob for chunk in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=3, stream=True) if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content]
    np.testing.assert_allclose(streamed_logprobs, [e.logprob for e in content], atol=1e-5)


def test_batched_prompts_text_and_token_ids_each_get_n_choices(client):
    knobs = dict(model="tiny", max_tokens=5, temperature=1.0, seed=3)
    batch = client.completions.create(prompt=["Hi", PROMPT], n=2, **knobs)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    one = [client.completions.create(prompt=p, n=2, **knobs) for p in ("Hi", PROMPT)]
    assert [c.text for c in batch.choices] == [c.text for answer in one for c in answer.choices]
    assert batch.usage.prompt_tokens == 2 + len(PROMPT) and batch.usage.completion_tokens == 20
    ids = client.completions.create(prompt=[list(b"Hi"), list(PROMPT.encode())], n=2, **knobs)
    assert [c.text for c in ids.choices] == [c.text for c in batch.choices]


def test_tokenize_detokenize_and_version(server):
    tokens = httpx.post(server.base + "/tokenize", json={"model": "tiny", "prompt": "Hé"}, timeout=30).json()
    assert tokens == {"count": 3, "max_model_len": 128, "tokens": list("Hé".encode())}
    chat = httpx.post(server.base + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]},
                      timeout=30).json()
    assert chat["tokens"] == list(b"user: Hi\nassistant:")
    text = httpx.post(server.base + "/detokenize", json={"tokens": tokens["tokens"]}, timeout=30).json()
    assert text == {"prompt": "Hé"}
    bad = httpx.post(server.base + "/detokenize", json={"tokens": [999]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.get(server.base + "/version", timeout=30).json() == {"version": jv.__version__}


def test_a_bad_sampling_value_is_a_400_naming_its_field(server):
    for body, param in [({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"999": 1}}, "logit_bias"),
                        ({"min_tokens": 50, "max_tokens": 5}, "min_tokens"),
                        ({"presence_penalty": 3}, "presence_penalty"),
                        ({"logprobs": 99}, "logprobs"), ({"n": 0}, "n")]:
        response = httpx.post(server.url + "/completions", content=json.dumps(
            {"model": "tiny", "prompt": "a", **body}), headers={"content-type": "application/json"}, timeout=30)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param, (body, response.json())
    response = httpx.post(server.url + "/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"


@pytest.mark.parametrize("pieces, stops, include, sent, stopped", [
    (["a\n", "\nb"], ["\n\n"], False, ["a", ""], "\n\n"),         # split across pieces: "\n" waits
    (["a\n", "\nb"], ["\n\n"], True, ["a", "\n\n"], "\n\n"),
    (["xEN", "D tail", "more"], ["END", "ta"], False, ["x", "", ""], "END"),   # the earliest stop wins
    (["abc", "def"], ["cd", "bcdx"], False, ["", "ab"], "cd"),
    (["abc", "de", ""], ["zzz"], False, ["a", "bc", "", "de"], None),     # held back, then flushed
    (["ab"], [""], False, ["ab", ""], None),                              # an empty stop stops nothing
])
def test_stop_strings_hold_back_what_may_begin_a_stop_and_cut_at_the_first(pieces, stops, include, sent, stopped):
    from jax_vattention.app.server.stop_strings import StopStrings

    matcher = StopStrings(stops, include)
    assert [matcher.push(piece) for piece in pieces] + [matcher.flush()] == sent + [""] * (
        len(pieces) + 1 - len(sent))
    assert matcher.stopped == stopped


def test_echo_streams_the_prompt_first_and_n_chat_choices_stream_by_index(client):
    knobs = dict(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, echo=True, logprobs=1)
    whole = client.completions.create(**knobs).choices[0]
    chunks = list(client.completions.create(stream=True, **knobs))
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == whole.logprobs.tokens
    chat = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=3, seed=4, max_tokens=5,
                temperature=1.0)
    answers = [c.message.content for c in client.chat.completions.create(**chat).choices]
    texts, roles = {}, {}
    for chunk in client.chat.completions.create(stream=True, **chat):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            roles[choice.index] = roles.get(choice.index) or choice.delta.role
    assert [texts[i] for i in range(3)] == answers and set(roles.values()) == {"assistant"}


@pytest.mark.parametrize("body, param", [({"n": 5}, "n"), ({"n": 2, "best_of": 5}, "best_of")])
def test_more_samples_than_slots_names_n_or_best_of(server, body, param):
    """Forked samples need a slot each at once: more than ``max_batch`` can never be served."""
    response = httpx.post(server.url + "/completions", json={"model": "tiny", "prompt": "a", **body}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "5 slots" in error["message"], error


def test_prompt_logprobs_are_the_models_in_vllms_shape(server):
    """vLLM's ``prompt_logprobs``: prompt token k's log-probability after the tokens before it (the
    prefill's), which the numpy reference computes from the logits that chose those tokens when
    they were generated; the greedy tokens rank first."""
    want = reference([PROMPT], max_new_tokens=4)
    prompt = list(PROMPT.encode()) + want.tokens[0]
    response = httpx.post(server.url + "/completions", timeout=60, json={
        "model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 2})
    choice = response.json()["choices"][0]
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(prompt) and entries[0] is None and "logprobs" in choice
    for n, token in enumerate(want.tokens[0]):
        entry = entries[len(PROMPT) + n]
        expected = log_softmax(want.logits[0][n])
        assert abs(entry[str(token)]["logprob"] - expected[token]) < 1e-4
        assert entry[str(token)]["rank"] == 1 and entry[str(token)]["decoded_token"] == text_of([token])
        top = np.argsort(-expected, kind="stable")[:2]
        assert {k for k, v in entry.items() if v["rank"] is not None} == {str(t) for t in top}
    assert all(len(e) <= 3 for e in entries[1:])
    chat = httpx.post(server.url + "/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "prompt_logprobs": 0})
    body = chat.json()
    assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"] and body["prompt_logprobs"][0] is None
    assert all(len(e) == 1 for e in body["prompt_logprobs"][1:])
    for wrong in ({"stream": True}, {"prompt_logprobs": 21}):
        refused = httpx.post(server.url + "/completions", timeout=60, json={
            "model": "tiny", "prompt": "a", "prompt_logprobs": 1, **wrong})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt_logprobs", refused.text


def test_echo_with_max_tokens_0_scores_the_prompt_alone(client, server):
    """OpenAI's legacy scoring call (and vLLM's): ``echo`` with ``max_tokens=0`` answers the prompt
    with its log-probabilities and nothing generated, whole or streamed."""
    knobs = dict(model="tiny", prompt=PROMPT, temperature=0, echo=True, logprobs=1)
    scored = client.completions.create(max_tokens=0, **knobs)
    choice = scored.choices[0]
    with_answer = client.completions.create(max_tokens=3, **knobs).choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert choice.logprobs.tokens == list(PROMPT)
    assert choice.logprobs.token_logprobs == with_answer.logprobs.token_logprobs[:len(PROMPT)]
    chunks = list(client.completions.create(max_tokens=0, stream=True, stream_options={"include_usage": True},
                                            **knobs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == PROMPT
    assert chunks[-1].usage.completion_tokens == 0
    refused = httpx.post(server.url + "/completions", timeout=30,
                         json={"model": "tiny", "prompt": "a", "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def _strict(model, raw: dict, extra_keys=("stop_reason", "prompt_logprobs")) -> None:
    """``raw`` validates strictly against the client's pydantic ``model`` and holds no key the model
    lacks but vLLM's ``extra_keys``. Where OpenAI's own answers are looser than the client's types
    (a stream chunk's ``finish_reason`` null until the last; an echoed prompt's first token without
    a log-probability), the values OpenAI sends are put in the typed form first."""
    import copy

    from pydantic import BaseModel

    typed = copy.deepcopy(raw)
    for choice in typed.get("choices", []):
        if choice.get("finish_reason", "") is None and "text" in choice:
            choice["finish_reason"] = "length"
        logprobs = choice.get("logprobs") or {}
        if "token_logprobs" in logprobs:
            logprobs["token_logprobs"] = [0.0 if v is None else v for v in logprobs["token_logprobs"]]
            logprobs["top_logprobs"] = [{} if v is None else v for v in logprobs["top_logprobs"]]
    parsed = model.model_validate(typed, strict=True)

    def undeclared(value, data, path):
        if isinstance(value, BaseModel) and isinstance(data, dict):
            for key, item in data.items():
                if key not in type(value).model_fields:
                    yield path + key
                else:
                    yield from undeclared(getattr(value, key), item, path + key + ".")
        elif isinstance(value, list) and isinstance(data, list):
            for i, (a, b) in enumerate(zip(value, data)):
                yield from undeclared(a, b, f"{path}{i}.")

    extra = {path for path in undeclared(parsed, typed, "") if path.rsplit(".", 1)[-1] not in extra_keys}
    assert not extra, extra


@pytest.mark.parametrize("endpoint, body", [
    ("completions", {"prompt": PROMPT, "n": 2, "logprobs": 2, "echo": True}),
    ("completions", {"prompt": ["Hi", PROMPT], "n": 2, "best_of": 3, "logprobs": 1, "stop": ["e", "x"]}),
    ("completions", {"prompt": PROMPT, "n": 2, "logprobs": 1, "echo": True, "stream": True,
                     "stream_options": {"include_usage": True}}),
    ("chat/completions", {"n": 2, "logprobs": True, "top_logprobs": 2}),
    ("chat/completions", {"n": 2, "logprobs": True, "top_logprobs": 1, "stream": True,
                          "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
])
def test_answers_validate_strictly_against_the_clients_models(server, endpoint, body):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    request = {"model": "tiny", "max_tokens": 5, "temperature": 1.0, "seed": 3, **body}
    if endpoint == "chat/completions":
        request["messages"] = [{"role": "user", "content": "Hi"}]
    if not body.get("stream"):
        raw = httpx.post(f"{server.url}/{endpoint}", json=request, timeout=60).json()
        _strict(Completion if endpoint == "completions" else ChatCompletion, raw)
        assert [c["index"] for c in raw["choices"]] == list(range(len(raw["choices"])))
        return
    with httpx.stream("POST", f"{server.url}/{endpoint}", json=request, timeout=60) as response:
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    for chunk in chunks:
        _strict(Completion if endpoint == "completions" else ChatCompletionChunk, chunk)
    assert len({(c["id"], c["created"], c["object"]) for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    finished = [c["choices"][0]["index"] for c in chunks[:-1] if c["choices"][0]["finish_reason"] is not None]
    assert sorted(finished) == [0, 1]
