"""`wronai generate` (one prompt, streamed, or a prompts file -> JSONL) and `wronai chat` (multi-turn REPL)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from wronai.cli.run_args import add_base_model_arg, add_full_precision_arg, add_run_command, quiet_third_party
from wronai.errors import WronAIError

GENERATE_EPILOG = """examples:
  wronai generate runs/offline-demo --prompt "Jaka jest stolica Polski?"
  wronai generate runs/offline-demo --prompt "Popraw błędy." --input "Wczoraj poszłem do sklepu."
  wronai generate runs/offline-demo --prompts-file prompts.txt --out answers.jsonl --temperature 0

The prompt is wrapped in the template the run was trained with (data.prompt_template / data.chat_template
from RUN_DIR/wronai_config.yaml); --raw sends it as written. A prompts file is .txt (one prompt per line) or
.jsonl (objects with "prompt" or "instruction", optional "input" and "system").
"""

CHAT_EPILOG = """In the chat: /reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops an answer.
Alpaca-format runs get one alpaca prompt per turn with the earlier turns in its input block; chat-format
runs get the chat template with the whole history.
"""


def _sampling(p: argparse.ArgumentParser) -> None:

    p.add_argument("--system", default="", help="a system message (chat runs) / system block (alpaca runs)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=50, help="0 = off (default: %(default)s)")
    g.add_argument(
        "--max-new-tokens", type=int, default=256, help="answer length limit (default: %(default)s)"
    )
    g.add_argument("--repetition-penalty", type=float, default=1.1, help="1 = off (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    g = p.add_argument_group("loading")
    add_base_model_arg(g)
    add_full_precision_arg(g)


TARGET_HELP = "a run's training.output_dir, a checkpoint, or a merged model directory"


def register(sub: argparse._SubParsersAction) -> None:

    p = add_run_command(
        sub,
        "generate",
        help="generate answers with a trained run",
        description="Load the base model + the run's adapter and answer a prompt (streamed) or a file of prompts.",
        epilog=GENERATE_EPILOG,
        target_help=TARGET_HELP,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the instruction / question")
    src.add_argument(
        "--prompts-file", metavar="FILE", help="batch mode: .txt (one prompt per line) or .jsonl"
    )
    p.add_argument("--input", default="", help="alpaca input block (the text to work on)")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="write one JSON line per prompt here (default for a prompts file: stdout)",
    )
    p.add_argument(
        "--raw", action="store_true", help="send the prompt as written, without the run's template"
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call in batch mode")
    p.add_argument("--no-stream", action="store_true", help="print the answer when it is complete")
    _sampling(p)
    p.set_defaults(func=cmd_generate)

    c = add_run_command(
        sub,
        "chat",
        help="chat with a trained run in the terminal",
        description="A multi-turn chat with the run, in the prompt format it was trained with; answers are streamed.",
        epilog=CHAT_EPILOG,
        target_help=TARGET_HELP,
    )
    _sampling(c)
    c.set_defaults(func=cmd_chat)


def _options(args: argparse.Namespace) -> Any:
    from wronai.use.generate import GenerationOptions

    return GenerationOptions(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    ).check()  # fmt: skip


def _load(args: argparse.Namespace) -> Any:
    from wronai.use.load import load_run

    return load_run(args.target, base_model=args.base_model, quantize=not args.full_precision)


def read_prompts(path: str) -> list[dict[str, str]]:
    """Rows with "prompt" (+ "input", "system") from a .txt (one per line) or .jsonl file."""

    file = Path(path)
    if not file.is_file():
        raise WronAIError(
            f"--prompts-file: {file} not found — pass a .txt (one prompt per line) or .jsonl file"
        )
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix != ".jsonl":
            rows.append({"prompt": line.strip()})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise WronAIError(
                f"{file}:{number}: not valid JSON ({err.msg}) — one JSON object per line"
            ) from None
        text = row.get("prompt", row.get("instruction")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise WronAIError(
                f'{file}:{number}: no "prompt" (or "instruction") text — add it, or use a .txt file'
            )
        rows.append(
            {"prompt": text, "input": str(row.get("input") or ""), "system": str(row.get("system") or "")}
        )
    if not rows:
        raise WronAIError(f"--prompts-file: {file} holds no prompts")
    return rows


def cmd_generate(args: argparse.Namespace) -> int:
    from wronai.use.generate import generate

    options = _options(args)
    rows = (
        read_prompts(args.prompts_file)
        if args.prompts_file
        else [{"prompt": args.prompt, "input": args.input}]
    )
    stream = None if args.prompts_file or args.no_stream else sys.stdout
    with quiet_third_party():
        run = _load(args)
        prompts = [_render(run, args, row) for row in rows]
        if args.prompts_file is None:
            answers = generate(run, prompts, options, stream=stream)
        else:
            answers = generate(run, prompts, options, batch_size=max(1, args.batch_size))
    results = [{**row, "answer": answer} for row, answer in zip(rows, answers, strict=True)]
    if args.prompts_file is None:
        sys.stdout.write(("" if stream else answers[0]) + "\n")
        if args.out:
            _write_jsonl(args.out, results)
        return 0
    if args.out:
        _write_jsonl(args.out, results)
        sys.stderr.write(f"wrote {len(results)} answers to {args.out}\n")
    else:
        sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    return 0


def _render(run: Any, args: argparse.Namespace, row: dict[str, str]) -> Any:
    """One row as a prompt: in the run's format, or as written with --raw."""
    from wronai.use.prompts import Prompt

    if args.raw:
        return Prompt(row["prompt"])
    return run.prompt.single(
        row["prompt"], input=row.get("input", ""), system=row.get("system") or args.system
    )


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def cmd_chat(args: argparse.Namespace) -> int:
    from wronai.use.generate import ChatSession

    options = _options(args)
    with quiet_third_party():
        session = ChatSession(_load(args), options, system=args.system)
        return chat_loop(session, args.target, sys.stdin, sys.stdout)


def _read_line(stdin: Any, out: Any) -> str:
    if stdin is sys.stdin and out is sys.stdout and stdin.isatty():
        try:
            return input("you> ") + "\n"  # readline editing when attached to a terminal
        except EOFError:
            return ""
    out.write("you> ")
    out.flush()
    return stdin.readline()


def chat_loop(session: Any, name: str, stdin: Any, out: Any) -> int:
    """Read a line, stream the answer; /reset, /exit, Ctrl-D and Ctrl-C end cleanly (exit status 0)."""
    if stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    out.write(
        f"chat with {name} — {session.run.prompt.describe()}\n/reset clears the history, /exit or Ctrl-D quits.\n"
    )
    while True:
        try:
            line = _read_line(stdin, out)
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        if not line:  # EOF (Ctrl-D)
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            out.write("(history cleared)\n")
            continue
        if text.startswith("/"):
            out.write("commands: /reset, /exit\n")
            continue
        out.write("model> ")
        out.flush()
        try:
            session.reply(text, stream=out)
        except KeyboardInterrupt:
            out.write(" [interrupted]\n")
            continue
        out.write("\n")
