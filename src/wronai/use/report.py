"""A self-contained HTML report for a run: curves, data statistics, config, samples — plus the model card.

``write_report(run_dir)`` reads what the run saved (trainer_state.json's log history, data_stats.json,
wronai_config.yaml, provenance.json, train_results.json and eval.json when present), draws the curves with
matplotlib (PNG files beside the report, also embedded as base64 so report.html is one portable file),
generates answers to a few fixed Polish prompts in the run's own prompt format, and writes
``report.html``, ``samples.json`` and the model card ``README.md``.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from wronai.errors import WronAIError
from wronai.rundir.files import (
    CONFIG_FILE,
    DATA_STATS_FILE,
    FINISHED_MARKER,
    PROVENANCE_FILE,
    REPORT_FILE,
    SAMPLES_FILE,
    TRAINER_STATE_FILE,
    report_plot_file,
)
from wronai.rundir.locate import locate_run
from wronai.rundir.reading import read_json
from wronai.use.prompts import PromptFormat

logger = logging.getLogger(__name__)

SAMPLE_PROMPTS = [
    "Jaka jest stolica Polski?",
    "Napisz jedno zdanie o Krakowie.",
    "Wyjaśnij krótko, czym jest uczenie maszynowe.",
    "Podaj trzy tradycyjne polskie potrawy.",
]
TEXT_PROMPTS = [
    "Warszawa jest",
    "Najważniejszą rzeką w Polsce",
    "W języku polskim",
]  # runs trained on raw text
PLOTS = {  # file stem -> (title, y label, [(log key, legend label)])
    "loss": ("Loss", "loss", [("loss", "train loss"), ("eval_loss", "eval loss")]),
    "learning_rate": ("Learning rate", "learning rate", [("learning_rate", "learning rate")]),
    "throughput": ("Throughput", "trained tokens / s", [("tokens_per_second", "tokens/s")]),
    "memory": ("Memory", "MiB", [("rss_mb", "process RSS"), ("cuda_max_memory_mb", "CUDA peak allocated")]),
    "grad_norm": ("Gradient norm", "grad norm (before clipping)", [("grad_norm", "grad norm")]),
}


def series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [
        (float(h["step"]), float(h[key]))
        for h in history
        if key in h and "step" in h and isinstance(h[key], (int, float))
    ]
    return [p[0] for p in points], [p[1] for p in points]


def plot(history: list[dict[str, Any]], stem: str) -> bytes | None:
    """One PNG for a PLOTS entry, or None when none of its values were logged."""
    from io import BytesIO

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise WronAIError("the run report needs matplotlib — pip install matplotlib") from None

    title, ylabel, keys = PLOTS[stem]
    lines = [(label, *series(history, key)) for key, label in keys]
    lines = [line for line in lines if line[1]]
    if not lines:
        return None
    fig = Figure(figsize=(6.4, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, xs, ys in lines:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3.5, linewidth=1.6, label=label)
    ax.set_title(title, fontsize=11, loc="left", fontweight="bold")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if stem in ("learning_rate", "throughput"):
        ax.set_ylim(bottom=0, top=max(max(ys) for _, _, ys in lines) * 1.1 or 1)
    if stem == "learning_rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if len(lines) > 1:
        ax.legend(frameon=False)
    fig.tight_layout()
    buf = BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def generate_samples(
    run_dir: Path, model: Any = None, tokenizer: Any = None, max_new_tokens: int = 64
) -> list[dict[str, str]]:
    """Greedy answers to the fixed prompts, rendered in the run's prompt format."""
    from wronai.use.generate import GenerationOptions, generate
    from wronai.use.load import LoadedRun, load_run

    if model is None:
        run = load_run(run_dir)
    else:
        found = locate_run(run_dir)
        fmt = PromptFormat.for_run(found.data_format, found.config.data if found.config else None, tokenizer)
        run = LoadedRun(found, model, tokenizer, fmt, "as trained")
    prompts = TEXT_PROMPTS if run.prompt.fmt == "text" else SAMPLE_PROMPTS
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=1.1)
    saved = (run.model.training, getattr(run.model.config, "use_cache", None), run.tokenizer.padding_side)
    run.model.eval()
    run.model.config.use_cache = True
    run.tokenizer.padding_side = "left"
    try:
        answers = generate(run, [run.prompt.single(p) for p in prompts], options)
    finally:
        run.model.train(saved[0])
        run.model.config.use_cache = saved[1]
        run.tokenizer.padding_side = saved[2]
    return [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _summary(
    history: list[dict[str, Any]], train: dict[str, Any], evals: list[dict[str, Any]], state: dict[str, Any]
) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("optimizer steps", state.get("global_step", "?"))]
    _, losses = series(history, "loss")
    if losses:
        rows.append(("train loss: first → last logged", f"{losses[0]:.4f} → {losses[-1]:.4f}"))
    _, eval_losses = series(history, "eval_loss")
    if eval_losses:
        rows.append(("eval loss: first → last", f"{eval_losses[0]:.4f} → {eval_losses[-1]:.4f}"))
    for r in evals:
        s = r.get("scores", {})
        if "base" in s and "tuned" in s:
            rows.append(
                (
                    f"perplexity on {r.get('data')}",
                    f"base {s['base']['perplexity']:.3f} → tuned {s['tuned']['perplexity']:.3f}",
                )
            )
        elif s:
            name, score = next(iter(s.items()))
            rows.append((f"perplexity on {r.get('data')} ({name})", f"{score['perplexity']:.3f}"))
    if "train_runtime" in train:
        rows.append(("training time", f"{train['train_runtime']:.1f} s"))
    _, tps = series(history, "tokens_per_second")
    if tps:
        rows.append(("throughput (mean of logged)", f"{sum(tps) / len(tps):.1f} trained tokens/s"))
    for key, label in (("rss_mb", "peak process RSS"), ("cuda_max_memory_mb", "peak CUDA memory")):
        _, values = series(history, key)
        if values:
            rows.append((label, f"{max(values):.0f} MiB"))
    return rows


def _plots_html(images: dict[str, bytes]) -> str:
    """The embedded PNGs, and a note naming the plots this run did not log."""
    missing = [PLOTS[s][0].lower() for s in ("throughput", "memory") if s not in images]
    plots = "".join(
        f"<figure><img alt='{html.escape(PLOTS[stem][0])}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></figure>"
        for stem, png in images.items()
    )
    if missing:
        plots += (
            f"<p class='note'>Not logged in this run: {', '.join(missing)} — add "
            "<code>wronai.train.throughput:ThroughputMemoryCallback</code> to <code>extensions.callbacks</code>.</p>"
        )
    return plots


def _samples_html(samples: list[dict[str, str]] | None, samples_note: str) -> str:
    if not samples:
        return f"<p class='note'>{html.escape(samples_note)}</p>"
    return "".join(
        f"<div class='sample'><div class='q'>{html.escape(s['prompt'])}</div><div class='a'>{html.escape(s['answer']) or '<em>(empty)</em>'}</div></div>"
        for s in samples
    )


def _data_rows(stats: dict[str, Any]) -> list[tuple[str, Any]]:
    """The data section: what data_stats.json says the data stage kept, dropped and measured."""
    rows = [
        ("format", stats.get("format", "?")),
        ("examples", ", ".join(f"{k} {v}" for k, v in stats.get("examples", {}).items())),
        ("rows read", ", ".join(f"{k} {v}" for k, v in stats.get("rows_read", {}).items())),
        ("tokens per example", ", ".join(f"{k} {_fmt(v, 1)}" for k, v in stats.get("lengths", {}).items())),
        ("trained tokens", f"{stats.get('trainable_tokens', '?')} of {stats.get('total_tokens', '?')}"),
        ("skipped rows", ", ".join(f"{k} {v}" for k, v in stats.get("skipped", {}).items()) or "none"),
        ("padding (unpacked)", f"{100 * stats.get('padding_fraction_unpacked', 0.0):.1f}%"),
    ]
    if stats.get("packed_rows"):
        rows.append(
            (
                "packed rows",
                f"{stats['packed_rows']} ({100 * (stats.get('padding_fraction_packed') or 0):.1f}% padding)",
            )
        )
    return rows


def render_html(
    run_dir: Path, images: dict[str, bytes], samples: list[dict[str, str]] | None, samples_note: str
) -> str:
    from wronai.use.evaluate import load_results

    state = read_json(run_dir / TRAINER_STATE_FILE) or {}
    history = state.get("log_history", [])
    train = read_json(run_dir / FINISHED_MARKER) or {}
    prov = read_json(run_dir / PROVENANCE_FILE) or {}
    evals = load_results(run_dir)
    config_text = (
        (run_dir / CONFIG_FILE).read_text(encoding="utf-8") if (run_dir / CONFIG_FILE).is_file() else ""
    )
    base = (
        str(((yaml.safe_load(config_text) or {}).get("model") or {}).get("name", "?")) if config_text else "?"
    )
    plots = _plots_html(images)
    sample_html = _samples_html(samples, samples_note)
    stat_rows = _data_rows(read_json(run_dir / DATA_STATS_FILE) or {})
    env_rows = [(k, v) for k, v in prov.get("versions", {}).items()] + [
        ("device plan", "; ".join(prov.get("device_plan", [])))
    ]
    name = html.escape(run_dir.resolve().name)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>WronAI run report: {name}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{CSS}</style></head>
<body><main>
<header><p class="brand">WronAI run report</p><h1>{name}</h1>
<p class="sub">base model <code>{html.escape(base)}</code> · {html.escape(str(run_dir.resolve()))} · report written {datetime.now():%Y-%m-%d %H:%M}</p></header>
<section><h2>Summary</h2>{_table(_summary(history, train, evals, state))}</section>
<section><h2>Training curves</h2><div class="plots">{plots or "<p class='note'>No log history (trainer_state.json) in this folder.</p>"}</div></section>
<section><h2>Samples</h2><p class="note">Greedy decoding, in the prompt format the run was trained with.</p>{sample_html}</section>
<section><h2>Data</h2>{_table(stat_rows)}</section>
<section><h2>Resolved config</h2><pre class='config'>{html.escape(config_text)}</pre></section>
<section><h2>Environment</h2>{_table(env_rows)}</section>
</main></body></html>
"""


CSS = """
body{margin:0;background:#f4f5f7;color:#1d2433;font:15px/1.5 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px}
header{border-bottom:3px solid #c8102e;margin-bottom:8px;padding-bottom:12px}
.brand{margin:0;color:#c8102e;font-weight:700;letter-spacing:.08em;text-transform:uppercase;font-size:12px}
h1{margin:4px 0 2px;font-size:28px} .sub{margin:0;color:#5b6475;font-size:13px}
h2{font-size:18px;margin:0 0 12px} section{background:#fff;border-radius:10px;padding:18px 22px;margin:18px 0;box-shadow:0 1px 3px rgba(0,0,0,.07)}
table.kv{border-collapse:collapse;width:100%} .kv th{text-align:left;font-weight:600;width:32%;color:#394152}
.kv th,.kv td{padding:6px 10px;border-bottom:1px solid #eceef2;vertical-align:top}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:14px}
figure{margin:0} figure img{width:100%;border:1px solid #eceef2;border-radius:6px}
.sample{border-left:4px solid #c8102e;background:#fafbfc;margin:10px 0;padding:8px 14px;border-radius:0 6px 6px 0}
.q{font-weight:600} .a{white-space:pre-wrap;color:#2d3446;margin-top:4px}
pre{background:#1d2433;color:#e8ebf1;padding:14px 18px;border-radius:8px;overflow:auto;font-size:12.5px;line-height:1.45}
@media (min-width:900px){pre.config{column-count:3;column-gap:28px;column-rule:1px solid #39415a}}
code{background:#eef0f4;padding:1px 5px;border-radius:4px;font-size:90%} pre code{background:none}
.note{color:#5b6475;font-size:13.5px}
"""


def write_report(
    run_dir: str | Path,
    *,
    model: Any = None,
    tokenizer: Any = None,
    samples: bool = True,
    max_new_tokens: int = 64,
) -> Path:
    """Write RUN_DIR/report.html (+ report_*.png, samples.json) and the model card RUN_DIR/README.md.

    Pass the in-memory ``model`` and ``tokenizer`` (e.g. right after training) to skip reloading them;
    ``samples=False`` skips generation. Returns the path of report.html.
    """
    from wronai.use.model_card import write_run_card

    run = Path(run_dir)
    if not (run / CONFIG_FILE).is_file():
        raise WronAIError(f"{run}: no {CONFIG_FILE} — pass a finished run's training.output_dir")
    history = (read_json(run / TRAINER_STATE_FILE) or {}).get("log_history", [])
    images: dict[str, bytes] = {}
    for stem in PLOTS:
        png = plot(history, stem)
        if png is not None:
            images[stem] = png
            (run / report_plot_file(stem)).write_bytes(png)
    sample_rows: list[dict[str, str]] | None = None
    note = "Samples were not generated (samples=False)."
    if samples and model is not None and any(hasattr(w, "ds_id") for w in model.parameters()):
        # ZeRO-3 splits every weight across ranks: one process alone cannot generate with them
        samples = False
        note = f"Samples were not generated in-process (weights split by ZeRO-3) — run `wronai report {run}`."
    if samples:
        try:
            sample_rows = generate_samples(run, model, tokenizer, max_new_tokens)
            (run / SAMPLES_FILE).write_text(
                json.dumps(sample_rows, indent=2, ensure_ascii=False), encoding="utf-8"
            )
        except WronAIError as err:
            note = f"Samples could not be generated: {err}"
            logger.warning("report: %s", note)
    path = run / REPORT_FILE
    path.write_text(render_html(run, images, sample_rows, note), encoding="utf-8")
    write_run_card(run)
    logger.info("report written to %s", path)
    return path
