"""Evaluation: validation cross-entropy (whole chunk and response-only) and the conditional
feature-matching loss vs completion length, with their report files (CSV, PNG, metrics.json).

Every function here is collective (call it on every rank); only rank 0 writes files.
"""

from ebft_megatron.evaluation.ce import validation_ce

__all__ = ["validation_ce"]
