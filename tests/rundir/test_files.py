"""rundir/files: every file name of a run directory is defined there once and listed in its table."""

from __future__ import annotations

import re
from pathlib import Path

from wronai.rundir import files

SRC = Path(files.__file__).resolve().parents[1]


def _names() -> dict[str, str]:
    return {k: v for k, v in vars(files).items() if k.isupper() and isinstance(v, str)}


def test_every_constant_is_in_the_docstring_table():
    doc = files.__doc__ or ""
    for constant, name in _names().items():
        assert f"``{constant}``" in doc, constant
        assert name.rstrip("-.") in doc, name
    for weights in files.WEIGHT_FILES:
        assert weights.endswith((".safetensors", ".bin"))


def test_no_other_module_defines_a_run_directory_file_name():
    names = "|".join(re.escape(n) for n in _names().values())
    assignment = re.compile(rf"^\s*[A-Z_]+\s*=\s*[\"']({names})[\"']", re.MULTILINE)
    found = [
        f"{path.relative_to(SRC)}: {m.group(0).strip()}"
        for path in SRC.rglob("*.py")
        if path.name != "files.py" or path.parent.name != "rundir"
        for m in assignment.finditer(path.read_text(encoding="utf-8"))
    ]
    assert found == []


def test_report_plot_file_names():
    assert files.report_plot_file("loss") == "report_loss.png"
