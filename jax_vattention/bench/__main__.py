import sys

from jax_vattention.app.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
