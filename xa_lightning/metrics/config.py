"""The evaluation protocol as validated dataclasses (the ``eval`` config group instantiates these).

``conf/eval/*.yaml`` are ``_target_`` nodes of :class:`EvaluationConfig`; Hydra builds the nested
sections first (``FIDConfig``, ``CLIPConfig``, ...). Plain mappings work too (tests, Python users):
unknown keys and impossible values raise a one-line UserError naming ``eval.<key>``. Which metrics exist
and what each needs (references, real statistics, ...) comes from ``xa_lightning/metrics/registry.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xa_lightning.config import coerce_options, to_plain
from xa_lightning.errors import UserError
from xa_lightning.metrics.base import OTHER_SAMPLER, REAL_STATISTICS, REFERENCES
from xa_lightning.metrics.depth import DepthConfig
from xa_lightning.metrics.registry import METRICS

_plain = to_plain  # instantiate may pass DictConfig / ListConfig


def _positive(value: Any, key: str, allow_zero: bool = False) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value!r} must be an integer") from None
    if number < 0 or (number == 0 and not allow_zero):
        raise UserError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")
    return number


@dataclass
class FIDConfig:
    """FID / KID settings.

    ``reference_stats``: a ``.npz`` (clean-fid's mu/sigma) or a name cached by ``xa-eval fid-stats``;
    when set, no real images are needed. ``num_real_images``: the first N real images of whichever
    source (datamodule, ``eval.real_dir``, a tensor); None = as many as images are generated.
    ``weights_dir``: where clean-fid's Inception file lives (default: ``<cache>/fid``).
    ``low_rank_max_images``: sets up to this size keep their features (exact, fast FID on small sets);
    memory stays bounded.
    """

    reference_stats: str | None = None
    weights_dir: str | None = None
    num_real_images: int | None = None
    low_rank_max_images: int = 1024
    kid_subsets: int = 100
    kid_subset_size: int = 1000

    def __post_init__(self) -> None:
        if self.num_real_images is not None:
            self.num_real_images = _positive(self.num_real_images, "eval.fid.num_real_images")
        self.low_rank_max_images = _positive(self.low_rank_max_images, "eval.fid.low_rank_max_images", True)
        self.kid_subsets = _positive(self.kid_subsets, "eval.fid.kid_subsets")
        self.kid_subset_size = _positive(self.kid_subset_size, "eval.fid.kid_subset_size")


@dataclass
class CLIPConfig:
    """open_clip model for CLIP score / image similarity / style similarity.

    ``model``: built-in name (ViT-L-14), ``hf-hub:org/repo`` or ``local-dir:/path``; ``pretrained``:
    tag (openai), weights file, or null (random init, flagged). ``require_pretrained``: fail instead
    of falling back to a random-init encoder.
    """

    model: str = "ViT-B-32"
    pretrained: str | None = "openai"
    cache_dir: str | None = None
    require_pretrained: bool = False


@dataclass
class IDAConfig:
    """Identity alignment: ``backend`` dlib (offline weights) or insightface (``model_dir``: antelopev2).

    ``missing_face``: zero (a generated image without a face scores 0; what paper numbers use) or skip
    (IDA over the pairs with both faces; inflates a method that loses faces).
    """

    backend: str = "dlib"
    model_dir: str | None = None
    missing_face: str = "zero"
    det_size: int = 640
    detector: str = "hog"

    def __post_init__(self) -> None:
        if self.backend not in ("dlib", "insightface"):
            raise UserError(f"eval.ida.backend={self.backend!r}: choose dlib or insightface")
        if self.missing_face not in ("zero", "skip"):
            raise UserError(f"eval.ida.missing_face={self.missing_face!r}: choose zero or skip")
        if self.detector not in ("hog", "cnn"):
            raise UserError(f"eval.ida.detector={self.detector!r}: choose hog or cnn")

    def embedder_kwargs(self) -> dict[str, Any]:
        if self.backend == "dlib":
            return {"detector": self.detector}
        return {"det_size": int(self.det_size)}


@dataclass
class EdgeConfig:
    """Edge F1: Canny thresholds, the match tolerance in pixels (at the references' resolution), and what
    the references are: ``edges`` (control edge maps) or ``image`` (photos, edges by the same Canny)."""

    low_threshold: int = 100
    high_threshold: int = 200
    radius: int = 2
    references: str = "edges"

    def __post_init__(self) -> None:
        if self.references not in ("edges", "image"):
            raise UserError(f"eval.edge.references={self.references!r}: choose edges or image")


@dataclass
class EvaluationConfig:
    """What the evaluation callback and ``xa-eval`` generate and score.

    Images: ``num_images`` generations with seeds ``seed + i``, ``batch_size`` per sampler call. With
    references, each reference is used for ``images_per_reference`` consecutive images (A4A: 4).
    Sources (when the datamodule does not provide ``eval_prompts`` / ``eval_references`` /
    ``real_images``): ``prompts_file`` (one prompt a line), ``references_dir``, ``real_dir``.
    ``pairs``: pairwise FID between samplers, e.g. ``[[sun, teacher]]``. ``style_reference``: the
    sampler whose images are the style target of ``style_similarity``. ``every_n_steps``: 0 = only at
    the end (``at_end``).
    """

    metrics: list[str] = field(default_factory=lambda: ["fid", "clip_score"])
    num_images: int = 64
    batch_size: int = 8
    seed: int = 1234
    every_n_steps: int = 1000
    at_end: bool = True
    log_images: int = 8
    images_per_reference: int = 1
    prompts_file: str | None = None
    references_dir: str | None = None
    reference_resolution: int = 224
    real_dir: str | None = None
    samplers: list[str] | None = None
    pairs: list[list[str]] = field(default_factory=list)
    style_reference: str | None = None
    output_dir: str | None = None
    progress: bool = True
    fid: FIDConfig | Mapping | None = None
    clip: CLIPConfig | Mapping | None = None
    ida: IDAConfig | Mapping | None = None
    edge: EdgeConfig | Mapping | None = None
    depth: DepthConfig | Mapping | None = None

    def __post_init__(self) -> None:
        self.metrics = [str(m) for m in (_plain(self.metrics) or [])]
        for name in self.metrics:
            if name not in METRICS:
                close = difflib.get_close_matches(name, list(METRICS), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise UserError(f"eval.metrics: unknown metric {name!r}{hint}; available: {', '.join(METRICS)}")
        self.num_images = _positive(self.num_images, "eval.num_images")
        self.batch_size = _positive(self.batch_size, "eval.batch_size")
        self.every_n_steps = _positive(self.every_n_steps or 0, "eval.every_n_steps", allow_zero=True)
        self.log_images = _positive(self.log_images, "eval.log_images", allow_zero=True)
        self.images_per_reference = _positive(self.images_per_reference, "eval.images_per_reference")
        self.reference_resolution = _positive(self.reference_resolution, "eval.reference_resolution")
        self.samplers = None if self.samplers is None else [str(s) for s in _plain(self.samplers)]
        pairs = _plain(self.pairs) or []
        if not all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in pairs):
            raise UserError(f"eval.pairs={pairs!r}: give pairs of sampler names, e.g. [[sun, teacher]]")
        self.pairs = [[str(a), str(b)] for a, b in pairs]
        if self.metrics_needing(OTHER_SAMPLER) and not self.style_reference:
            raise UserError(
                f"eval.style_reference is required for {', '.join(self.metrics_needing(OTHER_SAMPLER))}: the "
                "sampler whose images are the style target (e.g. the base model + LoRA)"
            )
        self.fid = coerce_options(self.fid, FIDConfig, "eval.fid")
        self.clip = coerce_options(self.clip, CLIPConfig, "eval.clip")
        self.ida = coerce_options(self.ida, IDAConfig, "eval.ida")
        self.edge = coerce_options(self.edge, EdgeConfig, "eval.edge")
        self.depth = coerce_options(self.depth, DepthConfig, "eval.depth")

    @classmethod
    def coerce(cls, value: EvaluationConfig | Mapping | None) -> EvaluationConfig:
        """An EvaluationConfig from itself, a mapping / DictConfig (``_target_`` ignored) or None (defaults)."""
        return coerce_options(value, cls, "eval")

    def metrics_needing(self, need: str) -> list[str]:
        """The configured metrics that declare ``need`` (``xa_lightning.metrics.base.REFERENCES``, ...)."""
        return [name for name in self.metrics if need in METRICS[name].needs]

    def needs_references(self) -> bool:
        return bool(self.metrics_needing(REFERENCES))

    def needs_real_statistics(self) -> bool:
        return bool(self.metrics_needing(REAL_STATISTICS))

    def needs_real_images(self) -> bool:
        return self.needs_real_statistics() and not self.fid.reference_stats

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
