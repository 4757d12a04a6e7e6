"""CLIP score (text-image), CLIP image similarity (image-image, A4A's "CLIP-score") and LoRA style similarity.

torchmetrics' ``CLIPScore`` goes through transformers and breaks with transformers 5, so the metrics use
open_clip directly and its own eval preprocessing (``create_model_and_transforms``), applied to the
images of a batch in parallel on the worker pool.

Weights: the model name and pretrained tag come from the config (ViT-L-14 / openai for paper runs) and
are resolved by :func:`xa_lightning.metrics.weights.resolve_clip` (local caches first, a download only
when the host answers). Without weights the encoder is random-init: the metric's ``log_name`` becomes
``<name>_untrained`` and a warning says the number means nothing - never a silent meaningless number.
``require_pretrained=True`` turns that case into a UserError instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xa_lightning.errors import UserError
from xa_lightning.metrics.base import (
    OTHER_SAMPLER,
    PROMPTS,
    REFERENCES,
    MeanScore,
    MetricContext,
    ReferenceCache,
    require,
)
from xa_lightning.metrics.images import check_uint8_images, parallel_map, to_numpy_nhwc
from xa_lightning.metrics.weights import resolve_clip, untrained_clip_message

UNTRAINED_SUFFIX = "_untrained"


class UntrainedEncoderWarning(UserWarning):
    """A CLIP metric is computed with a random-init encoder (weights unavailable offline)."""


@dataclass
class LoadedClip:
    """An open_clip model with its eval preprocessing and tokenizer, and whether weights were loaded."""

    model: torch.nn.Module
    preprocess: Callable[[Any], Tensor]
    tokenizer: Callable[[Sequence[str]], Tensor]
    trained: bool
    source: str  # where the weights came from, or why there are none

    def _preprocess_array(self, array: np.ndarray) -> Tensor:
        from PIL import Image

        return self.preprocess(Image.fromarray(array))

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """uint8 ``(B, 3, H, W)`` -> L2-normalised image embeddings (open_clip's own preprocessing)."""
        check_uint8_images(images)
        device = next(self.model.parameters()).device
        batch = torch.stack(parallel_map(self._preprocess_array, list(to_numpy_nhwc(images))))
        features = self.model.encode_image(batch.to(device)).float()
        return torch.nn.functional.normalize(features, dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        device = next(self.model.parameters()).device
        features = self.model.encode_text(self.tokenizer(list(texts)).to(device)).float()
        return torch.nn.functional.normalize(features, dim=-1)


def load_clip(
    model_name: str = "ViT-B-32",
    pretrained: str | None = "openai",
    *,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    require_pretrained: bool = False,
) -> LoadedClip:
    """Build an open_clip model; real weights when available locally or reachable, else random init (warned).

    ``model_name`` may be a built-in name (``ViT-L-14``), ``hf-hub:org/repo`` or ``local-dir:/path``
    (a folder with ``open_clip_config.json`` and optionally weights). ``pretrained`` is a tag
    (``openai``), a weights file, or None for an intentionally random encoder.
    """
    import open_clip

    weights = resolve_clip(model_name, pretrained, cache_dir=cache_dir, require_pretrained=require_pretrained)
    if not weights.trained:
        warnings.warn(
            untrained_clip_message(model_name, pretrained, weights.source), UntrainedEncoderWarning, stacklevel=2
        )
    model, _, preprocess = open_clip.create_model_and_transforms(
        weights.create_name, pretrained=weights.pretrained, device=device, cache_dir=cache_dir, **weights.options
    )
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(weights.create_name)
    return LoadedClip(
        model=model, preprocess=preprocess, tokenizer=tokenizer, trained=weights.trained, source=weights.source
    )


_CLIPS: dict[tuple, LoadedClip] = {}


def get_clip(
    model_name: str = "ViT-B-32",
    pretrained: str | None = "openai",
    *,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    require_pretrained: bool = False,
) -> LoadedClip:
    """Process-wide shared :func:`load_clip` (one load per model, tag and device)."""
    key = (model_name, str(pretrained), cache_dir, str(torch.device(device)))
    if key not in _CLIPS:
        _CLIPS[key] = load_clip(
            model_name, pretrained, cache_dir=cache_dir, device=device, require_pretrained=require_pretrained
        )
    elif not _CLIPS[key].trained:
        message = untrained_clip_message(model_name, pretrained, _CLIPS[key].source)
        if require_pretrained:
            raise UserError("eval.clip.require_pretrained=true but " + message.split(": using")[0])
        warnings.warn(message, UntrainedEncoderWarning, stacklevel=2)
    return _CLIPS[key]


class _ClipMetric(MeanScore):
    """Mean of per-image CLIP scores; the shared CLIP model lives outside the module tree."""

    higher_is_better = True

    def __init__(
        self,
        clip: LoadedClip | None = None,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "openai",
        cache_dir: str | None = None,
        require_pretrained: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if clip is None:
            clip = get_clip(model_name, pretrained, cache_dir=cache_dir, require_pretrained=require_pretrained)
        self.__dict__["clip"] = clip

    @classmethod
    def prepare(cls, cfg: Any, device: torch.device) -> None:
        resolve_clip(
            cfg.clip.model,
            cfg.clip.pretrained,
            cache_dir=cfg.clip.cache_dir,
            require_pretrained=cfg.clip.require_pretrained,
        )

    @classmethod
    def from_config(cls, cfg: Any, context: MetricContext) -> _ClipMetric | None:
        clip = get_clip(
            cfg.clip.model,
            cfg.clip.pretrained,
            cache_dir=cfg.clip.cache_dir,
            device=context.device,
            require_pretrained=cfg.clip.require_pretrained,
        )
        return cls(clip)

    @property
    def trained(self) -> bool:
        return self.__dict__["clip"].trained

    @property
    def log_name(self) -> str:
        """The name to log under: flagged with ``_untrained`` when the encoder has no real weights."""
        return self.name if self.trained else self.name + UNTRAINED_SUFFIX


class ClipScore(_ClipMetric):
    """Text-image CLIP score: ``100 * max(cos(image, text), 0)`` per image, averaged over images.

    The clamp is per image, as in Hessel et al.'s CLIPScore; torchmetrics clamps the mean instead
    (docs/evaluation.md: the two differ only when some image scores below 0).
    """

    name = "clip_score"
    needs = frozenset({PROMPTS})

    def score(self, images: Tensor, prompts: Sequence[str] | None = None, references: Tensor | None = None) -> Tensor:
        prompts = require(prompts, "prompts", self.name)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        clip = self.__dict__["clip"]
        image_features, text_features = clip.encode_images(images), clip.encode_texts(prompts)
        return (100 * (image_features * text_features).sum(-1)).clamp(min=0).cpu()


class _ImageSimilarity(_ClipMetric):
    """Cosine of each image's and its reference image's CLIP embeddings."""

    def _encode_references(self, references: Tensor) -> Tensor:
        return self.__dict__["clip"].encode_images(references)

    def score(self, images: Tensor, prompts: Sequence[str] | None = None, references: Tensor | None = None) -> Tensor:
        references = require(references, "references", self.name)
        check_uint8_images(references, "references")
        if references.shape[0] != images.shape[0]:
            raise ValueError(f"{references.shape[0]} references for {images.shape[0]} images")
        embeddings = self.__dict__["clip"].encode_images(images)
        return (embeddings * self._encode_references(references).to(embeddings.device)).sum(-1).cpu()


class ClipImageSimilarity(_ImageSimilarity):
    """Image-image CLIP similarity to the evaluation reference (A4A's "CLIP-score").

    Each distinct reference is encoded once (A4A: 4 generations per reference).
    """

    name = "clip_image_similarity"
    needs = frozenset({REFERENCES})

    def __init__(self, clip: LoadedClip | None = None, **kwargs: Any) -> None:
        super().__init__(clip, **kwargs)
        self._reference_embeddings = ReferenceCache(self.__dict__["clip"].encode_images)

    def _encode_references(self, references: Tensor) -> Tensor:
        return torch.stack(self._reference_embeddings(references))


class StyleSimilarity(_ImageSimilarity):
    """LoRA style similarity: CLIP image similarity to the style reference sampler's image (the base model +
    LoRA) for the same prompt and seed; not computed for that sampler itself."""

    name = "style_similarity"
    needs = frozenset({OTHER_SAMPLER})

    @classmethod
    def from_config(cls, cfg: Any, context: MetricContext) -> StyleSimilarity | None:
        return None if context.sampler == cfg.style_reference else super().from_config(cfg, context)
