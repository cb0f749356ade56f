"""benchmarks/default_sweep.py: the pass rule fixed before the sweep, and its table."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("default_sweep", ROOT / "benchmarks" / "default_sweep.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def change(cfm, cfm_error, ce, ce_error):
    return {"cfm": {"before": 0.45, "after": 0.45 + cfm, "change": cfm, "error": cfm_error, "count": 248},
            "ce": {"before": 2.7, "after": 2.7 + ce, "change": ce, "error": ce_error, "count": 8}}


def test_a_trial_passes_when_cfm_falls_beyond_2_se_and_ce_rises_less_than_1_se():
    assert sweep.passes(change(-0.021, 0.01, 0.0, 0.01))
    assert not sweep.passes(change(-0.019, 0.01, 0.0, 0.01))  # within 2 SE
    assert not sweep.passes(change(0.03, 0.01, 0.0, 0.01))  # beyond noise, the wrong way
    assert sweep.passes(change(-0.03, 0.01, 0.01, 0.01))  # CE up by exactly 1 SE is allowed
    assert not sweep.passes(change(-0.03, 0.01, 0.011, 0.01))


def test_the_table_gives_each_trial_and_a_candidate_verdict_over_3_seeds(tmp_path):
    name = "lr3e-5_dp2_s10"
    for seed, cfm in ((1, -0.03), (2, -0.025), (3, -0.02)):
        run = tmp_path / name / f"seed{seed}" / "run"
        run.mkdir(parents=True)
        trial = {"candidate": name, "seed": seed, "wall_s": 500.0, **change(cfm, 0.008, -0.01, 0.005)}
        trial["passes"] = sweep.passes(trial)
        (run.parent / "trial.json").write_text(json.dumps(trial))
        rows = [{"step": 0, "eval/cfm": 0.45, "eval/alignment": 1.17, "eval/diversity": 1.23},
                {"step": 10, "eval/cfm": 0.45 + cfm, "eval/alignment": 1.20, "eval/diversity": 1.20}]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    text = sweep.table(tmp_path)
    assert text.count("| lr3e-5_dp2_s10 |") == 3 and "| +0.0300 | -0.0300 |" in text  # 2a and 2d changes
    # mean -0.025, sd 0.005, t(2) 4.303 x 0.005 / sqrt(3) = 0.0124
    assert "CFM change -0.0250 [-0.0374, -0.0126] over 3 seeds" in text
    assert text.rstrip().endswith("longest run with setup 520 s: passes")
    slow = json.loads((tmp_path / name / "seed3" / "trial.json").read_text()) | {"wall_s": 590.0}
    (tmp_path / name / "seed3" / "trial.json").write_text(json.dumps(slow))
    assert sweep.table(tmp_path).rstrip().endswith("does not pass")  # 590 s + setup is over 10 minutes
