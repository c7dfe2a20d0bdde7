"""rundir/reading: a run directory's JSON file that is missing or broken reads as None."""

from __future__ import annotations

from wronai.rundir.reading import read_json


def test_read_json(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"format": "alpaca", "zażółć": 1}', encoding="utf-8")
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": ', encoding="utf-8")
    assert read_json(good) == {"format": "alpaca", "zażółć": 1}
    assert read_json(broken) is None
    assert read_json(tmp_path / "missing.json") is None
    assert read_json(tmp_path) is None  # a directory
