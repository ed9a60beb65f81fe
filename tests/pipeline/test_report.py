"""Reports: CSV/JSON/PNG/Markdown files are produced and readable; time to target."""

import json
import math

import pytest

from ftte.pipeline.report import (
    HISTORY_FIELDS,
    plot_accuracy,
    read_history_csv,
    time_to_target,
    write_history_csv,
    write_markdown_report,
    write_summary_json,
)


def _history(speed=1.0, n=30):
    return [
        {
            "version": v,
            "virtual_time_s": v * 10.0 / speed,
            "accuracy": None if v % 3 == 1 else min(0.95, 0.1 + v * 0.04),
            "loss": 2.0 / (v + 1),
            "cohort_size": 10,
            "mean_staleness": 0.5 * v,
            "bytes_up": 1000 * v,
        }
        for v in range(n)
    ]


def test_time_to_target():
    h = _history()
    assert time_to_target(h, 0.45) == 90.0  # v=9: 0.1 + 0.36
    assert time_to_target(h, 0.5) == 110.0  # v=10 reaches it but was not evaluated
    assert time_to_target(h, 0.99) is None
    assert time_to_target(list(reversed(h)), 0.45) == 90.0  # order-independent
    assert time_to_target([{"virtual_time_s": 1.0, "accuracy": math.nan}], 0.1) is None
    assert time_to_target([], 0.5) is None


def test_files_are_written(tmp_path):
    h = _history()
    csv_path = write_history_csv(tmp_path / "out" / "history.csv", h)
    back = read_history_csv(csv_path)
    assert list(back[0])[: len(HISTORY_FIELDS)] == list(HISTORY_FIELDS)
    assert back[1]["accuracy"] is None and back[2]["accuracy"] == pytest.approx(0.18)
    assert back[5]["bytes_up"] == 5000 and back[5]["version"] == 5

    js = write_summary_json(tmp_path / "summary.json", {"strategy": "ftte", "eps": float("inf"), "t": (1, 2)})
    assert json.loads(js.read_text()) == {"strategy": "ftte", "eps": "inf", "t": [1, 2]}

    png = plot_accuracy({"ftte": h, "fedavg": _history(speed=0.3)}, tmp_path / "plots" / "acc.png", target=0.5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    md = write_markdown_report(tmp_path, {"strategy": "ftte", "time_to_target_s": 100.0}, h, [png])
    text = md.read_text()
    assert "time_to_target_s" in text and "(plots/acc.png)" in text
    assert "| version | virtual_time_s | accuracy |" in text
    long = write_markdown_report(tmp_path, {"strategy": "x"}, _history(n=100), [], name="long.md", max_history_rows=10)
    assert "100 versions; 10 shown" in long.read_text()


def test_history_rows_need_standard_fields(tmp_path):
    with pytest.raises(ValueError, match="mean_staleness"):
        write_history_csv(tmp_path / "h.csv", [{"version": 0, "virtual_time_s": 0, "accuracy": 0.1, "loss": 1, "cohort_size": 1}])
