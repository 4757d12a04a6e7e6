"""Evaluation metrics as torchmetrics Metrics over uint8 ``(B, 3, H, W)`` images (docs/evaluation.md).

One protocol (:mod:`~xa_lightning.metrics.base`): ``update(images, prompts, references)``, declared
``needs``, ``prepare`` / ``from_config`` / ``results``; :mod:`~xa_lightning.metrics.registry` maps each
``eval.metrics`` name to its class.

* :class:`FrechetInceptionDistance` / :class:`KernelInceptionDistance` - clean-fid's preprocessing and
  Inception, streaming sufficient statistics.
* :class:`ClipScore`, :class:`ClipImageSimilarity`, :class:`StyleSimilarity` - open_clip; flagged
  ``*_untrained`` when the encoder has no real weights.
* :class:`IdentityAlignment` - face-embedding cosine (insightface or dlib) with face-detection rate.
* :class:`EdgeF1` - ControlNet condition fidelity.
* :func:`evaluate_samplers` - generate with a method's samplers and score (callback and ``xa-eval``).
* :mod:`~xa_lightning.metrics.weights` - where the weights come from (offline first).

Heavy libraries (clean-fid, open_clip, dlib, insightface) are imported only when a metric is built.
"""

from xa_lightning.metrics.base import EvaluationMetric, MetricContext
from xa_lightning.metrics.clip_score import (
    ClipImageSimilarity,
    ClipScore,
    LoadedClip,
    StyleSimilarity,
    UntrainedEncoderWarning,
    get_clip,
    load_clip,
)
from xa_lightning.metrics.condition import EdgeF1, canny_edges, edge_f1
from xa_lightning.metrics.config import CLIPConfig, EdgeConfig, EvaluationConfig, FIDConfig, IDAConfig
from xa_lightning.metrics.evaluate import build_evaluation_set, evaluate_samplers, prepare_evaluation, real_statistics
from xa_lightning.metrics.fid import (
    FeatureStatistics,
    FrechetInceptionDistance,
    InceptionStatistics,
    compute_statistics,
    frechet_distance,
)
from xa_lightning.metrics.ida import (
    DlibFaceEmbedder,
    FaceEmbedder,
    IdentityAlignment,
    InsightFaceEmbedder,
    build_face_embedder,
)
from xa_lightning.metrics.inception import InceptionFeatureExtractor, get_inception
from xa_lightning.metrics.kid import KernelInceptionDistance, kernel_inception_distance
from xa_lightning.metrics.registry import METRICS
from xa_lightning.metrics.weights import ensure_inception_weights, resolve_clip

__all__ = [
    "CLIPConfig",
    "ClipImageSimilarity",
    "ClipScore",
    "DlibFaceEmbedder",
    "EdgeConfig",
    "EdgeF1",
    "EvaluationConfig",
    "EvaluationMetric",
    "FIDConfig",
    "FaceEmbedder",
    "FeatureStatistics",
    "FrechetInceptionDistance",
    "IDAConfig",
    "IdentityAlignment",
    "InceptionFeatureExtractor",
    "InceptionStatistics",
    "InsightFaceEmbedder",
    "KernelInceptionDistance",
    "LoadedClip",
    "METRICS",
    "MetricContext",
    "StyleSimilarity",
    "UntrainedEncoderWarning",
    "build_evaluation_set",
    "build_face_embedder",
    "canny_edges",
    "compute_statistics",
    "edge_f1",
    "ensure_inception_weights",
    "evaluate_samplers",
    "frechet_distance",
    "get_clip",
    "get_inception",
    "kernel_inception_distance",
    "load_clip",
    "prepare_evaluation",
    "real_statistics",
    "resolve_clip",
]
