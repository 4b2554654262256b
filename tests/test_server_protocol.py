"""The server's protocol, through the official ``openai`` client (and raw HTTP where the client cannot
send the mistake): every request field honoured or refused with a 400 naming it, ``max_completion_tokens``,
``stream_options.include_usage`` and the usage block, OpenAI's error shape on every error path, the
served names and ``/v1/models/{id}``."""

import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from server_harness import start_server  # noqa: E402

from jax_vattention.app.server.limits import ServerLimits  # noqa: E402
from jax_vattention.app.server.protocol import CHAT, COMPLETIONS, REFUSED  # noqa: E402

MAX_LEN = 256

# A value that asks for something, for every field of REFUSED (a new row needs one here).
ASKING = {
    "suffix": "!", "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto", "functions": [{"name": "f", "parameters": {}}], "function_call": "auto",
    "parallel_tool_calls": "yes", "audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "low", "web_search_options": {},
    "store": True, "service_tier": "flex", "verbosity": "low",
    "moderation": {"model": "omni-moderation-latest"},
}
# A value that asks for nothing, where it differs from leaving the field out.
NEUTRAL = {"suffix": "", "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
           "parallel_tool_calls": False, "store": False, "modalities": ["text"], "service_tier": "auto"}
# The sampling fields at their defaults: accepted, and the answer is the one without them.
DEFAULTS = {"n": 1, "seed": None, "stop": [], "presence_penalty": 0.0, "frequency_penalty": 0,
            "repetition_penalty": 1.0, "min_p": 0, "logit_bias": {}, "min_tokens": 0, "ignore_eos": False,
            "stop_token_ids": []}


@pytest.fixture(scope="module")
def server():
    running = start_server(max_len=MAX_LEN, names=["tiny-short", "tiny"])
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def post(server, path, content, headers=None):
    return httpx.post(server.base + path, content=content, timeout=30,
                      headers={"content-type": "application/json", **(headers or {})})


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def chat(text="Hi"):
    return [{"role": "user", "content": text}]


def test_max_completion_tokens_bounds_a_chat_answer_and_wins_over_max_tokens(client):
    answer = client.chat.completions.create(model="tiny", messages=chat(), max_completion_tokens=5, temperature=0)
    assert answer.usage.completion_tokens == 5 and answer.choices[0].finish_reason == "length"
    both = client.chat.completions.create(model="tiny", messages=chat(), max_completion_tokens=3, max_tokens=9,
                                          temperature=0)
    assert both.usage.completion_tokens == 3
    assert both.usage.prompt_tokens == len("user: Hi\nassistant:")
    assert both.usage.total_tokens == both.usage.prompt_tokens + 3


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT])
def test_stream_include_usage_ends_with_the_usage(client, endpoint):
    options = dict(model="tiny", max_tokens=7, temperature=0, stream=True, stream_options={"include_usage": True})
    if endpoint == CHAT:
        chunks = list(client.chat.completions.create(messages=chat(), **options))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        whole = client.chat.completions.create(model="tiny", messages=chat(), max_tokens=7, temperature=0)
        assert text == whole.choices[0].message.content
    else:
        chunks = list(client.completions.create(prompt="Hello", **options))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 7
    assert last.usage.prompt_tokens == (len("user: Hi\nassistant:") if endpoint == CHAT else 5)
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == ["length"]
    plain = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, stream=True))
    assert all(getattr(chunk, "usage", None) is None for chunk in plain)


def test_stream_options_without_stream_is_refused(server):
    error = error_of(post(server, "/v1/completions", json.dumps(
        {"model": "tiny", "prompt": "a", "stream_options": {"include_usage": True}})), 400)
    assert error["param"] == "stream_options"


def test_every_refused_field_is_named_with_the_reason(server):
    assert set(ASKING) == set(REFUSED), "every refused field needs a value that asks for it here"
    for name, refused in REFUSED.items():
        for endpoint in sorted(refused.endpoints):
            path, body = ("/v1/completions", {"prompt": "a"}) if endpoint == COMPLETIONS else \
                ("/v1/chat/completions", {"messages": chat()})
            response = post(server, path, json.dumps({"model": "tiny", **body, name: ASKING[name]}))
            error = error_of(response, 400)
            assert error["param"] == name and error["code"] == "unsupported_parameter", (name, error)
            assert refused.why in error["message"]


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT])
def test_fields_that_ask_for_nothing_are_accepted(client, endpoint):
    neutral = {name: value for name, value in NEUTRAL.items() if endpoint in REFUSED[name].endpoints}
    neutral.update(DEFAULTS)
    if endpoint == CHAT:
        answer = client.chat.completions.create(model="tiny", messages=chat(), max_tokens=2, temperature=0,
                                                user="someone", extra_body=neutral)
    else:
        answer = client.completions.create(model="tiny", prompt="a", max_tokens=2, temperature=0, user="someone",
                                           extra_body=neutral)
    assert answer.usage.completion_tokens == 2


@pytest.mark.parametrize("path, field", [
    ("/v1/completions", "frobnicate"), ("/v1/completions", "messages"), ("/v1/completions", "top_logprobs"),
    ("/v1/chat/completions", "echo"), ("/v1/chat/completions", "prompt"), ("/v1/chat/completions", "best_of"),
])
def test_unknown_fields_and_the_other_endpoints_fields_are_refused(server, path, field):
    body = {"model": "tiny", field: 1, **({"prompt": "a"} if "chat" not in path else {"messages": chat()})}
    error = error_of(post(server, path, json.dumps(body)), 400)
    assert error["param"] == field and f"unrecognized request argument supplied: {field}" in error["message"]


@pytest.mark.parametrize("content, param, message", [
    (b'{"model": "tiny", "prompt": ', None, "not valid JSON"),
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', None, "not UTF-8"),
    (b'{"model": "tiny", "prompt": "a\\ud800b"}', "prompt", "lone UTF-16 surrogate"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages.0.content", "surrogate"),
    (b'[1, 2]', None, "must be a JSON object"),
    (b'{"model": "tiny", "prompt": "a", "temperature": NaN}', None, "not valid JSON"),
    (b'{"model": "tiny", "prompt": "a", "temperature": "hot"}', "temperature", "valid number"),
    (b'{"model": "tiny", "prompt": "a", "temperature": 2.5}', "temperature", "less than or equal to 2"),
    (b'{"model": "tiny", "prompt": "a", "max_tokens": 0}', "max_tokens", "needs echo=true"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 0}', "max_tokens",
     "greater than or equal to 1"),
    (b'{"prompt": "a"}', "model", "is required"),
    (b'{"model": "tiny", "prompt": []}', "prompt", "the prompt is empty"),
    (b'{"model": "tiny", "prompt": [1, 99999]}', "prompt", "outside the vocabulary"),
    (b'{"model": "tiny", "messages": []}', "messages", "at least 1 item"),
    (b'{"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}', "messages.0.role", "not supported"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x", "tool_calls": []}]}',
     "messages.0.tool_calls", "only for assistant messages"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     "messages.0.content", ""),
], ids=lambda value: value if isinstance(value, str) else None)
def test_malformed_bodies_get_openai_errors_naming_the_field(server, content, param, message):
    path = "/v1/chat/completions" if b"messages" in content else "/v1/completions"
    error = error_of(post(server, path, content), 400)
    assert error["param"] == param or (param and error["param"].startswith(param)), error
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_framework_errors_have_openai_shape(server):
    missing = error_of(httpx.get(server.base + "/v1/nothing", timeout=10), 404)
    assert "/v1/nothing" in missing["message"]
    wrong_method = error_of(httpx.get(server.url + "/completions", timeout=10), 405)
    assert "GET" in wrong_method["message"]
    with pytest.raises(openai.NotFoundError) as unknown:
        openai.OpenAI(base_url=server.url, api_key="x", max_retries=0).models.retrieve("gpt-4")
    assert unknown.value.body["code"] == "model_not_found"


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    service = server.service
    before = service.limits
    service.limits = ServerLimits(max_body_bytes=1000)
    try:
        error = error_of(post(server, "/v1/completions", json.dumps({"model": "tiny", "prompt": "a" * 2000})), 413)
        assert error["code"] == "request_too_large" and "1000" in error["message"]
    finally:
        service.limits = before


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x" * (MAX_LEN + 1)}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_LEN + 1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": chat("x" * MAX_LEN)}, "messages"),
    ("/v1/chat/completions", {"messages": chat(), "max_completion_tokens": MAX_LEN}, "max_completion_tokens"),
])
def test_a_request_too_long_for_the_cache_names_its_field(server, path, body, param):
    error = error_of(post(server, path, json.dumps({"model": "tiny", **body})), 400)
    assert error["param"] == param and f"max_len={MAX_LEN}" in error["message"]


@pytest.mark.parametrize("body, param", [({"n": 5}, "n"), ({"prompt": ["a"] * 3, "n": 2}, "n"),
                                         ({"prompt": ["a"] * 5}, "prompt")])
def test_one_request_may_not_ask_for_more_answers_than_the_queue_holds(server, body, param):
    """Without forks each sample is an engine request: ``n`` or a batch beyond ``--max-waiting`` is
    refused whole, rather than filling the queue alone (and turning every other client away)."""
    service = server.service
    before = service.limits
    service.limits = ServerLimits(max_waiting=4)
    try:
        error = error_of(post(server, "/v1/completions", json.dumps(
            {"model": "tiny", "prompt": "a", "max_tokens": 2, **body})), 400)
        assert error["param"] == param and "--max-waiting" in error["message"], error
        assert server.engine.idle
    finally:
        service.limits = before


def test_a_prompt_limit_below_max_len(server):
    service = server.service
    before = service.limits
    service.limits = ServerLimits(max_prompt_tokens=10)
    try:
        error = error_of(post(server, "/v1/completions", json.dumps({"model": "tiny", "prompt": "x" * 11})), 400)
        assert error["param"] == "prompt" and "at most 10 prompt tokens" in error["message"]
    finally:
        service.limits = before


def test_names_models_and_model_by_id(client):
    assert [model.id for model in client.models.list()] == ["tiny-short", "tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    by_short = client.completions.create(model="tiny-short", prompt="Hi", max_tokens=4, temperature=0)
    by_own = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0)
    assert by_short.choices[0].text == by_own.choices[0].text and by_own.model == "tiny-short"


def test_a_prompt_of_token_ids_is_the_prompt_of_their_text(client):
    text = client.completions.create(model="tiny", prompt="Hi!", max_tokens=6, temperature=0)
    ids = client.completions.create(model="tiny", prompt=[ord(c) for c in "Hi!"], max_tokens=6, temperature=0)
    assert ids.choices[0].text == text.choices[0].text and ids.usage.prompt_tokens == 3


def test_content_parts_are_joined_as_text(client):
    parts = [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]
    joined = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}],
                                            max_tokens=5, temperature=0)
    plain = client.chat.completions.create(model="tiny", messages=chat("Hi"), max_tokens=5, temperature=0)
    assert joined.choices[0].message.content == plain.choices[0].message.content


def test_top_k_is_honoured(client):
    """top_k=1 samples the most likely token: at any temperature, the greedy answer."""
    greedy = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0)
    top1 = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.5,
                                     extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy.choices[0].text


# ---------------------------------------------------------------- the audit against the openai client
def test_a_field_of_several_shapes_is_named_itself_with_what_is_wrong_inside(server):
    """A mixed prompt list, a non-text content part: the param is the field (no pydantic shape tag
    such as ``prompt.str``), and the message says what inside it is wrong."""
    mixed = error_of(post(server, "/v1/completions", json.dumps({"model": "tiny", "prompt": ["a", [1]]})), 400)
    assert mixed["param"] == "prompt" and "all of one kind" in mixed["message"], mixed
    image = {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}
    part = error_of(post(server, "/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, image]}]})), 400)
    assert part["param"] == "messages.0.content.1" and "image_url" in part["message"], part
    number = error_of(post(server, "/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": 5}]})), 400)
    assert number["param"] == "messages.0.content", number


@pytest.mark.parametrize("body, param", [
    ({"logit_bias": {"\u0663": 5}}, "logit_bias"),       # an Arabic-Indic digit: str.isdigit, not a token id
    ({"stop": ""}, "stop"), ({"stop": ["x", ""]}, "stop"),  # vLLM: an empty stop string would end at once
])
def test_values_openai_and_vllm_refuse(server, body, param):
    error = error_of(post(server, "/v1/completions", json.dumps({"model": "tiny", "prompt": "a", **body})), 400)
    assert error["param"] == param, error


def test_openais_cache_and_safety_hints_change_nothing_and_the_others_are_refused(client):
    plain = client.chat.completions.create(model="tiny", messages=chat(), max_tokens=6, temperature=0)
    parts = [{"type": "text", "text": "Hi", "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "30m"}}]
    hinted = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=6, temperature=0,
        prompt_cache_key="k", prompt_cache_retention="24h", prompt_cache_options={"mode": "implicit", "ttl": "30m"},
        safety_identifier="someone", metadata={"team": "a", "run": "7"})
    assert hinted.choices[0].message.content == plain.choices[0].message.content
    for options, accepted in [({"include_obfuscation": False}, True), ({"include_obfuscation": True}, False),
                              ({"include_usage": True, "continuous_usage_stats": False}, True)]:
        request = dict(model="tiny", messages=chat(), max_tokens=2, stream=True, stream_options=options)
        if accepted:
            assert list(client.chat.completions.create(**request))
            continue
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**request)
        assert refused.value.body["param"] == "stream_options.include_obfuscation"
    for wrong, param in [({"prompt_cache_retention": "forever"}, "prompt_cache_retention"),
                         ({"metadata": {str(i): "x" for i in range(17)}}, "metadata"),
                         ({"metadata": {"a": 1}}, "metadata")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=chat(), **wrong)
        assert refused.value.body["param"].split(".")[0] == param, refused.value.body


def test_an_assistant_message_as_openai_answers_it_is_history(client, server):
    """The client sends an answer's message back as it came (``refusal``, ``tool_calls``... null);
    a refusal is what the assistant said; tool calls, tool messages and audio are refused by name."""
    first = client.chat.completions.create(model="tiny", messages=chat(), max_tokens=4, temperature=0)
    said = first.choices[0].message.content
    as_answered = {"role": "assistant", "content": said, "refusal": None, "tool_calls": None,
                   "function_call": None, "audio": None}
    follow = chat() + [as_answered, {"role": "user", "content": "More"}]
    plain = chat() + [{"role": "assistant", "content": said}, {"role": "user", "content": "More"}]
    knobs = dict(model="tiny", max_tokens=5, temperature=0)
    again = client.chat.completions.create(messages=follow, **knobs).choices[0].message.content
    assert again == client.chat.completions.create(messages=plain, **knobs).choices[0].message.content
    resent = chat() + [first.choices[0].message, {"role": "user", "content": "More"}]
    assert client.chat.completions.create(messages=resent, **knobs).choices[0].message.content == again
    refusal = [{"role": "assistant", "content": None, "refusal": "No."}, {"role": "user", "content": "x"}]
    as_part = [{"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
               {"role": "user", "content": "x"}]
    as_text = [{"role": "assistant", "content": "No."}, {"role": "user", "content": "x"}]
    answers = {client.chat.completions.create(messages=m, **knobs).choices[0].message.content
               for m in (refusal, as_part, as_text)}
    assert len(answers) == 1
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    for messages, param in [
            ([{"role": "assistant", "content": None, "tool_calls": [call]}], "messages.0.tool_calls"),
            ([{"role": "tool", "content": "x", "tool_call_id": "c"}], "messages.0.role"),
            ([{"role": "assistant", "content": "x", "audio": {"id": "a"}}], "messages.0.audio"),
            ([{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}], "messages.0.content"),
            ([{"role": "assistant", "content": None}], "messages.0")]:
        error = error_of(post(server, "/v1/chat/completions", json.dumps({"model": "tiny", "messages": messages})),
                         400)
        assert error["param"] == param, (messages, error)


def test_every_chunk_of_a_stream_has_the_requests_created_time(client, monkeypatch):
    """OpenAI's chunks share ``created``: a clock that ticks a second per reading must not show."""
    import itertools
    import time

    real, ticks = time.time, itertools.count()
    monkeypatch.setattr(time, "time", lambda: real() + next(ticks))
    chunks = list(client.completions.create(model="tiny", prompt="Hi", max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    chat_chunks = list(client.chat.completions.create(model="tiny", messages=chat(), max_tokens=6, stream=True))
    monkeypatch.undo()
    assert len(chunks) > 2 and len({c.created for c in chunks}) == 1
    assert len({c.created for c in chat_chunks}) == 1


def test_continuous_usage_stats_give_every_chunk_the_usage_so_far(client):
    chunks = list(client.completions.create(
        model="tiny", prompt="Hello", max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]      # a chunk may carry several tokens (held text)
    assert counts == sorted(counts) and 1 <= counts[0] and counts[-2:] == [5, 5] and chunks[-1].choices == []
    assert all(c.usage.prompt_tokens == 5 and c.usage.total_tokens == 5 + c.usage.completion_tokens for c in chunks)


def test_vllms_chat_rendering_fields_and_add_special_tokens(client, server, monkeypatch):
    """``continue_final_message`` ends the prompt inside the last message (the answer continues it),
    ``add_generation_prompt=false`` leaves the answer unopened, ``add_special_tokens`` reaches the
    tokenizer (one whose BOS is 255, here), for chat, completions and ``/tokenize`` alike."""
    knobs = dict(model="tiny", max_tokens=6, temperature=0)
    begun = chat() + [{"role": "assistant", "content": "He"}]
    rendering = {"continue_final_message": True, "add_generation_prompt": False}
    continued = client.chat.completions.create(messages=begun, extra_body=rendering, **knobs)
    text = "user: Hi\nassistant: He"
    assert continued.choices[0].message.content == client.completions.create(prompt=text, **knobs).choices[0].text
    assert continued.usage.prompt_tokens == len(text)
    tokens = httpx.post(server.base + "/tokenize", json={"messages": begun, **rendering}, timeout=30).json()["tokens"]
    assert tokens == list(text.encode())
    unopened = client.chat.completions.create(messages=chat(), extra_body={"add_generation_prompt": False}, **knobs)
    assert unopened.usage.prompt_tokens == len("user: Hi")
    both = error_of(post(server, "/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": begun, "continue_final_message": True})), 400)
    assert both["param"] == "continue_final_message"
    loaded = server.service.loaded
    encode = loaded.encode
    monkeypatch.setattr(loaded, "encode", lambda text, add_special_tokens=True: [255] * add_special_tokens +
                        encode(text, add_special_tokens))
    one = dict(model="tiny", max_tokens=1)
    assert client.completions.create(prompt="Hi", **one).usage.prompt_tokens == 3
    unmarked = client.completions.create(prompt="Hi", extra_body={"add_special_tokens": False}, **one)
    assert unmarked.usage.prompt_tokens == 2
    plain = len("user: Hi\nassistant:")        # no chat template: the tokenizer's BOS by default
    assert client.chat.completions.create(messages=chat(), **one).usage.prompt_tokens == plain + 1
    assert client.chat.completions.create(messages=chat(), extra_body={"add_special_tokens": False},
                                          **one).usage.prompt_tokens == plain
