"""Extra `wronai` subcommands, one module each.

Every module here defines ``register(subparsers)`` adding its subcommand(s) with ``set_defaults(func=...)``;
the CLI discovers them automatically. Modules must import only argparse-level things at import time (the
heavy libraries are imported inside the command functions), so `wronai --help` stays fast.
"""
