"""`wronai generate` and `wronai chat`: the saved template, 4-bit base + adapter (+ added tokens), batching, the REPL."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import train_via_cli, write_jsonl
from wronai.cli import main

PROMPT = "Napisz jedno zdanie o mieście Kraków."


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A 4-bit QLoRA run that also added the Polish special tokens (so loading must resize the embeddings)."""
    root = tmp_path_factory.mktemp("genrun")
    return train_via_cli(
        root, tiny_model_dir,
        training={"max_steps": 20, "eval_strategy": "no", "save_strategy": "no"},
        polish={"add_polish_tokens": True},
    )  # fmt: skip


@pytest.fixture(scope="module")
def loaded(run_dir):
    from wronai.use.load import load_run

    return load_run(run_dir)


def test_run_loads_4bit_with_resized_embeddings_and_saved_template(loaded, tiny_model_dir):
    import bitsandbytes as bnb

    from wronai.data.formats import format_alpaca

    assert loaded.quantization.startswith("4bit")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    assert (
        loaded.model.get_input_embeddings().weight.shape[0] == len(loaded.tokenizer) == 510
    )  # 500 + 10 Polish tokens
    assert loaded.prompt.describe() == "alpaca prompt template (polish)"
    prompt = loaded.prompt.single(PROMPT, input="Kontekst.")
    expected = format_alpaca({"instruction": PROMPT, "input": "Kontekst.", "output": "x"}, "polish")[0][0]
    assert prompt.text == expected and prompt.text.endswith("### Odpowiedź:\n")


def test_generate_streams_the_same_text_it_returns(loaded):
    from wronai.use.generate import GenerationOptions, generate

    options = GenerationOptions(max_new_tokens=12, temperature=0)
    stream = io.StringIO()
    [streamed] = generate(loaded, [loaded.prompt.single(PROMPT)], options, stream=stream)
    [plain] = generate(loaded, [loaded.prompt.single(PROMPT)], options)
    assert plain and streamed == plain
    assert stream.getvalue().strip() == plain


def test_generate_cli_single_prompt(run_dir, capsys):
    assert (
        main(["generate", str(run_dir), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "10"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.strip(), "no text generated"
    assert "###" not in out  # only the answer, not the template


def test_generate_batch_mode_writes_one_line_per_prompt(run_dir, loaded, tmp_path):
    from wronai.use.generate import GenerationOptions, generate

    prompts = [PROMPT, "Napisz jedno zdanie o mieście Gdańsk.", "Opisz Wrocław."]
    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(prompts) + "\n\n", encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    args = [
        "generate",
        str(run_dir),
        "--prompts-file",
        str(txt),
        "--out",
        str(out),
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
    ]
    assert main([*args, "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert all(isinstance(r["answer"], str) for r in rows)
    # left padding: a batched greedy answer equals the answer to the prompt alone
    [alone] = generate(
        loaded, [loaded.prompt.single(prompts[2])], GenerationOptions(max_new_tokens=8, temperature=0)
    )
    assert rows[2]["answer"] == alone

    jsonl = write_jsonl(
        tmp_path / "prompts.jsonl", [{"instruction": "Popraw błędy.", "input": "Wczoraj poszłem do sklepu."}]
    )
    assert (
        main(
            [
                "generate",
                str(run_dir),
                "--prompts-file",
                str(jsonl),
                "--out",
                str(out),
                "--max-new-tokens",
                "4",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    [row] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert row["input"] == "Wczoraj poszłem do sklepu." and "answer" in row


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
        (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
        (["--prompts-file", "/nonexistent/p.txt"], "--prompts-file: /nonexistent/p.txt not found"),
    ],
)
def test_generate_bad_options_are_one_line(run_dir, capsys, extra, fragment):
    args = ["generate", str(run_dir), *extra] + (["--prompt", "x"] if "--prompts-file" not in extra else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_generate_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "neither a WronAI run" in capsys.readouterr().err


def test_alpaca_chat_puts_the_history_in_the_input_block(loaded):
    from wronai.use.generate import ChatSession, GenerationOptions

    session = ChatSession(loaded, GenerationOptions(max_new_tokens=4, temperature=0))
    first = session.reply(PROMPT)
    prompt = session.prompt_for("A o Gdańsku?").text
    assert prompt.startswith("### Instrukcja:\nA o Gdańsku?\n\n### Dane wejściowe:\n")
    assert f"Użytkownik: {PROMPT}\nAsystent: {first}".strip() in prompt
    session.reset()
    assert "Dane wejściowe" not in session.prompt_for("A o Gdańsku?").text


def test_chat_format_prompts_match_training_rendering(tiny_tokenizer):
    """For chat runs the prompt is the training text up to where the last answer starts (named and own templates)."""
    import copy

    from wronai.config.sections.data import DataSection
    from wronai.data.chat_template import TokenizerChatRenderer
    from wronai.data.formats import format_chat
    from wronai.use.prompts import PromptFormat

    convo = [
        {"role": "system", "content": "Jesteś pomocnym asystentem."},
        {"role": "user", "content": "Stolica Polski?"},
        {"role": "assistant", "content": "Warszawa."},
        {"role": "user", "content": "A Czech?"},
        {"role": "assistant", "content": "Praga."},
    ]
    for name in ("chatml", "llama3", "mistral"):
        fmt = PromptFormat("chat", DataSection(dataset_name="x", chat_template=name), tiny_tokenizer)
        full = "".join(text for text, _ in format_chat({"messages": convo}, name))
        prompt = fmt.conversation(convo[:-1])
        assert full.startswith(prompt.text) and full[len(prompt.text) :].lstrip().startswith("Praga."), name
    assert PromptFormat(
        "chat", DataSection(dataset_name="x", chat_template="chatml"), tiny_tokenizer
    ).stop_strings == ["<|im_end|>"]

    own = copy.deepcopy(tiny_tokenizer)
    own.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fmt = PromptFormat("chat", DataSection(dataset_name="x", chat_template="auto"), own)
    full = "".join(text for text, _ in TokenizerChatRenderer(own)(convo))
    prompt = fmt.conversation(convo[:-1])
    assert (
        prompt.add_special_tokens is False
        and full.startswith(prompt.text)
        and full[len(prompt.text) :].startswith("Praga.")
    )
    assert fmt.stop_strings == ["<|im_end|>"]


def test_streamer_hides_the_end_of_turn_marker(tiny_tokenizer):
    from wronai.use.generate import make_streamer

    out = io.StringIO()
    streamer = make_streamer(tiny_tokenizer, out, ["<|im_end|>"])
    for piece in (" Warszawa", " jest", " stolicą", "<|im", "_end|>", "\n<|im_start|>user"):
        streamer.on_finalized_text(piece)
    streamer.on_finalized_text("", stream_end=True)
    assert out.getvalue() == "Warszawa jest stolicą"


class _FakeSession:
    def __init__(self, fail_with: type[BaseException] | None = None) -> None:
        self.fail_with = fail_with
        self.replies: list[str] = []
        self.resets = 0
        self.run = type("R", (), {"prompt": type("P", (), {"describe": lambda self: "test format"})()})()

    def reply(self, text, stream=None):
        if self.fail_with:
            raise self.fail_with()
        self.replies.append(text)
        stream.write("ok")
        return "ok"

    def reset(self):
        self.resets += 1


class _InterruptingStdin(io.StringIO):
    def readline(self, *args):
        raise KeyboardInterrupt


def test_chat_loop_ctrl_c_handling():
    from wronai.cli.generate import chat_loop

    out = io.StringIO()
    assert (
        chat_loop(_FakeSession(), "run", _InterruptingStdin(), out) == 0
    )  # Ctrl-C at the prompt: clean exit
    session = _FakeSession(fail_with=KeyboardInterrupt)
    out = io.StringIO()
    assert chat_loop(session, "run", io.StringIO("pytanie\n/exit\n"), out) == 0  # Ctrl-C during an answer
    assert "[interrupted]" in out.getvalue()


def _read_until(fd: int, buf: bytearray, marker: bytes, count: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while buf.count(marker) < count:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
        if not ready:
            raise AssertionError(
                f"timed out waiting for {marker!r} #{count}; output so far:\n{buf.decode(errors='replace')[-3000:]}"
            )
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            raise AssertionError(f"chat exited early; output:\n{buf.decode(errors='replace')[-3000:]}")
        buf.extend(chunk)


def _drain(fd: int, buf: bytearray) -> None:
    while True:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            return
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            return
        if not chunk:
            return
        buf.extend(chunk)


def _spawn_chat(run_dir: Path) -> tuple[subprocess.Popen, int]:
    master, slave = os.openpty()
    env = {**os.environ, "TERM": "dumb", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "wronai",
        "chat",
        str(run_dir),
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
    ]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, close_fds=True, env=env)
    os.close(slave)
    return proc, master


@pytest.mark.slow  # a fresh interpreter: imports torch/transformers again
def test_chat_in_a_terminal_two_turns_reset_and_eof(run_dir):
    """A real terminal session: two turns, /reset, then Ctrl-D (end of input) at the prompt."""
    proc, fd = _spawn_chat(run_dir)
    buf = bytearray()
    try:
        _read_until(fd, buf, b"you> ", 1)
        os.write(fd, (PROMPT + "\n").encode())
        _read_until(fd, buf, b"you> ", 2)
        os.write(fd, "A o Gdańsku?\n".encode())
        _read_until(fd, buf, b"you> ", 3)
        os.write(fd, b"/reset\n")
        _read_until(fd, buf, b"you> ", 4)
        os.write(fd, b"\x04")
        assert proc.wait(timeout=60) == 0
        _drain(fd, buf)
    finally:
        proc.kill()
        os.close(fd)
    text = buf.decode(errors="replace")
    assert text.count("model> ") == 2 and "(history cleared)" in text
    assert "alpaca prompt template (polish)" in text
    assert "Traceback" not in text


def test_chat_loop_commands_and_exit():
    from wronai.cli.generate import chat_loop

    session, out = _FakeSession(), io.StringIO()
    assert (
        chat_loop(session, "run", io.StringIO("pierwsze\n\n/reset\n/pomoc\ndrugie\n/exit\nnigdy\n"), out) == 0
    )
    assert session.replies == ["pierwsze", "drugie"] and session.resets == 1
    assert "commands: /reset, /exit" in out.getvalue()
    assert chat_loop(_FakeSession(), "run", io.StringIO(""), io.StringIO()) == 0  # EOF straight away
