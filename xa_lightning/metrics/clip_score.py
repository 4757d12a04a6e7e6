"""CLIP score (text-image) and CLIP image similarity (image-image, A4A's "CLIP-score") with open_clip.

torchmetrics' ``CLIPScore`` goes through transformers and breaks with transformers 5, so both metrics
use open_clip directly and its own preprocessing (``create_model_and_transforms``' eval transform).

Weights: the model name and pretrained tag come from the config (ViT-L-14 / openai for paper runs).
They are looked up in the local caches first (open_clip's URL cache and the Hugging Face cache), then
downloaded only when the host answers. Without weights the encoder is random-init: the metric's
``log_name`` becomes ``<name>_untrained`` and a warning says the number means nothing - never a
silent meaningless number. ``require_pretrained=True`` turns that case into a UserError instead.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from xa_lightning.errors import UserError
from xa_lightning.metrics.fid import _mark_updated
from xa_lightning.metrics.images import check_uint8_images, to_numpy_hwc
from xa_lightning.metrics.offline import host_reachable, offline_requested

UNTRAINED_SUFFIX = "_untrained"
NO_WEIGHTS = (None, "", "none", "None", "random", "null")
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


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

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """uint8 ``(B, 3, H, W)`` -> L2-normalised image embeddings (open_clip's own preprocessing)."""
        from PIL import Image

        check_uint8_images(images)
        device = next(self.model.parameters()).device
        batch = torch.stack([self.preprocess(Image.fromarray(to_numpy_hwc(image))) for image in images])
        features = self.model.encode_image(batch.to(device)).float()
        return torch.nn.functional.normalize(features, dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        device = next(self.model.parameters()).device
        features = self.model.encode_text(self.tokenizer(list(texts)).to(device)).float()
        return torch.nn.functional.normalize(features, dim=-1)


def _cached_hf_file(repo_id: str, filenames: Sequence[str], cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _cached_tag_weights(pretrained_cfg: dict, cache_dir: str | None) -> str | None:
    """The local file open_clip would download for this tag, if it is already cached; no network."""
    if pretrained_cfg.get("file"):
        return pretrained_cfg["file"] if os.path.isfile(pretrained_cfg["file"]) else None
    hub = pretrained_cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = [filename, *HF_WEIGHT_FILES] if filename else list(HF_WEIGHT_FILES)
        found = _cached_hf_file(repo_id, names, cache_dir)
        if found:
            return found
    url = pretrained_cfg.get("url", "")
    if url:
        candidate = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
    return None


def _hub_host(pretrained_cfg: dict) -> str:
    if pretrained_cfg.get("hf_hub"):
        from huggingface_hub import constants

        return constants.ENDPOINT.split("://")[-1].split("/")[0]
    from urllib.parse import urlparse

    return urlparse(pretrained_cfg.get("url", "")).hostname or "huggingface.co"


def _untrained_message(model_name: str, pretrained: Any, why: str) -> str:
    return (
        f"CLIP {model_name} '{pretrained}' weights unavailable ({why}): using a RANDOM-INIT encoder. "
        f"CLIP metrics are logged with the suffix '{UNTRAINED_SUFFIX}' and are not comparable with "
        "the papers; put the weights in the open_clip / Hugging Face cache to get real numbers"
    )


def load_clip(
    model_name: str = "ViT-B-32",
    pretrained: str | None = "openai",
    *,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    require_pretrained: bool = False,
) -> LoadedClip:
    """Build an open_clip model; real weights when available locally or reachable, else random init.

    ``model_name`` may be a built-in name (``ViT-L-14``), ``hf-hub:org/repo`` or ``local-dir:/path``
    (a folder with ``open_clip_config.json`` and optionally weights). ``pretrained`` is a tag
    (``openai``), a weights file, or None for an intentionally random encoder.
    """
    import open_clip
    from open_clip.factory import parse_model_name
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    schema, identifier = parse_model_name(model_name)
    kwargs: dict[str, Any] = {"device": device, "cache_dir": cache_dir}
    trained, source, create_name, create_pretrained = False, "", model_name, None

    if schema == "local-dir":
        folder = Path(identifier)
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(
                f"eval.clip.model: {folder} has no open_clip_config.json; point local-dir: at an open_clip model folder"
            )
        weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth")]
        trained, source = bool(weights), (str(weights[0]) if weights else f"no weights file in {folder}")
    elif schema == "hf-hub":
        repo = identifier
        config_file = _cached_hf_file(repo, ["open_clip_config.json"], cache_dir)
        weights_file = _cached_hf_file(repo, HF_WEIGHT_FILES, cache_dir)
        if config_file and weights_file:  # load from the cache snapshot without touching the network
            create_name, trained, source = f"local-dir:{os.path.dirname(weights_file)}", True, weights_file
        elif not offline_requested() and host_reachable(_hub_host({"hf_hub": repo})):
            trained, source = True, f"hf-hub:{repo}"
        else:
            raise UserError(
                f"eval.clip.model={model_name}: not in the Hugging Face cache and the hub is "
                "unreachable; use a built-in model name (random init offline) or a local-dir:"
            )
    else:
        if model_name.replace("/", "-") not in open_clip.list_models():
            raise UserError(
                f"eval.clip.model={model_name} is not an open_clip model; e.g. ViT-B-32, ViT-L-14 "
                "(open_clip.list_models()), hf-hub:org/repo or local-dir:/path"
            )
        if pretrained in NO_WEIGHTS:
            source = "pretrained=None requested"
        elif os.path.isfile(str(pretrained)):
            create_pretrained, trained, source = str(pretrained), True, str(pretrained)
        else:
            tag_cfg = get_pretrained_cfg(model_name, str(pretrained))
            if not tag_cfg:
                tags = ", ".join(list_pretrained_tags_by_model(model_name)) or "none"
                raise UserError(
                    f"eval.clip.pretrained={pretrained} is neither a pretrained tag of {model_name} "
                    f"(available: {tags}) nor an existing weights file"
                )
            # Keep what the tag implies for the architecture/preprocessing even when loading a file.
            kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
            cached = _cached_tag_weights(tag_cfg, cache_dir)
            if cached:
                create_pretrained, trained, source = cached, True, cached
                kwargs["force_preprocess_cfg"] = {
                    k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg
                }
            elif not offline_requested() and host_reachable(_hub_host(tag_cfg)):
                create_pretrained, trained, source = str(pretrained), True, f"download {model_name}/{pretrained}"
            else:
                source = "not in the local cache and the hub is unreachable"

    if not trained:
        message = _untrained_message(model_name, pretrained, source)
        if require_pretrained:
            raise UserError(
                "eval.clip.require_pretrained=true but "
                + message.split(": using")[0]
                + "; copy the weights into the cache or set eval.clip.require_pretrained=false"
            )
        warnings.warn(message, UntrainedEncoderWarning, stacklevel=2)
    model, _, preprocess = open_clip.create_model_and_transforms(create_name, pretrained=create_pretrained, **kwargs)
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(create_name)
    return LoadedClip(model=model, preprocess=preprocess, tokenizer=tokenizer, trained=trained, source=source)


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
        if require_pretrained:
            raise UserError(
                "eval.clip.require_pretrained=true but "
                + _untrained_message(model_name, pretrained, _CLIPS[key].source).split(": using")[0]
            )
        warnings.warn(
            _untrained_message(model_name, pretrained, _CLIPS[key].source), UntrainedEncoderWarning, stacklevel=2
        )
    return _CLIPS[key]


class _ClipMetric(Metric):
    """Mean of per-image scores; the shared CLIP model lives outside the module tree."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    base_name = "clip"

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
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @property
    def trained(self) -> bool:
        return self.__dict__["clip"].trained

    @property
    def log_name(self) -> str:
        """The name to log under: flagged with ``_untrained`` when the encoder has no real weights."""
        return self.base_name if self.trained else self.base_name + UNTRAINED_SUFFIX

    def accumulate(self, scores: Tensor) -> Tensor:
        """Add per-image scores (from ``score``) to the state."""
        _mark_updated(self)
        self.score_sum = self.score_sum + scores.double().sum().to(self.device)
        self.count = self.count + scores.numel()
        return scores

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            raise ValueError(f"{self.log_name}: no images were scored")
        return self.score_sum / self.count


class ClipScore(_ClipMetric):
    """Text-image CLIP score: ``100 * max(cos(image, text), 0)`` averaged over images (torchmetrics' formula)."""

    base_name = "clip_score"

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-image scores (B,) without updating the state."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        clip = self.__dict__["clip"]
        image_features, text_features = clip.encode_images(images), clip.encode_texts(prompts)
        return (100 * (image_features * text_features).sum(-1)).clamp(min=0).cpu()

    def update(self, images: Tensor, prompts: Sequence[str]) -> None:
        self.accumulate(self.score(images, prompts))


class ClipImageSimilarity(_ClipMetric):
    """Image-image CLIP similarity: cosine of the two images' CLIP embeddings (A4A's "CLIP-score")."""

    base_name = "clip_image_similarity"

    def score(self, images: Tensor, references: Tensor) -> Tensor:
        if references.shape[0] != images.shape[0]:
            raise ValueError(f"{references.shape[0]} references for {images.shape[0]} images")
        clip = self.__dict__["clip"]
        return (clip.encode_images(images) * clip.encode_images(references)).sum(-1).cpu()

    def update(self, images: Tensor, references: Tensor) -> None:
        self.accumulate(self.score(images, references))


class StyleSimilarity(ClipImageSimilarity):
    """LoRA style similarity: CLIP image similarity to the base model + LoRA output for the same prompt/seed."""

    base_name = "style_similarity"
