"""``vattention serve`` in-process on 127.0.0.1 (tiny model, random weights, CPU), through the official
``openai`` client: completions and chat, streaming or not, concurrent requests, refusals, and a client
that goes away mid-stream."""

import concurrent.futures
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from jax_vattention.app.cli import build_parser  # noqa: E402
from jax_vattention.app.commands.serve import build_service  # noqa: E402
from jax_vattention.app.server.app import create_app  # noqa: E402
from jax_vattention.app.server.chat import ChatFormat  # noqa: E402
from jax_vattention.app.server.text import TextStream  # noqa: E402

MAX_LEN = 256


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    args = build_parser().parse_args(["serve", "--max-len", str(MAX_LEN), "--max-batch", "4",
                                      "--token-budget", "16", "--chunk-tokens", "4"])
    service = build_service(args)
    port = free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                                   log_level="warning", log_config=None))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield service, f"http://127.0.0.1:{port}/v1"
    uvicorn_server.should_exit = True
    thread.join(30)
    service.replicas.stop()
    service.replicas.engine.manager.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0, timeout=60)


def wait_idle(service, timeout=30.0) -> dict:
    """The engine's stats once no request holds a slot (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = service.replicas.stats()
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["active_slots"] == 0:
            return stats
        assert time.monotonic() < deadline, f"requests still hold slots: {stats}"
        time.sleep(0.05)


def test_models_and_health(client, server):
    assert [model.id for model in client.models.list()] == ["tiny"]
    import httpx
    health = httpx.get(server[1].removesuffix("/v1") + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["active_slots"] == 0


def test_completion_greedy_is_deterministic_and_streams_the_same_text(client):
    whole = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "length"
    assert whole.usage.prompt_tokens == 5 and whole.usage.completion_tokens == 12
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0,
                                            stream=True))
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(chunk.choices[0].text for chunk in chunks) == choice.text


def test_chat_whole_and_streamed(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    # no chat template with random weights: "system: Be brief.\nuser: Hi\nassistant:"
    assert whole.usage.prompt_tokens == len("system: Be brief.\nuser: Hi\nassistant:")
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_concurrent_requests_each_get_their_own_answer(client, server):
    prompts = ["one", "two", "three", "four", "five", "six"]

    def ask(prompt):
        answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
        return answer.choices[0].text, answer.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert all(count == 10 for _, count in together)
    assert ask("three") == together[2]     # greedy: the same answer alone as in company
    wait_idle(server[0])


@pytest.mark.parametrize("kwargs, status, message", [
    (dict(model="gpt-4", prompt="hi"), 404, "the model 'gpt-4' does not exist"),
    (dict(model="tiny", prompt=""), 400, "the prompt is empty"),
    (dict(model="tiny", prompt="hi", max_tokens=MAX_LEN + 1), 400, f"max_len={MAX_LEN}"),
    (dict(model="tiny", prompt="hi", temperature=3.0), 400, "temperature"),
    (dict(model="tiny", prompt="hi", top_p=0.0), 400, "top_p"),
    (dict(model="tiny", prompt="hi", suffix="!"), 400, "no text after the completion (suffix)"),
])
def test_bad_requests_are_refused_with_a_message(client, kwargs, status, message):
    with pytest.raises(openai.APIStatusError) as refusal:
        client.completions.create(**kwargs)
    assert refusal.value.status_code == status
    assert message in refusal.value.message
    assert refusal.value.body["message"] == refusal.value.message.split(" - ", 1)[-1]


def test_chat_without_messages_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=4)


def test_a_client_that_disconnects_frees_its_slot_and_pages(client, server):
    service = server[0]
    tokens_before = service.replicas.engine.stats.tokens
    max_tokens = MAX_LEN - 8
    stream = client.completions.create(model="tiny", prompt="Go on", max_tokens=max_tokens, stream=True)
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    stream.close()                                   # the client goes away mid-answer
    stats = wait_idle(service)
    assert service.replicas.engine.stats.tokens - tokens_before < max_tokens, "it ran to the end"
    assert stats["used_tokens"] == 0
    service.replicas.engine.manager.reclaim()     # nothing holds a page: all of them go back
    assert service.replicas.stats()["mapped_pages"] == 0


def test_chat_format_template_or_plain_lines():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert ChatFormat().render(messages) == "system: Be brief.\nuser: Hi\nassistant:"
    pytest.importorskip("jinja2")
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    chat = ChatFormat(template, {"bos_token": "<s>", "eos_token": "</s>"})
    assert chat.description == "the checkpoint's chat template"
    assert chat.render(messages) == "<s><|system|>Be brief.<|user|>Hi<|assistant|>"
    ended = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    begun = messages + [{"role": "assistant", "content": "Hello "}]
    assert ChatFormat(ended).render(begun, add_generation_prompt=False, continue_final=True) == \
        "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello"          # open: no end of turn
    with pytest.raises(ValueError, match="continue_final_message"):
        ChatFormat("{% for m in messages %}{{ m['role'] }}{% endfor %}").render(begun, False, continue_final=True)


def test_text_stream_holds_a_split_character_and_drops_stop_tokens():
    from jax_vattention.app.commands.model_source import ByteTokenizer

    text = TextStream(ByteTokenizer(), stop_tokens=(1,))
    euro = list("€".encode())                        # three bytes, one character
    assert [text.push(euro[0]), text.push(euro[1]), text.push(euro[2])] == ["", "", "€"]
    assert text.push(ord("a")) == "a"
    assert text.push(1, final=True) == "" and text.count == 5
