"""The evaluation protocol as validated dataclasses (the ``eval`` config group instantiates these).

``conf/eval/*.yaml`` are ``_target_`` nodes of :class:`EvaluationConfig`; Hydra builds the nested
sections first (``FIDConfig``, ``CLIPConfig``, ...). Plain mappings work too (tests, Python users):
unknown keys and impossible values raise a one-line UserError naming ``eval.<key>``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xa_lightning.config import to_plain
from xa_lightning.errors import UserError

METRIC_NAMES = ("fid", "kid", "clip_score", "clip_image_similarity", "ida", "edge_f1", "style_similarity")
# Metrics that compare each generated image with the reference given to the sampler.
REFERENCE_METRICS = ("clip_image_similarity", "ida", "edge_f1")


_plain = to_plain  # instantiate may pass DictConfig / ListConfig


def _from_mapping(cls: type, value: Any, prefix: str) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    value = _plain(value)
    if not isinstance(value, Mapping):
        raise UserError(f"{prefix} must be a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
    names = [f.name for f in dataclasses.fields(cls)]
    data = {k: v for k, v in value.items() if not (str(k).startswith("_") and str(k).endswith("_"))}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}.{close[0]}?)" if close else ""
            raise UserError(f"{prefix}.{key} is not an evaluation setting{hint}")
    return cls(**data)


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
    when set, no real images are needed. ``weights_dir``: where clean-fid's Inception file lives
    (default: ``<cache>/fid``). ``low_rank_max_images``: sets up to this size keep their features
    (exact, fast FID on small sets); memory stays bounded.
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
    """Identity alignment: ``backend`` dlib (offline weights) or insightface (``model_dir``: antelopev2)."""

    backend: str = "dlib"
    model_dir: str | None = None
    missing_face: str = "skip"
    det_size: int = 640
    detector: str = "hog"

    def __post_init__(self) -> None:
        if self.backend not in ("dlib", "insightface"):
            raise UserError(f"eval.ida.backend={self.backend!r}: choose dlib or insightface")
        if self.missing_face not in ("skip", "zero"):
            raise UserError(f"eval.ida.missing_face={self.missing_face!r}: choose skip or zero")
        if self.detector not in ("hog", "cnn"):
            raise UserError(f"eval.ida.detector={self.detector!r}: choose hog or cnn")

    def embedder_kwargs(self) -> dict[str, Any]:
        if self.backend == "dlib":
            return {"detector": self.detector}
        return {"det_size": int(self.det_size)}


@dataclass
class EdgeConfig:
    """Edge F1: Canny thresholds for the generated image and the match tolerance in pixels."""

    low_threshold: int = 100
    high_threshold: int = 200
    radius: int = 2


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
    num_images: int = 16
    batch_size: int = 4
    seed: int = 1234
    every_n_steps: int = 0
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

    def __post_init__(self) -> None:
        self.metrics = [str(m) for m in (_plain(self.metrics) or [])]
        for name in self.metrics:
            if name not in METRIC_NAMES:
                close = difflib.get_close_matches(name, METRIC_NAMES, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise UserError(f"eval.metrics: unknown metric {name!r}{hint}; available: {', '.join(METRIC_NAMES)}")
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
        if "style_similarity" in self.metrics and not self.style_reference:
            raise UserError(
                "eval.style_reference is required for style_similarity: the sampler whose images "
                "are the style target (e.g. the base model + LoRA)"
            )
        self.fid = _from_mapping(FIDConfig, self.fid, "eval.fid")
        self.clip = _from_mapping(CLIPConfig, self.clip, "eval.clip")
        self.ida = _from_mapping(IDAConfig, self.ida, "eval.ida")
        self.edge = _from_mapping(EdgeConfig, self.edge, "eval.edge")

    @classmethod
    def coerce(cls, value: EvaluationConfig | Mapping | None) -> EvaluationConfig:
        """An EvaluationConfig from itself, a mapping / DictConfig (``_target_`` ignored) or None (defaults)."""
        return _from_mapping(cls, value, "eval")

    def needs_references(self) -> bool:
        return any(m in REFERENCE_METRICS for m in self.metrics)

    def needs_real_images(self) -> bool:
        return any(m in ("fid", "kid") for m in self.metrics) and not self.fid.reference_stats

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
