"""``data.packing: auto``: packing on wherever packed examples stay apart, decided once per run.

Packed rows keep each example's attention to itself (position ids restart per example; per-example sdpa or
flash-attention's variable-length kernels, ``wronai.model.attention``) and its loss equal to the unpacked
loss (tests/data/test_data_packing.py), for every row format; a forward then carries full rows instead of
padding. Models with their own modeling code (``model.trust_remote_code``) may not honour the restarted
position ids, so ``auto`` leaves them unpacked.
"""

from __future__ import annotations

from typing import Any


def resolve_packing(config: Any) -> tuple[Any, list[str]]:
    """``config`` with ``data.packing`` decided (a copy when it was ``auto``), and the note saying why."""
    if config.data.packing != "auto":
        return config, []
    on = not config.model.trust_remote_code
    why = (
        "packed examples keep their own attention and loss, full rows instead of padding"
        if on
        else "model.trust_remote_code: its own modeling code may not keep packed examples apart — set data.packing: "
        "true if it does"
    )
    data = config.data.model_copy(update={"packing": on})
    return config.model_copy(update={"data": data}), [
        f"data.packing: auto -> {'on' if on else 'off'} ({why})"
    ]
