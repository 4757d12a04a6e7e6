"""Loading real weights: a local diffusers directory or a hub id, failing fast (never hanging) offline."""

from __future__ import annotations

import json
import os
import re
import socket
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from xa_lightning.errors import UserError

if TYPE_CHECKING:
    from .backbone import Backbone

_DENOISER_CLASSES = {"unet": UNet2DConditionModel, "transformer": PixArtTransformer2DModel}
_TEXT_ENCODER_CLASSES = {
    ("sd15", "text_encoder"): CLIPTextModel,
    ("sdxl", "text_encoder"): CLIPTextModel,
    ("sdxl", "text_encoder_2"): CLIPTextModelWithProjection,
    ("pixart_alpha", "text_encoder"): T5EncoderModel,
}
_REACHABILITY_TIMEOUT_S = 5.0


class _NotAvailable(Exception):
    """A component is missing from the local files (message: the underlying error)."""


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set now (read at call time, not import time)."""
    from huggingface_hub import constants

    def is_true(value: str | None) -> bool:
        return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}

    return (
        is_true(os.environ.get("HF_HUB_OFFLINE"))
        or is_true(os.environ.get("TRANSFORMERS_OFFLINE"))
        or bool(constants.HF_HUB_OFFLINE)
    )


def hub_cache_dir() -> str:
    """The Hugging Face cache, from the environment at call time (the libraries read it once, at import)."""
    from huggingface_hub import constants

    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expanduser(os.environ[variable])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _not_found_message(source: str) -> str:
    return (
        f"weights for {source} not found locally; set backbone.path=<local diffusers dir> "
        "or allow downloads (unset HF_HUB_OFFLINE)"
    )


def _check_hub_reachable(source: str) -> None:
    """One TCP connect with a short timeout, so a machine without internet fails at once instead of retrying."""
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=_REACHABILITY_TIMEOUT_S).close()
    except OSError as error:
        raise UserError(
            f"weights for {source} not found locally and {host} is unreachable ({error.__class__.__name__}); "
            "set backbone.path=<local diffusers dir>"
        ) from None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def _looks_like_local_path(source: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (``/abs``, ``./rel``, ``a/b/c``) is a path."""
    return _HUB_ID.match(source) is None


def _load_tokenizer(source: str, subfolder: str, common: dict[str, Any]) -> Any:
    """The class named in tokenizer_config.json (CLIPTokenizer, T5Tokenizer, ...).

    Not AutoTokenizer: for a hub id with a subfolder it also looks for a model config.json at the repo root,
    which diffusers repos do not have, and then fails offline.
    """
    import transformers
    from transformers.utils import cached_file

    config_file = cached_file(source, "tokenizer_config.json", subfolder=subfolder, **common)
    class_name = json.loads(Path(config_file).read_text(encoding="utf-8")).get("tokenizer_class") or ""
    tokenizer_class = getattr(transformers, class_name, None) or getattr(
        transformers, class_name.removesuffix("Fast"), None
    )
    if tokenizer_class is None:
        tokenizer_class = transformers.AutoTokenizer
    return tokenizer_class.from_pretrained(source, subfolder=subfolder, **common)


@torch.no_grad()
def _realign(module: torch.nn.Module, alignment: int = 64) -> None:
    """Copy CPU tensors that safetensors left at unaligned addresses.

    CPU kernels take other vectorised paths on unaligned memory, so the same weights would give outputs that
    differ in the last bits from a model built in memory; aligned copies make a reloaded model bit-identical.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % alignment:
            tensor.data = tensor.data.clone()


def _load_components(
    backbone_class: type[Backbone],
    source: str,
    *,
    local_files_only: bool,
    torch_dtype: torch.dtype,
    vae_dtype: torch.dtype,
    variant: str | None,
    revision: str | None,
) -> dict[str, Any]:
    family = backbone_class.family
    common = {"local_files_only": local_files_only, "revision": revision, "cache_dir": hub_cache_dir()}

    def load(what: str, loader: Any) -> Any:
        try:
            with warnings.catch_warnings():
                # diffusers still passes this retired hub argument; the warning is noise for our users.
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                return loader()
        except (OSError, ValueError) as error:
            raise _NotAvailable(
                f"{what}: {str(error).splitlines()[0] if str(error) else error.__class__.__name__}"
            ) from error

    # Scheduler first: smallest file, and it tells at once whether the source is there at all.
    scheduler_config = load(
        "scheduler", lambda: dict(DDPMScheduler.load_config(source, subfolder="scheduler", **common))
    )
    denoiser_class = _DENOISER_CLASSES[backbone_class.denoiser_subfolder]
    denoiser = load(
        backbone_class.denoiser_subfolder,
        lambda: denoiser_class.from_pretrained(
            source, subfolder=backbone_class.denoiser_subfolder, torch_dtype=torch_dtype, variant=variant, **common
        ),
    )
    vae = load(
        "vae",
        lambda: AutoencoderKL.from_pretrained(
            source, subfolder="vae", torch_dtype=vae_dtype, variant=variant, **common
        ),
    )
    text_encoders = [
        load(
            subfolder,
            lambda subfolder=subfolder: _TEXT_ENCODER_CLASSES[(family, subfolder)].from_pretrained(
                source, subfolder=subfolder, dtype=torch_dtype, variant=variant, **common
            ),
        )
        for subfolder in backbone_class.text_encoder_subfolders
    ]
    tokenizers = [
        load(subfolder, lambda subfolder=subfolder: _load_tokenizer(source, subfolder, common))
        for subfolder in backbone_class.tokenizer_subfolders
    ]
    for module in [denoiser, vae, *text_encoders]:
        _realign(module)
    return {
        "denoiser": denoiser,
        "vae": vae,
        "text_encoders": text_encoders,
        "tokenizers": tokenizers,
        "scheduler_config": scheduler_config,
    }


def load_pretrained_components(
    backbone_class: type[Backbone],
    source: str,
    *,
    torch_dtype: torch.dtype,
    vae_dtype: torch.dtype,
    variant: str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> dict[str, Any]:
    """Components of ``backbone_class``'s family from a local diffusers directory or a hub id.

    Order: a local directory is loaded as is; a hub id is tried from the local cache first
    (``local_files_only=True``), and only when that fails, ``local_files_only`` is not True and the environment
    allows it (``HF_HUB_OFFLINE`` unset, hub reachable within a few seconds) is it downloaded.
    """
    options = {"torch_dtype": torch_dtype, "vae_dtype": vae_dtype, "variant": variant, "revision": revision}
    subfolders = (
        "scheduler",
        backbone_class.denoiser_subfolder,
        "vae",
        *backbone_class.text_encoder_subfolders,
        *backbone_class.tokenizer_subfolders,
    )
    local_dir = Path(source).expanduser()
    if local_dir.is_dir():
        missing = [name for name in subfolders if not (local_dir / name).is_dir()]
        if missing:
            raise UserError(
                f"backbone.path={source} is not a {backbone_class.family} diffusers directory: missing subfolder(s) "
                f"{', '.join(missing)} (expected {', '.join(subfolders)})"
            )
        try:
            return _load_components(backbone_class, str(local_dir), local_files_only=True, **options)
        except _NotAvailable as error:
            raise UserError(f"backbone.path={source}: cannot load {error}") from None
    if _looks_like_local_path(source):
        raise UserError(f"backbone.path={source} does not exist; point it at a local diffusers directory or a hub id")

    try:
        return _load_components(backbone_class, source, local_files_only=True, **options)
    except _NotAvailable:
        if local_files_only or hub_offline():
            raise UserError(_not_found_message(source)) from None
    _check_hub_reachable(source)
    try:
        return _load_components(backbone_class, source, local_files_only=False, **options)
    except _NotAvailable as error:
        raise UserError(
            f"could not download weights for {source} ({error}); set backbone.path=<local diffusers dir>"
        ) from None
