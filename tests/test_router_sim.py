"""The router simulation (``vattention bench router``): a tiny trace, prefix-aware routing against
round-robin and least-loaded."""

import argparse

import pytest

from jax_vattention.app.cli import build_parser, main
from jax_vattention.app.server import routing
from jax_vattention.bench import router_sim

TINY = ["--replicas", "3", "--conversations", "24", "--rate", "6", "--system-prompts", "4", "--system-tokens", "128",
        "--max-batch", "4", "--budget-pages", "256"]


def tiny_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", "router", *TINY, *extra])


def test_the_simulation_routes_by_the_servers_own_rule():
    assert router_sim.preference is routing.preference


def test_prefix_aware_routing_beats_round_robin_on_hit_rate_and_computes_less():
    args = tiny_args()
    trace = router_sim.synthetic_trace(args)
    rows = {policy: router_sim.simulate(trace, policy, args) for policy in router_sim.POLICIES}
    assert all(row["requests"] == len(trace) for row in rows.values())
    aware, robin, least = rows["prefix-aware"], rows["round-robin"], rows["least-loaded"]
    assert aware["hit_rate"] > robin["hit_rate"] and aware["hit_rate"] > least["hit_rate"], rows
    assert aware["computed_tokens"] < robin["computed_tokens"], rows
    # Hits can only be what the trace shares: never more than the prompt tokens.
    assert all(0 <= row["hit_rate"] < 1 for row in rows.values())
    # The same trace and policy give the same figures.
    assert router_sim.simulate(trace, "prefix-aware", args) == aware


def test_the_command_prints_a_table_and_refuses_bad_numbers(capsys):
    assert main(["bench", "router", *TINY, "--policies", "prefix-aware", "round-robin"]) == 0
    printed = capsys.readouterr().out
    assert "| policy | prefix hit rate |" in printed
    assert "| prefix-aware |" in printed and "| round-robin |" in printed and "least-loaded" not in printed
    assert main(["bench", "router", "--replicas", "0"]) == 2
    assert "--replicas must be at least 1" in capsys.readouterr().out


def test_a_request_larger_than_the_budget_is_refused():
    args = tiny_args("--budget-pages", "4")
    with pytest.raises(ValueError, match="--budget-pages 4"):
        router_sim.simulate(router_sim.synthetic_trace(args), "round-robin", args)
