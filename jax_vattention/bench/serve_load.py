"""``vattention bench load``: concurrent clients against a running ``vattention serve``, through the
official ``openai`` client.

``--clients`` clients each send streamed chat requests (``stream_options.include_usage``, so the
token count is the server's) one after the other until ``--requests`` were sent in all. For each
request it measures the time to the first token (from sending to the first chunk with text), the
time per output token (from the first to the last chunk, over the tokens after the first) and the
end-to-end latency; the report gives their p50 / p99, the throughput, the errors, and the server's
own ``/metrics`` figures over the run (preemptions, KV memory). It waits up to ``--wait`` seconds
for ``/health`` first, so it can start beside the server::

    vattention serve --model smollm2-135m --max-batch 64 --max-len 2048 &
    vattention bench load --url http://127.0.0.1:8000/v1 --clients 64 --requests 640
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import random
import time
import urllib.error
import urllib.request

import numpy as np

from jax_vattention.app.cli import standalone

QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea.",
             "Explain what a hash table is.", "Give me a short recipe for pancakes.", "Why is the sky blue?",
             "Summarize the plot of Hamlet in two sentences.", "List five prime numbers.",
             "What does a compiler do?", "Describe a cat to someone who has never seen one."]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 address")
    parser.add_argument("--model", default=None, help="the model name to ask for (default: the server's first)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--requests", type=int, default=640, help="requests in all (default 640)")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_completion_tokens a request (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--wait", type=float, default=600.0,
                        help="seconds to wait for the server's /health before starting (default 600)")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                        help="instead of chat questions: streamed completions of random token ids, U(LO, HI) "
                             "of them (below 256: a byte of any vocabulary), each running to --max-tokens "
                             "(ignore_eos), as serve-bench's workload does")
    parser.add_argument("--seed", type=int, default=0)


@dataclasses.dataclass
class Sample:
    """One request's timings (seconds) and tokens, or its error."""

    ttft: float | None = None
    tpot: float | None = None
    latency: float | None = None
    tokens: int = 0
    error: str | None = None


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_for_health(base: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            status, body = _get(base + "/health")
            if status == 200:
                return
            reason = body
        except (urllib.error.URLError, OSError) as error:
            reason = str(error)
        if time.monotonic() > deadline:
            raise ValueError(f"the server at {base} is not healthy after {seconds:.0f} s ({reason[:200]})")
        time.sleep(1.0)


def scrape(base: str) -> dict[str, float]:
    """The server's unlabelled Prometheus samples by name."""
    _, text = _get(base + "/metrics")
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def one_request(client, model: str, question: str | list[int], max_tokens: int, temperature: float) -> Sample:
    """One streamed request: a chat question, or a completion of token ids run to ``max_tokens``."""
    import openai

    sample = Sample()
    start = time.perf_counter()
    first = last = None
    try:
        if isinstance(question, list):
            stream = await client.completions.create(
                model=model, prompt=question, max_tokens=max_tokens, temperature=temperature, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        else:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], max_completion_tokens=max_tokens,
                temperature=temperature, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and _text(chunk.choices[0]):
                first = first if first is not None else now
                last = now
            if chunk.usage is not None:
                sample.tokens = chunk.usage.completion_tokens
    except openai.APIError as error:
        sample.error = f"{type(error).__name__}: {error}"
        return sample
    sample.latency = time.perf_counter() - start
    if first is not None:
        sample.ttft = first - start
        if sample.tokens > 1:
            sample.tpot = (last - first) / (sample.tokens - 1)
    return sample


def _text(choice) -> str | None:
    delta = getattr(choice, "delta", None)
    return delta.content if delta is not None else choice.text


async def run_clients(args, model: str) -> tuple[list[Sample], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=args.url, api_key="unused", max_retries=0, timeout=600)
    rng = random.Random(args.seed)
    if args.prompt_tokens:
        low, high = args.prompt_tokens
        questions = [[rng.randrange(256) for _ in range(rng.randint(low, high))] for _ in range(args.requests)]
    else:
        questions = [rng.choice(QUESTIONS) for _ in range(args.requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for question in questions:
        queue.put_nowait(question)
    samples: list[Sample] = []

    async def worker():
        while not queue.empty():
            question = queue.get_nowait()
            samples.append(await one_request(client, model, question, args.max_tokens, args.temperature))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    elapsed = time.perf_counter() - start
    await client.close()
    return samples, elapsed


def _percentiles(values: list[float], scale: float = 1e3) -> str:
    if not values:
        return "n/a"
    array = np.asarray(values) * scale
    return f"p50 {np.percentile(array, 50):.1f} ms, p99 {np.percentile(array, 99):.1f} ms"


def run(args: argparse.Namespace) -> int:
    try:
        import openai  # noqa: F401
    except ImportError:
        raise ValueError("vattention bench load needs the openai client: pip install openai") from None
    for name in ("clients", "requests", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.prompt_tokens and not 1 <= args.prompt_tokens[0] <= args.prompt_tokens[1]:
        raise ValueError(f"--prompt-tokens takes LO <= HI, both at least 1; got {args.prompt_tokens}")
    base = args.url.rstrip("/").removesuffix("/v1")
    wait_for_health(base, args.wait)
    model = args.model
    if model is None:
        import json
        _, body = _get(args.url.rstrip("/") + "/models")
        model = json.loads(body)["data"][0]["id"]
    before = scrape(base)
    samples, elapsed = asyncio.run(run_clients(args, model))
    after = scrape(base)
    done = [s for s in samples if s.error is None]
    errors = [s.error for s in samples if s.error is not None]
    tokens = sum(s.tokens for s in done)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    kind = (f"completions of U({args.prompt_tokens[0]}, {args.prompt_tokens[1]}) prompt tokens and "
            f"{args.max_tokens} tokens" if args.prompt_tokens else f"chat requests of at most {args.max_tokens} tokens")
    print(f"vattention bench load, {datetime.date.today()}: {args.clients} concurrent clients, {args.requests} "
          f"streamed {kind}, model {model!r} at {args.url}")
    print(f"finished {len(done)}, failed {len(errors)}; {tokens} tokens in {elapsed:.1f} s: "
          f"{tokens / elapsed:.1f} tokens/s, {len(done) / elapsed:.2f} requests/s")
    print(f"time to first token:   {_percentiles([s.ttft for s in done if s.ttft is not None])}")
    print(f"time per output token: {_percentiles([s.tpot for s in done if s.tpot is not None])}")
    print(f"end-to-end latency:    {_percentiles([s.latency for s in done])}")
    print(f"server: {delta('vattention:num_preemptions_total'):.0f} preemptions, "
          f"{delta('vattention:engine_steps_total'):.0f} engine steps, "
          f"{delta('vattention:engine_driver_failures_total'):.0f} driver failures absorbed; KV cache now "
          f"{after.get('vattention:kv_cache_mapped_bytes', 0) / 2**20:.1f} MiB mapped "
          f"({100 * after.get('vattention:kv_cache_usage_perc', 0):.1f}% of the budget; a static cache: "
          f"{after.get('vattention:kv_cache_static_bytes', 0) / 2**20:.1f} MiB)")
    for error in sorted(set(errors))[:5]:
        print(f"  error ({errors.count(error)}x): {error[:200]}")
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(standalone(__doc__, add_arguments, run))
