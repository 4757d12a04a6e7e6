"""Every evaluation metric by the name ``eval.metrics`` uses: adding a metric = its file + one line here.

Each class follows :class:`xa_lightning.metrics.base.EvaluationMetric` (``update(images, prompts,
references)``, ``needs``, ``prepare``, ``from_config``, ``results``); the config checks and
``evaluate_samplers`` only read this table.
"""

from __future__ import annotations

from xa_lightning.metrics.base import EvaluationMetric
from xa_lightning.metrics.clip_score import ClipImageSimilarity, ClipScore, StyleSimilarity
from xa_lightning.metrics.condition import EdgeF1
from xa_lightning.metrics.depth import DepthRMSE
from xa_lightning.metrics.fid import FrechetInceptionDistance
from xa_lightning.metrics.ida import IdentityAlignment
from xa_lightning.metrics.kid import KernelInceptionDistance

METRICS: dict[str, type[EvaluationMetric]] = {
    metric.name: metric
    for metric in (
        FrechetInceptionDistance,
        KernelInceptionDistance,
        ClipScore,
        ClipImageSimilarity,
        IdentityAlignment,
        EdgeF1,
        StyleSimilarity,
        DepthRMSE,
    )
}
