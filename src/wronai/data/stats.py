"""What the data stage produces: the prepared datasets (``PreparedData``) and what happened to the rows (``DataStats``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataStats:
    format: str = ""
    rows_read: dict[str, int] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, str] = field(default_factory=dict)
    dropped_by_hook: int = 0
    chunked_documents: int = 0
    lengths: dict[str, float] = field(default_factory=dict)
    trainable_tokens: int = 0
    total_tokens: int = 0
    packed_rows: int = 0
    padding_fraction_unpacked: float = 0.0
    padding_fraction_packed: float | None = None
    hygiene: dict[str, int] = field(default_factory=dict)
    mix: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)
    cache_key: str = ""

    def summary_lines(self) -> list[str]:
        lines = [
            f"format: {self.format}; examples: "
            + ", ".join(f"{k} {v}" for k, v in self.examples.items())
            + f" (rows read: {', '.join(f'{k} {v}' for k, v in self.rows_read.items())})",
            "tokens per example: " + ", ".join(f"{k} {v:g}" for k, v in self.lengths.items()),
            f"trainable tokens: {self.trainable_tokens} of {self.total_tokens} "
            f"({100 * self.trainable_tokens / max(self.total_tokens, 1):.1f}%)",
        ]
        if self.hygiene:
            h = self.hygiene
            steps = [
                f"{k.replace('_', ' ')} {h[k]}"
                for k in ("normalized", "too_short", "not_polish", "exact_duplicates", "near_duplicates")
                if h.get(k)
            ]
            lines.append(
                f"hygiene: {h.get('rows_in', 0)} rows in, {h.get('rows_out', 0)} kept"
                + (f" ({', '.join(steps)})" if steps else "")
            )
        for m in self.mix:
            repeated = ", rows repeated (with replacement)" if m["with_replacement"] else ""
            lines.append(
                f"mix: {m['source']}: weight {m['weight']:g}, {m['sampled']} of {m['rows']} rows ({100 * m['share']:.1f}%){repeated}"
            )
        if self.skipped:
            lines.append("skipped rows: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        if self.dropped_by_hook:
            lines.append(f"rows dropped by extensions.data_hook: {self.dropped_by_hook}")
        if self.chunked_documents:
            lines.append(f"long documents split into max_seq_length chunks: {self.chunked_documents}")
        pad = f"padding fraction (batches in order): {100 * self.padding_fraction_unpacked:.1f}% unpacked"
        if self.padding_fraction_packed is not None:
            pad += f", {100 * self.padding_fraction_packed:.1f}% packed ({self.packed_rows} rows)"
        lines.append(pad)
        if self.checks:
            lines.append(
                "checks: "
                + ", ".join(f"{k} {'ok' if v == 'ok' else 'FAILED'}" for k, v in self.checks.items())
            )
        return lines


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset
    eval: Any | None
    stats: DataStats
    packed: bool
