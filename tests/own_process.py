"""Test code run in a process of its own: a fault on the GPU (an illegal address) kills the CUDA
context of the whole process, and a test that needs JAX configured otherwise (forced devices, other
flags) needs a fresh one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax_vattention

HERE = Path(__file__).resolve().parent


def environment(*paths: str) -> dict:
    """This environment with the package under test (and ``paths``) first on ``PYTHONPATH``."""
    package_parent = str(Path(jax_vattention.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, *paths, env.get("PYTHONPATH")]))
    return env


def run_case(script: Path, case: str, timeout: float = 900) -> str:
    """Runs ``python script case`` (a cases file that prints ``CASE OK``); returns its output."""
    done = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True, timeout=timeout,
                          env=environment())
    assert done.returncode == 0, f"{case} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}"
    assert f"{case} OK" in done.stdout, done.stdout
    return done.stdout


def run_function(module: str, name: str, *args, timeout: float = 600) -> None:
    """Calls ``tests/<module>.py``'s ``name(*args)`` in a fresh process; fails with its output."""
    script = f"import {module} as cases; cases.{name}(*{args!r})"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env=environment(str(HERE)))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def case_names(script: Path) -> list[str]:
    """The ``CASES`` a cases file lists (imported without running any)."""
    sys.path.insert(0, str(script.parent))
    try:
        module = __import__(script.stem)
    finally:
        sys.path.pop(0)
    return list(module.CASES)
