"""The `wronai` command line. Parses arguments, configures logging once, calls into the library.

User errors (bad config, missing files, a finished run in the output dir) print one line per problem and
exit with status 2 — never a traceback. Training stopped by SIGTERM/SIGINT (checkpoint written) exits 3,
training stopped on a non-finite loss exits 4, a second Ctrl-C exits 130. An internal error (a bug) prints one
line naming the exception and the file holding its traceback (``wronai-error.log`` in the run's output
directory) and exits 1; ``--debug`` (or WRONAI_DEBUG=1) shows raw tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from wronai import __version__
from wronai.cli.common import setup_logging
from wronai.errors import WronAIError
from wronai.rundir.files import ERROR_LOG

EPILOG = """examples:
  wronai train configs/offline_demo.yaml                       # the offline demo (builds a tiny local model)
  wronai train configs/default.yaml --set training.max_steps=10
  wronai train configs/default.yaml --resume                   # continue from the last complete checkpoint
  wronai validate configs/default.yaml                         # check a config, show the device plan
  wronai data preview configs/offline_demo.yaml -n 3           # see what the model will be trained on
"""


# The command table: one module per command (``register(sub)`` adds its parser), in the order of `wronai --help`.
COMMANDS = (
    "train",
    "validate",
    "init_model",
    "data",
    "config_docs",
    "eval",
    "generate",
    "merge",
    "export",
    "plan",
    "report",
    "tokenizer",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wronai",
        description="WronAI: fine-tune Polish LLMs (QLoRA) from one YAML file.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"wronai {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show raw tracebacks (also WRONAI_DEBUG=1); accepted anywhere on the command line",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"wronai.cli.{name}").register(sub)
    return parser


INTERNAL_ERROR_EXIT = 1


def _error_log_dir(args: argparse.Namespace) -> Path:
    """Where an internal error's traceback is written: the run's output dir (train) or run directory, else
    the system's temporary directory."""
    for candidate in (getattr(args, "error_log_dir", None), getattr(args, "target", None)):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    import tempfile

    return Path(tempfile.gettempdir())


def _report_internal_error(args: argparse.Namespace, err: BaseException) -> int:
    """One line naming the exception and the log file that holds its full traceback."""
    import traceback

    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    path = _error_log_dir(args) / ERROR_LOG
    try:
        path.write_text(f"wronai {__version__}: {' '.join(sys.argv)}\n\n{text}", encoding="utf-8")
        where = f"full traceback in {path}"
    except OSError:
        where = "the traceback could not be written to a file"
    first = str(err).splitlines()[0] if str(err) else ""
    sys.stderr.write(
        f"error: internal error {type(err).__name__}: {first} — {where} (--debug shows it here); "
        "please report it\n"
    )
    return INTERNAL_ERROR_EXIT


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush of a closed pipe prints nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured)
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("WRONAI_DEBUG"))
    argv = [a for a in argv if a != "--debug"]  # accepted before or after the command
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    setup_logging("INFO")
    try:
        return int(args.func(args) or 0)
    except WronAIError as err:
        if debug:
            raise
        sys.stderr.write(f"error: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except BrokenPipeError:  # the reader of the output went away (`wronai validate ... | head`): not an error
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a command its pipe closed
    except Exception as err:
        if debug:
            raise
        return _report_internal_error(args, err)


if __name__ == "__main__":
    sys.exit(main())
