#!/usr/bin/env python3
"""GPU smoke suite: the whole WronAI pipeline on a locally built ~1B Llama, no Hub, one pass/fail table.

    python benchmarks/gpu_smoke.py [--out DIR] [--work DIR] [--budget 480] [--skip speed,...]
    python benchmarks/gpu_smoke.py --tiny            # the same steps on a tiny model (a CPU: a few minutes)

Steps, each a `wronai` command (python -m wronai, so it runs from src/ without an install) checked on what it
wrote; a step whose input failed is skipped:

  environment   the libraries import (versions), CUDA is there (unless --tiny/--device cpu), a bitsandbytes
                4-bit round trip on the training device
  init-model    `wronai init-model`: BPE tokenizer trained on data/sample_pl, random Llama of ~1B shape
                (hidden 2048, 22 layers, 32 heads / 16 kv heads, MLP 5632) saved locally
  validate      `wronai validate --quiet`: the device plan names the device and 4-bit NF4
  train-20      `wronai train` with 4-bit QLoRA, max_steps 20, eval + checkpoint every 10 steps
  resume-30     `wronai train --resume` to step 30: continues from checkpoint-20 (not from 0), eval at 30,
                checkpoint-30 sealed, old checkpoints rotated (save_total_limit 2)
  eval          `wronai eval --limit 32`: perplexity on the run's eval split, eval.json
  generate      `wronai generate --temperature 0`: greedy answer with the 4-bit base + adapter
  merge         `wronai merge --dtype bf16`, then `wronai generate` on the merged folder (no peft, no lora keys)
  export-gguf   `wronai export --format gguf` (f16) read back with gguf.GGUFReader: llama, every tensor
  ddp           `wronai train --nproc 2` (10 steps): on 2+ GPUs (nvidia-smi -L); skipped with fewer. --tiny on
                a CPU runs it with the gloo backend
  speed         benchmarks/train_speed.py (classic script vs wronai train, issue 6's GPU speed check)

Writes DIR/smoke.txt (the table), DIR/smoke.json, DIR/logs/<step>.log, DIR/train_speed.json. --budget
(seconds) bounds the whole suite: a step gets at most the time left, and one that cannot start with its
minimum left is skipped ("budget"). Exits 1 if a step failed, 3 if none failed but one was skipped for budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "sample_pl"
PROMPT = "Jaka jest stolica Polski?"

# model shapes: ~1B (TinyLlama-1.1B's width, depth and MLP; the vocabulary is the local tokenizer's) and tiny
SHAPES = {
    "1b": {"vocab": 8000, "hidden": 2048, "layers": 22, "heads": 32, "lr": 2e-4},
    # init-model's default width (MLP 352, a multiple of 32: on an AVX512-BF16 CPU, eval/generate may use
    # bitsandbytes' packed 4-bit kernel, as on real models)
    "tiny": {"vocab": 1000, "hidden": 128, "layers": 2, "heads": 4, "lr": 2e-3},
}


class StepFailed(Exception):
    pass


class StepSkipped(Exception):
    pass


@dataclass
class Step:
    name: str
    needs: tuple[str, ...]
    limit_s: float  # its own timeout (the budget left may cut it shorter)
    min_s: float  # skipped when less than this is left
    status: str = "-"
    seconds: float = 0.0
    note: str = ""


@dataclass
class Suite:
    args: argparse.Namespace
    out: Path
    work: Path
    device: str
    shape: dict
    deadline: float
    env: dict = field(default_factory=dict)
    gpus: int = 0
    current: Step | None = None
    started: float = 0.0

    # ------------------------------------------------------------------ running commands

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], log_name: str, *, env: dict | None = None) -> str:
        """Run one command (own process group, output to logs/<log_name>.log); StepFailed on a non-zero exit or
        on its timeout (the step's limit or the budget left, whichever is shorter)."""
        assert self.current is not None
        limit = max(1.0, min(self.current.limit_s - (time.monotonic() - self.started), self.left()))
        log = self.out / "logs" / f"{log_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as handle:
            handle.write(f"$ {' '.join(cmd)}\n")
            handle.flush()
            proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                start_new_session=True,
            )  # fmt: skip
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                stop_group(proc)
                raise StepFailed(f"timed out after {limit:.0f} s (see logs/{log_name}.log)") from None
        text = log.read_text(encoding="utf-8", errors="replace")
        if rc != 0:
            tail = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
            raise StepFailed(f"exit {rc}: {tail[0][:160]} (logs/{log_name}.log)")
        return text

    def wronai(self, *args: str, log_name: str | None = None) -> str:
        assert self.current is not None
        return self.run([sys.executable, "-m", "wronai", *args], log_name or self.current.name)

    def python(self, code: str, *args: str) -> dict:
        """A check in a fresh interpreter that prints one JSON object as its last line."""
        assert self.current is not None
        text = self.run([sys.executable, "-c", code, *args], f"{self.current.name}-check")
        return json.loads(text.strip().splitlines()[-1])

    # ------------------------------------------------------------------ paths and config

    @property
    def model_dir(self) -> Path:
        return self.work / "model"

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    @property
    def config(self) -> Path:
        return self.work / "smoke.yaml"

    def write_config(self) -> None:
        """configs/offline_demo.yaml with the locally built model, 30 steps, eval and checkpoints every 10."""
        raw = yaml.safe_load((REPO / "configs" / "offline_demo.yaml").read_text(encoding="utf-8"))
        raw["model"] = {"name": str(self.model_dir)}
        raw["training"].update(
            output_dir=str(self.run_dir), max_steps=30, eval_steps=10, save_steps=10, save_total_limit=2,
            logging_steps=5, learning_rate=self.shape["lr"], per_device_train_batch_size=8,
            per_device_eval_batch_size=8,
        )  # fmt: skip
        raw["data"]["dataset_name"] = str(DATA / "instructions.jsonl")
        raw["data"]["cache_dir"] = str(self.work / "data-cache")
        raw["logging"] = {"report_to": ["none"], "log_level": "INFO"}
        raw["hardware"] = {"device": self.device}
        raw["extensions"] = {"callbacks": ["wronai.train.throughput:ThroughputMemoryCallback"]}
        self.config.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")

    # ------------------------------------------------------------------ the steps

    def step_environment(self) -> str:
        info = self.python(ENV_CHECK, self.device)
        (self.out / "versions.json").write_text(json.dumps(info, indent=2))
        missing = [name for name, version in info["versions"].items() if version.startswith("missing")]
        if missing:
            raise StepFailed(
                f"cannot import {', '.join(missing)} (on the device: carry .whl/, made by gpu_run.sh --fetch-wheels)"
            )
        if self.device == "cuda" and not info["cuda"]:
            raise StepFailed("torch sees no CUDA device (run with --tiny or --device cpu on a CPU)")
        if info["bnb_roundtrip_error"] is None or info["bnb_roundtrip_error"] > 0.2:
            raise StepFailed(f"bitsandbytes 4-bit round trip on {self.device}: {info['bnb_error']}")
        self.gpus = self.count_gpus(info)
        v = info["versions"]
        return (
            f"{info['device_name']}, {self.gpus} GPU(s); torch {v['torch']}, transformers {v['transformers']}, "
            f"peft {v['peft']}, bnb {v['bitsandbytes']}"
        )

    def count_gpus(self, info: dict) -> int:
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
            return sum(line.startswith("GPU ") for line in listing.splitlines())
        except (OSError, subprocess.TimeoutExpired):
            return int(info["cuda_devices"])

    def step_init_model(self) -> str:
        s = self.shape
        if self.model_dir.exists():
            shutil.rmtree(self.model_dir)
        self.wronai(
            "init-model", str(self.model_dir), "--data", str(DATA / "corpus.txt"), str(DATA / "instructions.jsonl"),
            str(DATA / "chat.jsonl"), "--vocab-size", str(s["vocab"]), "--hidden-size", str(s["hidden"]),
            "--layers", str(s["layers"]), "--heads", str(s["heads"]),
        )  # fmt: skip
        cfg = json.loads((self.model_dir / "config.json").read_text())
        want = {
            "hidden_size": s["hidden"],
            "num_hidden_layers": s["layers"],
            "intermediate_size": s["hidden"] * 11 // 4,
        }
        wrong = {k: cfg.get(k) for k, v in want.items() if cfg.get(k) != v}
        if wrong:
            raise StepFailed(f"config.json differs from the shape asked for: {wrong}")
        if not (self.model_dir / "tokenizer.json").is_file():
            raise StepFailed("no tokenizer.json in the model folder")
        self.write_config()
        return f"{human(llama_params(cfg))} params, vocab {cfg['vocab_size']}, {cfg['num_key_value_heads']} kv heads"

    def step_validate(self) -> str:
        text = self.wronai("validate", str(self.config), "--quiet")
        plan = [
            line.strip()
            for line in text.splitlines()
            if line.strip().startswith(("device:", "quantization:"))
        ]
        if not any(line.startswith(f"device: {self.device}") for line in plan):
            raise StepFailed(f"the device plan does not train on {self.device}: {plan}")
        if not any("4bit-nf4" in line for line in plan):
            raise StepFailed(f"the device plan does not quantize to 4-bit NF4: {plan}")
        return plan[0]

    def step_train_20(self) -> str:
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.wronai("train", str(self.config), "--set", "training.max_steps=20")
        state = self.state()
        if state["global_step"] != 20:
            raise StepFailed(f"global_step {state['global_step']}, expected 20")
        self.need_checkpoint(20)
        evals = self.eval_losses(state)
        if sorted(evals) != [10, 20]:
            raise StepFailed(f"eval_loss logged at steps {sorted(evals)}, expected [10, 20]")
        return self.train_note(state)

    def step_resume_30(self) -> str:
        text = self.wronai("train", str(self.config), "--resume", "--set", "training.max_steps=30")
        if "checkpoint-20" not in "".join(line for line in text.splitlines() if "resuming from" in line):
            raise StepFailed("the log has no `resuming from .../checkpoint-20` line")
        first = min((int(n) for n in re.findall(r"step (\d+)/30", text)), default=0)
        if first <= 20:
            raise StepFailed(f"the resumed run logged step {first}/30: it did not continue after step 20")
        state = self.state()
        if state["global_step"] != 30:
            raise StepFailed(f"global_step {state['global_step']}, expected 30")
        self.need_checkpoint(30)
        evals = self.eval_losses(state)
        if sorted(evals) != [10, 20, 30]:
            raise StepFailed(
                f"eval_loss logged at steps {sorted(evals)}, expected [10, 20, 30] (kept from the first run)"
            )
        steps = [e["step"] for e in state["log_history"] if "loss" in e]
        if steps != sorted(set(steps)) or not any(s > 20 for s in steps):
            raise StepFailed(f"training loss logged at steps {steps}: not one run continued past 20")
        kept = sorted(p.name for p in self.run_dir.glob("checkpoint-*"))
        if len(kept) > 2:
            raise StepFailed(f"save_total_limit 2, kept {kept}")
        for name in ("adapter_model.safetensors", "train_results.json", "wronai_config.yaml"):
            if not (self.run_dir / name).is_file():
                raise StepFailed(f"the finished run has no {name}")
        return self.train_note(state) + f"; kept {', '.join(kept)}"

    def step_eval(self) -> str:
        text = self.wronai("eval", str(self.run_dir), "--limit", "32")
        report = json.loads((self.run_dir / "eval.json").read_text())
        numbers = [float(v) for v in walk_numbers(report) if isinstance(v, (int, float))]
        if not numbers or not all(math.isfinite(v) for v in numbers):
            raise StepFailed(f"eval.json holds no finite numbers: {report}")
        line = next((x for x in text.splitlines() if "ppl" in x), "")
        return line.strip()[-90:]

    def step_generate(self) -> str:
        answer = self.generate(self.run_dir, "answer")
        return f"answer {answer[:50]!r}"

    def generate(self, target: Path, name: str) -> str:
        out = self.work / f"{name}.jsonl"
        out.unlink(missing_ok=True)
        self.wronai(
            "generate", str(target), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "24",
            "--no-stream", "--out", str(out), log_name=f"{self.current.name}-{name}" if self.current else name,
        )  # fmt: skip
        rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines() if x.strip()]
        if len(rows) != 1 or not isinstance(rows[0].get("answer"), str):
            raise StepFailed(f"{out.name}: expected one row with an answer, got {rows}")
        return rows[0]["answer"]

    def step_merge(self) -> str:
        merged = self.work / "merged"
        self.wronai(
            "merge", str(self.run_dir), str(merged), "--dtype", "bf16", "--device", self.device, "--overwrite"
        )
        info = self.python(MERGED_CHECK, str(merged))
        if info["lora_keys"]:
            raise StepFailed(f"the merged weights still hold LoRA tensors: {info['lora_keys'][:3]}")
        if info["dtypes"] != ["BF16"]:
            raise StepFailed(f"merged with --dtype bf16, tensors are {info['dtypes']}")
        if not (merged / "wronai_merge.json").is_file():
            raise StepFailed("no wronai_merge.json in the merged folder")
        answer = self.generate(merged, "merged-answer")
        return (
            f"{info['tensors']} tensors, {info['bytes'] / 2**20:.0f} MiB bf16; merged answer {answer[:30]!r}"
        )

    def step_export_gguf(self) -> str:
        gguf_file = self.work / "smoke-f16.gguf"
        gguf_file.unlink(missing_ok=True)
        self.wronai("export", str(self.run_dir), "--format", "gguf", "--out", str(gguf_file))
        info = self.python(GGUF_CHECK, str(gguf_file))
        layers = self.shape["layers"]
        want = 9 * layers + 3  # per block: 2 norms, q/k/v/o, gate/up/down; token_embd, output_norm, output
        if info["arch"] != "llama" or info["blocks"] != layers or info["tensors"] != want:
            raise StepFailed(f"GGUF: {info}, expected llama, {layers} blocks, {want} tensors")
        vocab = json.loads((self.model_dir / "config.json").read_text())["vocab_size"]
        if sorted(info["embd_shape"]) != sorted([vocab, self.shape["hidden"]]):
            raise StepFailed(
                f"GGUF token_embd shape {info['embd_shape']}, expected vocab {vocab} x {self.shape['hidden']}"
            )
        if not info["finite"]:
            raise StepFailed("GGUF token_embd holds non-finite values")
        return f"{info['tensors']} tensors, {gguf_file.stat().st_size / 2**20:.0f} MiB, vocab {vocab}"

    def step_ddp(self) -> str:
        if self.device == "cuda" and self.gpus < 2:
            raise StepSkipped(f"{self.gpus} GPU(s) (nvidia-smi -L): DDP needs 2")
        out = self.work / "run-ddp"
        if out.exists():
            shutil.rmtree(out)
        text = self.wronai(
            "train", str(self.config), "--nproc", "2", "--set", f"training.output_dir={out}",
            "--set", "training.max_steps=10", "--set", "training.eval_steps=5", "--set", "training.save_steps=5",
        )  # fmt: skip
        if "launching 2 processes" not in text:
            raise StepFailed("no `launching 2 processes` line: not run under torchrun")
        state = json.loads((out / "trainer_state.json").read_text())
        if state["global_step"] != 10:
            raise StepFailed(f"global_step {state['global_step']}, expected 10")
        if not (out / "checkpoint-10" / "wronai_checkpoint.json").is_file():
            raise StepFailed("no sealed checkpoint-10")
        return f"2 processes ({'nccl' if self.device == 'cuda' else 'gloo'}); " + self.train_note(state)

    def step_speed(self) -> str:
        bench = self.work / "bench"
        a = self.args
        cmd = [
            sys.executable, str(REPO / "benchmarks" / "train_speed.py"), "--device", self.device, "--rows", str(a.speed_rows),
            "--hidden", str(a.speed_hidden), "--layers", str(a.speed_layers), "--repeat", "1", "--variants", "classic,wronai",
            "--out", str(bench),
        ]  # fmt: skip
        text = self.run(cmd, "speed")
        results = bench / "results.json"
        if not results.is_file():
            raise StepFailed("train_speed.py wrote no results.json")
        shutil.copy(results, self.out / "train_speed.json")
        (self.out / "train_speed.txt").write_text(
            "\n".join(line for line in text.splitlines() if not line.startswith("$ ")), encoding="utf-8"
        )
        wronai = json.loads(results.read_text())["rounds"][0]["results"]["wronai"]
        return f"wronai/classic {wronai['vs_classic']:.2f}x tokens/s, MFU {100 * wronai['mfu']:.1f}%"

    # ------------------------------------------------------------------ helpers

    def state(self) -> dict:
        return json.loads((self.run_dir / "trainer_state.json").read_text())

    def need_checkpoint(self, step: int) -> None:
        folder = self.run_dir / f"checkpoint-{step}"
        if not (folder / "wronai_checkpoint.json").is_file():
            raise StepFailed(f"no sealed {folder.name} (wronai_checkpoint.json)")

    @staticmethod
    def eval_losses(state: dict) -> dict[int, float]:
        evals = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
        bad = {k: v for k, v in evals.items() if not math.isfinite(v)}
        if bad:
            raise StepFailed(f"non-finite eval_loss {bad}")
        return evals

    @staticmethod
    def train_note(state: dict) -> str:
        logs = state["log_history"]
        losses = [e["loss"] for e in logs if "loss" in e]
        if not losses or not all(math.isfinite(x) for x in losses):
            raise StepFailed(f"training losses {losses}")
        evals = [e["eval_loss"] for e in logs if "eval_loss" in e]
        speed = [e["tokens_per_second"] for e in logs if "tokens_per_second" in e]
        cuda = [e["cuda_max_memory_mb"] for e in logs if "cuda_max_memory_mb" in e]
        rss = [e["rss_mb"] for e in logs if "rss_mb" in e]
        note = (
            f"loss {losses[0]:.2f}->{losses[-1]:.2f}, eval {evals[-1]:.2f}"
            if evals
            else f"loss {losses[-1]:.2f}"
        )
        if speed:
            note += f", {speed[-1]:.0f} tok/s"
        if cuda or rss:
            note += f", peak {'CUDA' if cuda else 'RSS'} {max(cuda or rss):.0f} MB"
        return note

    # ------------------------------------------------------------------ the table

    def execute(self, steps: list[Step]) -> int:
        done: dict[str, str] = {}
        for step in steps:
            self.current, self.started = step, time.monotonic()
            blocked = [n for n in step.needs if done.get(n) != "PASS"]
            try:
                if step.name in self.args.skip:
                    raise StepSkipped("--skip" if step.name in self.args.skip_named else "not in --only")
                if blocked:
                    raise StepSkipped(f"needs {', '.join(blocked)}")
                if self.left() < step.min_s:
                    raise StepSkipped(f"budget: {max(self.left(), 0):.0f} s left, needs ~{step.min_s:.0f}")
                step.note = getattr(self, "step_" + step.name.replace("-", "_"))()
                step.status = "PASS"
            except StepSkipped as why:
                step.status, step.note = "SKIP", str(why)
            except StepFailed as why:
                step.status, step.note = "FAIL", str(why)
            except Exception as err:  # a check that could not read what the step wrote is a failure too
                step.status, step.note = "FAIL", f"{type(err).__name__}: {err}"
            step.seconds = time.monotonic() - self.started
            done[step.name] = step.status
            print(f"[smoke] {step.name}: {step.status} ({step.seconds:.0f} s) {step.note}", flush=True)
            self.report(steps)
        print(render(steps, self), flush=True)
        if any(s.status == "FAIL" for s in steps):
            return 1
        short = [s.name for s in steps if s.status == "SKIP" and s.note.startswith("budget")]
        if short:
            print(f"incomplete: {', '.join(short)} skipped for lack of budget (--budget, or --only STEP)")
            return 3
        return 0

    def report(self, steps: list[Step]) -> None:
        (self.out / "smoke.txt").write_text(render(steps, self) + "\n", encoding="utf-8")
        rows = [
            {"step": s.name, "status": s.status, "seconds": round(s.seconds, 1), "note": s.note}
            for s in steps
        ]
        (self.out / "smoke.json").write_text(
            json.dumps(
                {"mode": "tiny" if self.args.tiny else "1b", "device": self.device, "steps": rows}, indent=2
            )
        )


def render(steps: list[Step], suite: Suite) -> str:
    width = max(len(s.name) for s in steps)
    total = sum(s.seconds for s in steps)
    lines = [
        f"WronAI smoke suite: {'tiny' if suite.args.tiny else '~1B'} model on {suite.device}",
        f"{'step':{width}}  {'result':6}  {'seconds':>7}  note",
    ]
    lines += [f"{s.name:{width}}  {s.status:6}  {s.seconds:7.1f}  {s.note}" for s in steps]
    counts = {k: sum(s.status == k for s in steps) for k in ("PASS", "FAIL", "SKIP")}
    lines.append(
        f"{'total':{width}}  {'':6}  {total:7.1f}  "
        + ", ".join(f"{v} {k.lower()}" for k, v in counts.items())
    )
    return "\n".join(lines)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group (torchrun and its ranks too), SIGKILL what is left after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def human(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def llama_params(cfg: dict) -> int:
    h, inter, layers, vocab = (
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["num_hidden_layers"],
        cfg["vocab_size"],
    )
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h) + 2 * vocab * h + h


def walk_numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from walk_numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk_numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


ENV_CHECK = r"""
import importlib, json, sys
device = sys.argv[1]
versions = {}
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "pydantic", "tokenizers",
             "safetensors", "gguf", "wronai"):
    try:
        versions[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as err:
        versions[name] = f"missing ({type(err).__name__}: {err})"
info = {"versions": versions, "cuda": False, "cuda_devices": 0, "device_name": "cpu", "bnb_roundtrip_error": None,
        "bnb_error": ""}
try:
    import torch
    info["cuda"] = torch.cuda.is_available()
    info["cuda_devices"] = torch.cuda.device_count()
    info["device_name"] = torch.cuda.get_device_name(0) if info["cuda"] else "cpu"
    if device != "cuda" or info["cuda"]:
        import bitsandbytes.functional as F
        x = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
        q, state = F.quantize_4bit(x, quant_type="nf4")
        back = F.dequantize_4bit(q, state)
        info["bnb_roundtrip_error"] = float((back.float() - x.float()).norm() / x.float().norm())
except Exception as err:
    info["bnb_error"] = f"{type(err).__name__}: {err}"
print(json.dumps(info))
"""

MERGED_CHECK = r"""
import json, sys
from pathlib import Path
from safetensors import safe_open
folder = Path(sys.argv[1])
keys, dtypes, size = [], set(), 0
for file in sorted(folder.glob("*.safetensors")):
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            keys.append(key)
            t = f.get_slice(key)
            dtypes.add(t.get_dtype())
    size += file.stat().st_size
print(json.dumps({"tensors": len(keys), "lora_keys": [k for k in keys if "lora" in k.lower()],
                  "dtypes": sorted(dtypes), "bytes": size}))
"""

GGUF_CHECK = r"""
import json, sys
import numpy as np
from gguf import GGUFReader
reader = GGUFReader(sys.argv[1])
def field(name):
    f = reader.fields.get(name)
    if f is None:
        return None
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types and f.types[0].name == "STRING" else value.tolist()[0]
arch = field("general.architecture")
embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
print(json.dumps({"arch": arch, "blocks": field(f"{arch}.block_count"), "tensors": len(reader.tensors),
                  "embd_shape": [int(n) for n in embd.shape],
                  "finite": bool(np.isfinite(np.asarray(embd.data, dtype=np.float32)).all())}))
"""


def build_steps(tiny: bool) -> list[Step]:
    """(name, needs, timeout, minimum) — the timeouts are for the ~1B model on one H200 (tiny: 2-core CPU)."""
    table = [
        ("environment", (), 90, 5),
        ("init-model", ("environment",), 150, 20),
        ("validate", ("init-model",), 60, 5),
        ("train-20", ("init-model",), 180, 30),
        ("resume-30", ("train-20",), 150, 30),
        ("eval", ("resume-30",), 90, 15),
        ("generate", ("resume-30",), 90, 15),
        ("merge", ("resume-30",), 150, 30),
        ("export-gguf", ("resume-30",), 150, 30),
        ("ddp", ("init-model",), 180, 40),
        ("speed", ("environment",), 300, 90),
    ]
    scale = (
        2.0 if tiny else 1.0
    )  # on a shared 2-core CPU every interpreter start is slower than on the device
    return [Step(n, needs, limit * scale, minimum) for n, needs, limit, minimum in table]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--tiny", action="store_true", help="a tiny model (hidden 128, 2 layers): a CPU dry run in minutes")
    add(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="training device (auto: cuda when torch sees one)",
    )
    add(
        "--out",
        default=os.environ.get("OUT", "/tmp/wronai-smoke-out"),
        help="table, JSON and logs (default: $OUT)",
    )
    add("--work", default="/tmp/wronai-smoke", help="models, runs, GGUF (~9 GB for the ~1B model)")
    add("--budget", type=float, default=None, help="seconds for the whole suite (default 480; tiny 1200)")
    add("--skip", default="", help="comma-separated steps to skip, e.g. speed,ddp")
    add("--only", default="", help="comma-separated steps to run, with the steps they need (e.g. speed)")
    add("--speed-rows", type=int, default=None, help="train_speed.py --rows (default 1200; tiny 40)")
    add("--speed-hidden", type=int, default=None, help="train_speed.py --hidden (default 384; tiny 64)")
    add("--speed-layers", type=int, default=None, help="train_speed.py --layers (default 6; tiny 2)")
    args = parser.parse_args()
    steps = build_steps(args.tiny)
    names = {s.name for s in steps}
    args.skip, only = ({x.strip() for x in value.split(",") if x.strip()} for value in (args.skip, args.only))
    skip_named = set(args.skip)
    unknown = (args.skip | only) - names
    if unknown:
        parser.error(
            f"unknown step(s) {', '.join(sorted(unknown))}; the steps: {', '.join(s.name for s in steps)}"
        )
    if only:  # the named steps and, transitively, the steps they need
        needs = {s.name: s.needs for s in steps}
        keep, todo = set(), list(only)
        while todo:
            name = todo.pop()
            if name not in keep:
                keep.add(name)
                todo.extend(needs[name])
        args.skip |= names - keep
    args.skip_named = skip_named
    for name, full, tiny in (("speed_rows", 1200, 40), ("speed_hidden", 384, 64), ("speed_layers", 6, 2)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    budget = args.budget if args.budget is not None else (1200 if args.tiny else 480)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "logs", ignore_errors=True)
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "HF_HOME": str(work / "hf-home"),
    }
    shape = SHAPES["tiny" if args.tiny else "1b"]
    suite = Suite(args, out, work, device, shape, time.monotonic() + budget, env)
    print(
        f"[smoke] {'tiny' if args.tiny else '~1B'} model on {device}; budget {budget:.0f} s; work {work}; out {out}"
    )
    return suite.execute(steps)


if __name__ == "__main__":
    sys.exit(main())
