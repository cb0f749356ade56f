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
    assert report["metrics"] == {**CE_AFTER, "eval/cfm": 0.4, "eval/cfm_se": None, "eval/alignment": 1.2,
                                 "eval/diversity": 1.4}
    assert report["cfm_by_length"] == {**AFTER.as_dict(), "cfm_error": None}  # NaN: no spread was measured
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


def test_paired_change_is_the_mean_difference_with_its_standard_error():
    import statistics

    from ebft_megatron.evaluation.report import changes, paired_change

    before_values = [0.50, 0.41, 0.62, 0.38, 0.55]
    differences = [0.02, -0.01, 0.03, 0.00, 0.01]
    after_values = [b + d for b, d in zip(before_values, differences)]
    keyed = lambda values: {str(item): value for item, value in enumerate(values)}
    change, error, count = paired_change(keyed(before_values), keyed(after_values))
    assert count == 5
    assert abs(change - statistics.fmean(differences)) < 1e-12
    # the items' own spread (0.09) cancels: only the differences' spread counts
    assert abs(error - statistics.stdev(differences) / 5 ** 0.5) < 1e-12
    with pytest.raises(ValueError, match="the same chunks"):
        paired_change(keyed(before_values), {"0": 0.1})
    # pairs are made by item, not by position
    assert paired_change({"a": 1.0, "b": 5.0}, {"b": 5.5, "a": 1.5})[:2] == (0.5, 0.0)

    curve = lambda values: FeatureMatchingCurve([1], [sum(values) / len(values)], [0.0], [0.0],
                                                group_cfm=keyed(values))
    found = changes(Evaluation(CE_BEFORE, curve(before_values), {"0": 2.4, "1": 2.6}),
                    Evaluation(CE_AFTER, curve(after_values), {"0": 1.8, "1": 2.2}))
    assert found["cfm"].change == pytest.approx(0.01) and found["cfm"].count == 5
    assert (found["ce"].before, found["ce"].after) == (2.5, 2.0)
    assert found["ce"].change == pytest.approx(-0.5) and found["ce"].error == pytest.approx(0.1)
    assert found["ce"].beyond(2.0) and not found["cfm"].beyond(2.0)
    assert found["ce"].text("CE", "chunks") == ("CE 2.5000 -> 2.0000, -0.5000 +- 0.1000 "
                                                "(standard error over 2 chunks, paired)")
