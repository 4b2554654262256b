# Writes the type stubs of the built module with nanobind's stubgen: run by CMakeLists.txt as
#   cmake -DPYTHON=... -DMODULE_DIR=... -DOUTPUT=... -P cmake/stubgen.cmake
# Stubs are a convenience: where stubgen is missing or cannot import the module (a nanobind
# without it, a cross build), this warns and writes nothing, and the build goes on.
# JAX is imported first when present: loading the core before JAX crashed JAX's import on the
# GPU machine (Python 3.12, jax 0.11.2).
set(script "import sys
try:
    import jax
except ImportError:
    pass
from nanobind.stubgen import main
main(sys.argv[1:])")
execute_process(
  COMMAND "${PYTHON}" -c "${script}" -q -i "${MODULE_DIR}" -m _core -o "${OUTPUT}"
  RESULT_VARIABLE status
  OUTPUT_VARIABLE output
  ERROR_VARIABLE output)
if (NOT status EQUAL 0)
  file(REMOVE "${OUTPUT}")
  message(WARNING "no type stubs for _core (nanobind's stubgen failed; the module itself is fine):\n${output}")
endif()
