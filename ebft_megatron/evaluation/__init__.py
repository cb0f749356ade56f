"""Evaluation: validation cross-entropy (whole chunk and response-only), the conditional
feature-matching loss vs completion length and their report files (CSV, PNG, metrics.json);
HumanEval in a sandbox (``humaneval``, ``sandbox``) and translation BLEU/chrF (``translation``).

Every model-running function here is collective (call it on every rank); only rank 0 writes
files. Names are imported on first use, so the light modules stay light.
"""

from ebft_megatron.lazy import lazy_exports

_EXPORTS = {
    "validation_ce": "ebft_megatron.evaluation.ce",
    "FeatureMatchingCurve": "ebft_megatron.evaluation.feature_matching",
    "feature_matching_by_length": "ebft_megatron.evaluation.feature_matching",
    "feature_matching_curve": "ebft_megatron.evaluation.feature_matching",
    "Evaluation": "ebft_megatron.evaluation.report",
    "evaluate": "ebft_megatron.evaluation.report",
    "evaluate_run": "ebft_megatron.evaluation.report",
    "write_items": "ebft_megatron.evaluation.report",
    "write_report": "ebft_megatron.evaluation.report",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
