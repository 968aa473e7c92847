"""Evaluation: feature extraction, matchers (distances, later QAConv), post-processors, CMC / mAP (Market-1501
protocol, Zheng et al. 2015).

:mod:`nasreid.evaluation.runner` evaluates a network or a retrain run folder with a recipe's ``eval`` settings
(``nasreid evaluate``); it uses the engine's run folders, so it is imported by its module path, not from here."""
from .distance import compute_distance
from .evaluator import evaluate_features, evaluate_model
from .features import extract_feature_set, extract_features
from .matchers import FeatureDistance, FeatureSet, Matcher, PostProcessor, evaluate_matcher
from .metrics import EvaluationError, evaluate_rank, evaluate_rank_reference

__all__ = [
    "EvaluationError",
    "FeatureDistance",
    "FeatureSet",
    "Matcher",
    "PostProcessor",
    "compute_distance",
    "evaluate_features",
    "evaluate_matcher",
    "evaluate_model",
    "evaluate_rank",
    "evaluate_rank_reference",
    "extract_feature_set",
    "extract_features",
]
