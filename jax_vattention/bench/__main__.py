import sys

from jax_vattention.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
