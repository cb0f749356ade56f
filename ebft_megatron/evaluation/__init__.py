"""Evaluation: validation cross-entropy (whole chunk and response-only) and the conditional
feature-matching loss vs completion length, with their report files (CSV, PNG, metrics.json).

Every function here is collective (call it on every rank); only rank 0 writes files.
"""

from ebft_megatron.evaluation.ce import validation_ce
from ebft_megatron.evaluation.feature_matching import (
    FeatureMatchingCurve,
    feature_matching_by_length,
    feature_matching_curve,
)
from ebft_megatron.evaluation.report import Evaluation, evaluate, write_report

__all__ = [
    "Evaluation",
    "FeatureMatchingCurve",
    "evaluate",
    "feature_matching_by_length",
    "feature_matching_curve",
    "validation_ce",
    "write_report",
]
