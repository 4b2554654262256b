"""Subcommands of the ``vattention`` CLI; each module has ``add_arguments(parser)`` and ``run(args)``."""
