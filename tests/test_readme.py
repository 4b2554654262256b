"""The README's examples run as written: every ```python block on its own, on the CPU, in a fresh
interpreter; and its commands block stays three commands."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

import jax_vattention

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_readme_has_python_examples():
    assert len(PYTHON_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs(index, tmp_path):
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(PYTHON_BLOCKS[index])
    package_parent = str(pathlib.Path(jax_vattention.__file__).resolve().parent.parent)  # the one under test
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"README python block {index} failed:\n{PYTHON_BLOCKS[index]}\n{done.stderr}"


def test_the_commands_block_is_three_commands():
    block = README.split("## Commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert len(commands) == 3, commands
    assert commands[1] == "vattention generate"
