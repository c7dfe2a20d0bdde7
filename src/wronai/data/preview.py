"""`wronai data preview`: what the model sees, with trained tokens marked."""

from __future__ import annotations

from wronai.config.schema import WronAIConfig
from wronai.data.tokenize import IGNORE_INDEX

DIM, RESET, GREEN = "\x1b[2m", "\x1b[0m", "\x1b[32m"


def render_example(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """Decode runs of masked / trained tokens; masked runs shown dim (or in ⟦ ⟧ without colour)."""
    out = []
    run: list[int] = []
    trained = None
    for tid, label in [*zip(input_ids, labels), (None, None)]:
        is_trained = label is not None and label != IGNORE_INDEX
        if tid is None or (trained is not None and is_trained != trained):
            text = tokenizer.decode(run, skip_special_tokens=False)
            if trained:
                out.append(f"{GREEN}{text}{RESET}" if color else text)
            else:
                out.append(f"{DIM}{text}{RESET}" if color else f"⟦{text}⟧")
            run = []
        if tid is not None:
            run.append(tid)
            trained = is_trained
    return "".join(out)


def preview(config: WronAIConfig, n: int = 3, color: bool = False) -> str:
    from wronai.recipe import Pipeline

    pipeline = Pipeline(config)
    pipeline.load_tokenizer()
    data = pipeline.load_dataset()
    tok = pipeline.tokenizer
    lines = [
        "legend: "
        + ("dim = masked (no loss), green = trained" if color else "⟦masked, no loss⟧ plain = trained"),
        "",
    ]
    for i in range(min(n, len(data.train))):
        row = data.train[i]
        trained = sum(1 for x in row["labels"] if x != IGNORE_INDEX)
        lines.append(f"--- example {i + 1}: {len(row['input_ids'])} tokens, {trained} trained ---")
        lines.append(render_example(tok, row["input_ids"], row["labels"], color))
        lines.append("")
    lines.append("--- data summary ---")
    lines.extend(data.stats.summary_lines())
    return "\n".join(lines) + "\n"
