"""The options that join a job of several processes, checked before anything starts."""

import argparse

import pytest

from jax_vattention.app.processes import DEFAULT_TIMEOUT, Processes, add_process_arguments, initialize


def options(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_process_arguments(parser)
    return parser.parse_args(list(argv))


def test_no_coordinator_is_one_process(monkeypatch):
    for variable in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(variable, raising=False)
    assert initialize(options()) == Processes(0, 1, DEFAULT_TIMEOUT)
    assert Processes(0, 3).leader and Processes(0, 3).followers == [1, 2] and not Processes(2, 3).leader


@pytest.mark.parametrize("argv, message", [
    (("--num-processes", "2"), "need --coordinator"),
    (("--process-id", "1"), "need --coordinator"),
    (("--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"), "between 0 and 1"),
    (("--coordinator", "localhost:1", "--num-processes", "0"), "at least 1"),
    (("--coordinator", "localhost:1", "--process-timeout", "0"), "must be positive"),
])
def test_options_that_describe_no_job_are_refused(monkeypatch, argv, message):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    with pytest.raises(ValueError, match=message):
        initialize(options(*argv))


def test_the_environment_names_the_count_and_id(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer"):
        initialize(options("--coordinator", "localhost:1"))
