"""The `wronai` command line. Parses arguments, configures logging once, calls into the library.

User errors (bad config, missing files, a finished run in the output dir) print one line per problem and
exit with status 2 — never a traceback. Training stopped by SIGTERM/SIGINT (checkpoint written) exits 3,
training stopped on a non-finite loss exits 4, a second Ctrl-C exits 130. An internal error (a bug) prints one
line naming the exception and the file holding its traceback (``wronai-error.log`` in the run's output
directory) and exits 1; ``--debug`` (or WRONAI_DEBUG=1) shows raw tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from wronai import __version__
from wronai.commands import add_config_args
from wronai.errors import WronAIError

logger = logging.getLogger("wronai.cli")

EPILOG = """examples:
  wronai train configs/offline_demo.yaml                       # the offline demo (builds a tiny local model)
  wronai train configs/default.yaml --set training.max_steps=10
  wronai train configs/default.yaml --resume                   # continue from the last complete checkpoint
  wronai validate configs/default.yaml                         # check a config, show the device plan
  wronai data preview configs/offline_demo.yaml -n 3           # see what the model will be trained on
"""


def setup_logging(level: str = "INFO") -> None:
    """Configure console logging for the CLI (library code only ever calls logging.getLogger)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "fsspec", "datasets", "bitsandbytes", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from wronai.kernels import quiet_import_warnings

    quiet_import_warnings()
    try:
        import transformers

        transformers.utils.logging.set_verbosity_warning()
        import datasets

        datasets.utils.logging.set_verbosity_warning()
        datasets.disable_progress_bars()
    except ImportError:
        pass


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

    p = sub.add_parser(
        "train",
        help="run the training pipeline",
        description="Run the whole pipeline: config -> model -> data -> train -> save.",
    )
    add_config_args(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the last complete checkpoint in training.output_dir, or from CHECKPOINT",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in training.output_dir")
    p.add_argument(
        "--force-resume",
        action="store_true",
        help="resume even though result-affecting config values changed since the checkpoint",
    )
    p.add_argument(
        "--nproc", type=int, default=1, metavar="N",
        help="data-parallel processes on this machine: re-launches under torchrun (gloo on CPU, nccl on CUDA); see docs/distributed.md",
    )  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "validate",
        help="check a config and show the device plan",
        description="Load and check a config without loading a model; print the resolved config and the device plan. "
        "Exits 2 and lists the problems if there are any.",
    )
    add_config_args(p)
    p.add_argument(
        "--quiet",
        action="store_true",
        help="print only the device plan and problems, not the resolved config",
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "init-model",
        help="build a small local Llama model + Polish tokenizer (offline)",
        description="Train a byte-level BPE tokenizer on local text and save a small randomly initialised Llama model, "
        "usable as model.name. Needs no network.",
    )
    p.add_argument("out_dir", help="directory to create")
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="text/JSONL files to train the tokenizer (and pre-training) on",
    )
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--pretrain-steps", type=int, default=0, help="quick full-weight pre-training steps on --data"
    )
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser(
        "data", help="inspect the training data", description="Inspect what the model will see."
    )
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    pp = data_sub.add_parser(
        "preview",
        help="show formatted examples with trained tokens marked",
        description="Print examples as the model sees them: masked (prompt) text in [brackets] or dim, trained text plain; "
        "token counts and the length distribution.",
    )
    add_config_args(pp)
    pp.add_argument("-n", type=int, default=3, help="examples to show")
    pp.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    pp.set_defaults(func=cmd_data_preview)
    pp = data_sub.add_parser(
        "prepare",
        help="prepare and cache the data now",
        description="Run data preparation once and cache it.",
    )
    add_config_args(pp)
    pp.set_defaults(func=cmd_data_prepare)
    pp = data_sub.add_parser(
        "check",
        help="run the pre-flight data checks",
        description="Prepare the data and run the pre-flight checks (EOS/end-of-turn trained, chat template equal to the "
        "tokenizer's, share of too-long rows), even when data.checks is false; exit 2 naming each failed check.",
    )
    add_config_args(pp)
    pp.set_defaults(func=cmd_data_check)

    p = sub.add_parser(
        "config-docs",
        help="write docs/configuration.md from the schema",
        description="Generate the configuration reference.",
    )
    p.add_argument("--out", default=None, help="file to write (default: print)")
    p.set_defaults(func=cmd_config_docs)
    register_command_modules(sub)
    return parser


def register_command_modules(sub: argparse._SubParsersAction) -> None:
    """Add the subcommands defined in wronai/commands/*.py (each module has a ``register(sub)``)."""
    import importlib
    import pkgutil

    from wronai import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"wronai.commands.{info.name}")
        module.register(sub)


def _load(args: argparse.Namespace):
    from wronai.config import load_config_with_notes

    loaded = load_config_with_notes(args.config, args.overrides)
    return loaded


def cmd_train(args: argparse.Namespace) -> int:
    from wronai.runtime import distributed
    from wronai.pipeline import run

    loaded = _load(args)
    args.error_log_dir = loaded.config.training.output_dir  # an internal error's traceback goes there
    rank = distributed.world()
    setup_logging(loaded.config.logging.log_level if rank.is_main else "WARNING")  # one console voice per job
    if getattr(args, "nproc", 1) > 1 and not rank.is_distributed:
        return _launch_train(args, loaded.config)
    for note in loaded.notes:
        logger.info("config: %s", note)
    logger.info("%s", distributed.describe_batch(loaded.config.training))
    result = run(loaded.config, resume=args.resume, overwrite=args.overwrite, force_resume=args.force_resume)
    for key in ("train_loss", "eval_loss", "train_runtime"):
        if key in result.metrics:
            logger.info("%s: %.4f", key, result.metrics[key])
    logger.info("done — adapter, tokenizer and config are in %s", result.output_dir.resolve())
    return 0


def _launch_train(args: argparse.Namespace, config) -> int:
    """`train --nproc N`: check once here, then re-run this command in N processes under torchrun."""
    from wronai.rundir import saving
    from wronai.model import loading
    from wronai.runtime import distributed
    from wronai.errors import ConfigError
    from wronai.runtime.hardware import plan_device
    from wronai.pipeline import preflight

    if args.nproc < 1:
        raise WronAIError(f"--nproc {args.nproc}: use 1 or more processes")
    device = plan_device(config.hardware, config.training, config.quantization, config.model).device
    problems = preflight(config)  # includes distributed.preflight_problems
    if problems:
        raise ConfigError(problems, args.config)
    saving.check_output_dir(config.training.output_dir, overwrite=args.overwrite, resume=bool(args.resume))
    loading.ensure_model_available(config.model)  # build a missing local model once, not once per rank
    child = ["train", args.config, *[f"--set={o}" for o in args.overrides]]
    if args.resume:
        child += ["--resume"] if args.resume is True else [f"--resume={args.resume}"]
    if args.force_resume:
        child.append("--force-resume")
    return distributed.launch(args.nproc, child, device)


def cmd_validate(args: argparse.Namespace) -> int:
    from wronai.config import dump_config
    from wronai.runtime.hardware import plan_device
    from wronai.pipeline import preflight

    loaded = _load(args)
    cfg = loaded.config
    out = sys.stdout
    if not args.quiet:
        out.write("# resolved config\n" + dump_config(cfg) + "\n")
    plan = plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    out.write("# device plan\n" + "".join(f"  {line}\n" for line in plan.describe()))
    for note in [*loaded.notes, *plan.notes]:
        out.write(f"  note: {note}\n")
    problems = preflight(cfg)
    if problems:
        from wronai.errors import ConfigError

        raise ConfigError(problems, args.config)
    out.write(f"OK: {args.config} is valid\n")
    return 0


def cmd_init_model(args: argparse.Namespace) -> int:
    from wronai.config.schema import TinyModelSpec
    from wronai.model.tiny import build_tiny_model

    spec = TinyModelSpec(
        tokenizer_data=args.data,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        pretrain_steps=args.pretrain_steps,
    )
    out = build_tiny_model(spec, args.out_dir)
    logger.info("model ready: set model.name: %s", Path(out).resolve())
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    from wronai.data.preview import preview

    loaded = _load(args)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    sys.stdout.write(preview(loaded.config, n=args.n, color=color))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from wronai.pipeline import WronAITrainer

    loaded = _load(args)
    trainer = WronAITrainer(loaded.config)
    prepared = trainer.load_dataset()
    logger.info("prepared data cached (key %s)", prepared.stats.cache_key)
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from wronai.pipeline import WronAITrainer

    loaded = _load(args)
    config = loaded.config.model_copy(update={"data": loaded.config.data.model_copy(update={"checks": True})})
    prepared = WronAITrainer(config).load_dataset()
    lines = [f"{name}: {result}" for name, result in prepared.stats.checks.items()]
    sys.stdout.write("data checks passed\n" + "".join(f"  {line}\n" for line in lines))
    return 0


def cmd_config_docs(args: argparse.Namespace) -> int:
    from wronai.config.docs import render_reference

    text = render_reference()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


ERROR_LOG = "wronai-error.log"
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
    except Exception as err:
        if debug:
            raise
        return _report_internal_error(args, err)


if __name__ == "__main__":
    sys.exit(main())
