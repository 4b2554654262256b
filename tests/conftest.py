import gc
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _use_installed_package() -> None:
    """Lets ``python -m pytest`` from the repository root test the installed package.

    ``python -m`` puts the current folder first on ``sys.path``, so the source folder
    ``jax_vattention/`` would shadow the installed package; without an in-place build
    (``scripts/build_inplace.sh``) it has no compiled ``_core`` and no ``models``.
    """
    source = ROOT / "jax_vattention"
    if any(source.glob("_core*.so")) and (source / "models").exists():
        return  # an in-place build: test the tree itself
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]
    try:
        import jax_vattention._core  # noqa: F401
        import jax_vattention.models  # noqa: F401
    except ImportError as error:
        raise pytest.UsageError(
            f"jax_vattention is not installed ({error}): run `pip install \".[test]\"` from the "
            "repository root first, or `bash scripts/build_inplace.sh` and `PYTHONPATH=. pytest` "
            "to test the source tree") from None


_use_installed_package()

import jax  # noqa: E402


def _has_gpu() -> bool:
    try:
        return any(device.platform == "gpu" for device in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; JAX sees none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_freed_after_each_file():
    """Drops JAX's compiled programs after each test file. XLA's CPU backend keeps every program it
    compiled loaded, with its own memory mappings (three or so per kernel); the whole suite compiles
    thousands, and a process holding them all reaches the kernel's limit of memory mappings
    (``vm.max_map_count``, 65,530 by default), where XLA's compiler crashes."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def model():
    """The ``tiny`` Llama with random weights (seed 0): the model most CPU tests run."""
    from flax import nnx

    from jax_vattention.models import Llama, get_config

    return Llama(get_config("tiny"), rngs=nnx.Rngs(0))


# The sliding window of the windowed tiny models (windowed_model).
SLIDING_WINDOW = 16


@pytest.fixture(scope="module", params=["every_layer", "alternate"])
def windowed_model(request):
    """The ``tiny`` Llama with a sliding window of :data:`SLIDING_WINDOW` (seed 3): Mistral-like (every
    layer slides) or Gemma-like (layer 0 slides, layer 1 attends to all)."""
    from flax import nnx

    from jax_vattention.models import Llama, get_config

    layers = None if request.param == "every_layer" else (0,)
    config = get_config("tiny").replace(sliding_window=SLIDING_WINDOW, sliding_layers=layers, rope_scaling=None)
    return Llama(config, rngs=nnx.Rngs(3))


@pytest.fixture
def fake_host():
    """A factory of cache managers on the CPU over the fake driver, closed after the test.

    ``fake_host(config, page_bytes, host_pages=False)`` -> ``(manager, driver)``; ``host_pages``: the
    fake driver backs pages with host memory that several addresses can alias (prefix sharing, forks).
    """
    import jax_vattention as jv

    opened = []

    def make(config, page_bytes: int, *, host_pages: bool = False):
        driver = jv._core.FakeDriver(page_bytes, host_pages=host_pages)
        manager = jv.CacheManager(config, jax.devices("cpu")[0], driver=driver)
        opened.append(manager)
        return manager, driver

    yield make
    for manager in opened:
        manager.close()
