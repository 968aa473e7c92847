"""Evaluation: feature extraction, distances, CMC / mAP (Market-1501 protocol, Zheng et al. 2015)."""
from .distance import compute_distance
from .evaluator import evaluate_features, evaluate_model
from .features import extract_features
from .metrics import evaluate_rank, evaluate_rank_reference

__all__ = [
    "compute_distance",
    "evaluate_features",
    "evaluate_model",
    "evaluate_rank",
    "evaluate_rank_reference",
    "extract_features",
]
