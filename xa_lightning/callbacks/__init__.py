"""Lightning callbacks: the evaluation callback and its logger plumbing (docs/evaluation.md)."""

from xa_lightning.callbacks.evaluation import METRICS_FILE, EvaluationCallback

__all__ = ["METRICS_FILE", "EvaluationCallback"]
