"""``vattention bench load`` against the server in-process: concurrent streamed chat requests, their
first-token and per-token latencies, and the server's own figures."""

import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from server_harness import start_server  # noqa: E402

from jax_vattention.app.cli import build_parser  # noqa: E402
from jax_vattention.bench import serve_load  # noqa: E402


def test_load_reports_latency_percentiles_of_every_request(capsys):
    server = start_server(sampling=False)
    try:
        args = build_parser().parse_args(["bench", "load", "--url", server.url, "--clients", "3", "--requests", "7",
                                          "--max-tokens", "5", "--wait", "10"])
        assert serve_load.run(args) == 0
        chat = capsys.readouterr().out
        # serve-bench's workload over HTTP: token-id prompts of U(LO, HI), every answer to --max-tokens.
        args = build_parser().parse_args(["bench", "load", "--url", server.url, "--clients", "2", "--requests", "4",
                                          "--max-tokens", "6", "--prompt-tokens", "10", "30", "--wait", "10"])
        assert serve_load.run(args) == 0
        tokens = capsys.readouterr().out
    finally:
        server.stop()
    assert "3 concurrent clients, 7 streamed chat requests of at most 5 tokens, model 'tiny'" in chat
    assert "finished 7, failed 0; 35 tokens" in chat
    for line in ("time to first token:   p50", "time per output token: p50", "end-to-end latency:    p50"):
        assert line in chat
    assert "engine steps" in chat and "MiB mapped" in chat
    assert "2 concurrent clients, 4 streamed completions of U(10, 30) prompt tokens and 6 tokens" in tokens
    assert "finished 4, failed 0; 24 tokens" in tokens
