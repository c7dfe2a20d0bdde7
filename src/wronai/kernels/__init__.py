"""Every touch of a third-party library's internals, one module per library.

- ``wronai.kernels.bnb`` — bitsandbytes: 4-bit row sources (its dequantize op and quant-state fields), the
  row-sliced ``Linear4bit`` subclass, and the one rule for its packed CPU inference format.

Each module checks the installed version against the range it was written for; WronAI's own kernels
compare themselves with the stock path at start-up and fall back to it, with one note, on a mismatch.
Import these modules lazily (they import their library).
"""

from __future__ import annotations

import logging

# bitsandbytes' CPU backend, on AVX512-BF16 CPUs, at import: an optional kernel it tries to fetch from the Hub
KERNELS_COMMUNITY = "Failed to load CPU gemm_4bit_forward from kernels-community"


class KernelsCommunityFilter(logging.Filter):
    """Drops bitsandbytes' import-time "Failed to load CPU gemm_4bit_forward from kernels-community" warning.

    Its built-in kernel is used and works; ``wronai validate``'s device plan says which one in one line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KERNELS_COMMUNITY)


def quiet_import_warnings() -> None:
    """Filter libraries' import-time notices that are not the user's concern (the CLI's logging setup calls
    it once, before anything imports bitsandbytes; no library is imported here)."""
    target = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, KernelsCommunityFilter) for f in target.filters):
        target.addFilter(KernelsCommunityFilter())
