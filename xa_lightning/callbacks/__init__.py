"""Lightning callbacks: the evaluation callback and its logger plumbing (docs/evaluation.md)."""

from xa_lightning.callbacks.evaluation import METRICS_FILE, EvaluationCallback
from xa_lightning.callbacks.wandb_offline import read_offline_run

__all__ = ["METRICS_FILE", "EvaluationCallback", "read_offline_run"]
