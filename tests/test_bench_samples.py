"""``vattention bench samples`` on the CPU's fake driver: its page counts against the page arithmetic.

The reference is arithmetic, not the manager: the tiny model's interleaved cache in float32 has two
buffers (K and V) of ``layers * kv_heads * head_dim * 4`` bytes a token, so a slot of ``t`` tokens
holds ``2 * ceil(t / tokens_per_page)`` pages. A sample holds ``prompt + new - 1`` tokens (its last
token is never written); a fork shares the prompt's full pages but the last one (its last prompt
token is each sample's own), and copies the partly filled page.
"""

import csv
import math

import pytest

from jax_vattention.app import cli
from jax_vattention.bench import samples

PROMPT, SAMPLES, NEW, PAGE = 45, 3, 8, 4096


def pages(tokens: int, per_page: int) -> int:
    return 2 * math.ceil(tokens / per_page)


def test_forked_samples_prefill_once_and_hold_the_page_arithmetic(model, tmp_path, capsys):
    out = tmp_path / "samples.csv"
    args = cli.build_parser().parse_args([
        "bench", "samples", "--config", "tiny", "--fake-driver", "--page-kib", str(PAGE // 1024),
        "--prompt-len", str(PROMPT), "--samples", str(SAMPLES), "--max-new-tokens", str(NEW), "--repeats", "1",
        "--token-budget", "16", "--chunk-tokens", "8", "--out", str(out)])
    assert samples.run(args, model=model) == 0    # the session's tiny model: its weights are made once
    printed = capsys.readouterr().out
    with open(out) as file:
        single, forked, independent = csv.DictReader(file)

    config = model.config
    per_page = PAGE // (config.num_layers * config.num_kv_heads * config.head_dim * 4)
    held = pages(PROMPT + NEW - 1, per_page)           # one sample's pages, all of them mapped
    shared = 2 * ((PROMPT - 1) // per_page)           # the prompt's full pages a fork shares
    target = pages(PROMPT, per_page) + SAMPLES * (held - pages(PROMPT, per_page))
    assert 0 < shared < held                          # this prompt has a partly filled last page

    # The prompt ran once for the forked samples, once each for the independent ones.
    assert [int(row["prefills"]) for row in (single, forked, independent)] == [1, 1, SAMPLES]
    assert [int(row["prefill_tokens"]) for row in (single, forked, independent)] == [PROMPT, PROMPT - 1,
                                                                                     SAMPLES * PROMPT]
    # Peak pages: every sample maps its whole range; only the forks' share one physical copy.
    assert int(single["peak_physical_pages"]) == held
    assert int(forked["peak_mapped_pages"]) == SAMPLES * held
    assert int(forked["peak_physical_pages"]) == shared + SAMPLES * (held - shared)
    assert int(independent["peak_physical_pages"]) == SAMPLES * held
    assert int(forked["peak_physical_pages"]) < int(independent["peak_physical_pages"])

    # The ratios it reports are those page counts over the arithmetic's.
    assert int(forked["target_pages"]) == target
    assert float(forked["memory_vs_target"]) == pytest.approx(int(forked["peak_physical_pages"]) / target, abs=1e-4)
    assert float(forked["memory_vs_n1"]) == pytest.approx(int(forked["peak_physical_pages"]) / held, abs=1e-4)
    prompt_pages = pages(PROMPT, per_page)
    assert (f"target pages: one prompt {prompt_pages} + {SAMPLES} tails of {held - prompt_pages} = {target} pages"
            in printed)
    assert f"memory forked / target pages: {int(forked['peak_physical_pages']) / target:.3f}" in printed
    assert "FAKE DRIVER" in printed and "not judged" in printed   # no timing verdict from the fake driver

    # The samples differ (temperature 1, seeds seed + i) and are the independent requests' tokens.
    assert int(forked["distinct_outputs"]) == SAMPLES
    assert forked["same_tokens_as_independent"] == "True"


def test_refuses_where_the_cache_cannot_fork(tmp_path, capsys):
    """The CPU backend's own memory cannot alias a page: the benchmark says so instead of timing n
    prefills as forks."""
    with pytest.raises(SystemExit) as exit:
        cli.main(["bench", "samples", "--config", "tiny", "--prompt-len", "8", "--samples", "2",
                  "--max-new-tokens", "2", "--out", str(tmp_path / "samples.csv")])
    assert exit.value.code == 2
    assert "forks are unavailable here" in capsys.readouterr().err
    assert not (tmp_path / "samples.csv").exists()
