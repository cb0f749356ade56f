"""Report files: CSV rows equal the curves, PNG and metrics.json written atomically on rank 0 only."""

import csv
import json

import pytest

from ebft_megatron.evaluation import Evaluation, FeatureMatchingCurve, write_report
from ebft_megatron.runtime import distributed

AFTER = FeatureMatchingCurve([1, 2, 3], cfm=[0.1, 0.25, 0.4], alignment=[1.8, 1.5, 1.2],
                             diversity=[1.9, 1.6, 1.4], groups=12)
BEFORE = FeatureMatchingCurve([1, 2, 3], cfm=[0.3, 0.5, 0.7], alignment=[1.4, 1.0, 0.6],
                              diversity=[1.9, 1.8, 1.7], groups=12)
CE_AFTER = {"eval/ce": 2.0, "eval/perplexity": 7.38905609893065, "eval/tokens": 40}
CE_BEFORE = {"eval/ce": 2.5, "eval/perplexity": float("inf"), "eval/tokens": 40}  # inf must not break JSON


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_report_files_hold_the_curves_and_metrics(tmp_path):
    written = write_report(tmp_path / "eval", CE_AFTER, AFTER, before=Evaluation(CE_BEFORE, BEFORE))
    out = tmp_path / "eval"
    assert sorted(p.name for p in written) == ["cfm_by_length.csv", "cfm_by_length.png", "metrics.json"]
    assert sorted(p.name for p in out.iterdir()) == ["cfm_by_length.csv", "cfm_by_length.png", "metrics.json"]

    rows = read_csv(out / "cfm_by_length.csv")
    assert [int(row["length"]) for row in rows] == AFTER.lengths
    for name in ("cfm", "alignment", "diversity"):
        assert [float(row[name]) for row in rows] == getattr(AFTER, name)
        assert [float(row[f"{name}_before"]) for row in rows] == getattr(BEFORE, name)

    png = (out / "cfm_by_length.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"] == {**CE_AFTER, "eval/cfm": 0.4, "eval/alignment": 1.2, "eval/diversity": 1.4}
    assert report["cfm_by_length"] == AFTER.as_dict()
    assert report["before"]["metrics"]["eval/perplexity"] is None
    assert report["before"]["cfm_by_length"]["cfm"] == BEFORE.cfm


def test_without_before_and_curve_alone(tmp_path):
    write_report(tmp_path, CE_AFTER, AFTER)
    rows = read_csv(tmp_path / "cfm_by_length.csv")
    assert list(rows[0]) == ["length", "cfm", "alignment", "diversity"]
    assert "before" not in json.loads((tmp_path / "metrics.json").read_text())
    assert AFTER.plot(tmp_path / "alone.png", label="x").stat().st_size > 0
    with pytest.raises(ValueError, match="different lengths"):
        AFTER.to_csv(tmp_path / "bad.csv", other=FeatureMatchingCurve([1], [0.0], [0.0], [0.0]))


def test_nothing_is_written_off_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_rank0", lambda: False)
    assert write_report(tmp_path / "eval", CE_AFTER, AFTER, before=(CE_BEFORE, BEFORE)) == []
    assert not (tmp_path / "eval").exists()
