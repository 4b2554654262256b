"""One job over several processes or hosts: ``--coordinator``, ``--num-processes``, ``--process-id``.

JAX's own distributed runtime joins the processes (``jax.distributed.initialize``: a coordinator,
one process per host, a global view of every process's devices; collectives over NCCL on GPUs and
gloo on CPUs). A mesh over ``--tp`` devices then spans processes: each process holds the weights
and the cache pages of its own devices, and runs the same compiled steps. ``generate`` and
``serve-bench`` are the same program on every process (same inputs, same plan); ``serve`` runs
HTTP on process 0 and replays its engine's calls on the others
(:mod:`~jax_vattention.engine.lockstep`).

Without the flags, the environment variables JAX itself reads (``JAX_COORDINATOR_ADDRESS``, and a
cluster JAX detects, such as SLURM or Open MPI, for the process count and id) start the same;
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` fill in the count and id where no cluster does.

Example (two processes on one machine, one CPU device each)::

    vattention generate --tp 2 --coordinator localhost:12345 --num-processes 2 --process-id 0 &
    vattention generate --tp 2 --coordinator localhost:12345 --num-processes 2 --process-id 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax

# Seconds a process may go unheard (JAX's heartbeat, and the lockstep's waits) before the others stop.
DEFAULT_TIMEOUT = 60


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place in the job: its id, the process count, and the timeout in seconds."""

    process_id: int = 0
    count: int = 1
    timeout: float = DEFAULT_TIMEOUT

    @property
    def leader(self) -> bool:
        """Process 0: it reads the prompts' results out and serves HTTP."""
        return self.process_id == 0

    @property
    def followers(self) -> list[int]:
        return list(range(1, self.count))


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several processes or hosts (jax.distributed)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="process 0's address for JAX's coordination service (default: "
                            "JAX_COORDINATOR_ADDRESS, else one process)")
    group.add_argument("--num-processes", type=int, default=None,
                       help="processes in the job (default: JAX_NUM_PROCESSES or the cluster's)")
    group.add_argument("--process-id", type=int, default=None,
                       help="this process's id, 0 to N-1 (default: JAX_PROCESS_ID or the cluster's)")
    group.add_argument("--process-timeout", type=float, default=DEFAULT_TIMEOUT,
                       help=f"seconds a process may go unheard before the others stop (default {DEFAULT_TIMEOUT})")


def initialize(args: argparse.Namespace) -> Processes:
    """Joins the job the options (or the environment) describe, before JAX touches a device; a single
    process without either. ``ValueError`` for options that cannot describe a job."""
    coordinator = getattr(args, "coordinator", None) or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = _option(args, "num_processes", "JAX_NUM_PROCESSES")
    process_id = _option(args, "process_id", "JAX_PROCESS_ID")
    timeout = float(getattr(args, "process_timeout", DEFAULT_TIMEOUT))
    if coordinator is None:
        if count not in (None, 1) or process_id not in (None, 0):
            raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT (process 0's "
                             "address), or JAX_COORDINATOR_ADDRESS")
        return Processes(timeout=timeout)
    if timeout <= 0:
        raise ValueError(f"--process-timeout must be positive, got {timeout}")
    if count is not None and count < 1:
        raise ValueError(f"--num-processes must be at least 1, got {count}")
    if count is not None and process_id is not None and not 0 <= process_id < count:
        raise ValueError(f"--process-id must be between 0 and {count - 1} for {count} processes, got {process_id}")
    # Collectives between CPU devices of different processes (GPUs use NCCL whatever this says).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=count, process_id=process_id,
                               initialization_timeout=max(1, int(timeout)),
                               heartbeat_timeout_seconds=max(1, int(timeout)))
    return Processes(jax.process_index(), jax.process_count(), timeout)


def _option(args: argparse.Namespace, name: str, variable: str) -> int | None:
    value = getattr(args, name, None)
    if value is None and os.environ.get(variable):
        try:
            value = int(os.environ[variable])
        except ValueError:
            raise ValueError(f"{variable} must be an integer, got {os.environ[variable]!r}") from None
    return value

