"""Latent / text-embedding cache: frozen encoders do the same work every epoch, so do it once.

``xa-data cache`` (or :func:`build_cache`) runs a dataset through a backbone's VAE (posterior mean, at the
data resolution and every extra resolution) and text encoder(s), and writes safetensors shards::

    <cache.dir>/<dataset>-<family>-<flavour>-<resolution>px-<hash>/
        manifest.json                   the full key, shard list, tensor shapes
        train-00000.safetensors ...     latents, latents_<R>, prompt_embeds, [pooled_prompt_embeds],
        val-00000.safetensors ...       [prompt_attention_mask], micro-conditioning, [reference (uint8)];
                                        captions and keys in the safetensors metadata

The folder name carries a hash of the key: the data source (shard / caption files with sizes and
mtimes, filters, split), the view settings (resolutions, crop, seed) and the backbone config (family,
flavour, path, seed, dtypes). A run with ``data.cache.enabled=true`` computes the same key from its own
config and finds that folder or stops with an error: a stale cache is never used silently.

Augmentation is fixed at caching time (the seeded crop of epoch 0), as in every latent-caching trainer.
A cache is written into ``<name>.partial`` (resumable shard by shard) and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from xa_lightning.data.base import plain
from xa_lightning.errors import UserError

if TYPE_CHECKING:
    from xa_lightning.data.base import ImageTextDataModule

log = logging.getLogger("xa_lightning.data")

CACHE_FORMAT = 1
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOAT_KEYS_PREFIX = ("latents", "prompt_embeds", "pooled_prompt_embeds")


# Backbone settings that change how fast, not what, the frozen models compute (the cache stays valid across them).
SPEED_LEVERS = ("attention", "channels_last", "compile")


def backbone_identity(spec: Any) -> dict[str, Any]:
    """The backbone settings that change latents or embeddings, normalised (defaults filled in)."""
    from xa_lightning.backbones import BackboneConfig

    values = plain(spec)
    if values is None:
        raise UserError(
            "data.cache.backbone is not set; point it at the backbone config of the run "
            "(the data configs default to ${backbone})"
        )
    if not isinstance(values, Mapping):
        raise UserError(f"data.cache.backbone must be a backbone config mapping, got {type(values).__name__}")
    config = asdict(BackboneConfig.from_dict(dict(values)))
    if config.get("path"):
        path = Path(str(config["path"])).expanduser()
        if path.is_dir():
            config["path"] = str(path.resolve())
            weights = sorted(
                p
                for p in path.rglob("*")
                if p.suffix in (".safetensors", ".bin") and p.parent.name in ("vae", "text_encoder", "text_encoder_2")
            )
            config["weights"] = [
                [p.relative_to(path).as_posix(), p.stat().st_size, int(p.stat().st_mtime)] for p in weights
            ]
    if config.get("flavour") == "pretrained":
        config.pop("seed", None)  # the weights, not the seed, decide
    for speed_only in SPEED_LEVERS:  # same latents and embeddings whichever way they are computed
        config.pop(speed_only, None)
    return config


def cache_key(datamodule: ImageTextDataModule, backbone_spec: Any) -> dict[str, Any]:
    identity = backbone_identity(backbone_spec)
    views = datamodule.train_views
    return {
        "format": CACHE_FORMAT,
        "data": datamodule.source_fingerprint(),
        "views": {
            "resolution": views.resolution,
            "extra_resolutions": list(views.extra_resolutions),
            "crop": views.crop,
            "random_flip": views.random_flip,
            "upscale_small": views.upscale_small,
            "eval_crop": "center",
            "seed": datamodule.seed,
        },
        "backbone": identity,
        "dtype": datamodule.cache.dtype,
    }


def cache_dir_name(datamodule: ImageTextDataModule, key: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    backbone = key["backbone"]
    return f"{datamodule.name}-{backbone['family']}-{backbone['flavour']}-{datamodule.resolution}px-{digest}"


def _cache_root(datamodule: ImageTextDataModule) -> Path:
    if not datamodule.cache.dir:
        raise UserError("data.cache.dir is not set; set it to the folder that holds (or will hold) the caches")
    return Path(datamodule.cache.dir).expanduser()


def _describe_differences(wanted: Mapping[str, Any], found: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(wanted) | set(found)):
        a, b = wanted.get(key), found.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _describe_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def find_cache(datamodule: ImageTextDataModule, backbone_spec: Any) -> Path:
    """The cache folder for this data + backbone config, or a UserError that says what differs."""
    key = cache_key(datamodule, backbone_spec)
    root = _cache_root(datamodule)
    folder = root / cache_dir_name(datamodule, key)
    manifest = folder / "manifest.json"
    if manifest.is_file():
        stored = json.loads(manifest.read_text())
        if stored.get("key") != json.loads(json.dumps(key, default=str)):
            raise UserError(
                f"data.cache: {folder} does not match this config "
                f"({', '.join(_describe_differences(key, stored.get('key', {}))) or 'key'} differ); "
                f"rebuild it with xa-data cache"
            )
        return folder
    others = sorted(p for p in root.glob(f"{datamodule.name}-*/manifest.json")) if root.is_dir() else []
    hint = ""
    if others:
        stored = json.loads(others[-1].read_text()).get("key", {})
        differ = _describe_differences(json.loads(json.dumps(key, default=str)), stored)
        hint = f"; {others[-1].parent.name} exists but differs in {', '.join(differ[:4]) or 'its key'}"
    raise UserError(
        f"data.cache.enabled=true but there is no cache for this data + backbone in {root}{hint}; "
        f"build it with `xa-data cache data=<data config> backbone=<backbone config>` "
        "(same overrides as the run) or set data.cache.enabled=false"
    )


class CachedDataset(Dataset):
    """Map-style dataset over a cache split; per-sample reads from memory-mapped safetensors shards."""

    def __init__(self, folder: Path, split: str) -> None:
        self.folder = Path(folder)
        manifest = json.loads((self.folder / "manifest.json").read_text())
        info = manifest["splits"].get(split)
        if not info or not info["count"]:
            raise UserError(
                f"data.cache: {self.folder} holds no {split} samples; "
                f"set data.cache.splits to the cached splits ({', '.join(manifest['splits'])})"
            )
        self.shards = [(self.folder / s["file"], int(s["count"])) for s in info["shards"]]
        self.offsets: list[int] = []
        total = 0
        for _, count in self.shards:
            self.offsets.append(total)
            total += count
        self.total = total
        self._handles: dict[int, Any] = {}
        self._meta: dict[int, tuple[list[str], list[str]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"], state["_meta"] = {}, {}  # reopened in each worker
        return state

    def __len__(self) -> int:
        return self.total

    def _open(self, shard: int) -> Any:
        from safetensors import safe_open

        if shard not in self._handles:
            path = self.shards[shard][0]
            if not path.is_file():
                raise UserError(f"data.cache: shard {path} is missing; rebuild the cache with xa-data cache")
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata() or {}
            self._meta[shard] = (json.loads(meta.get("captions", "[]")), json.loads(meta.get("keys", "[]")))
            self._handles[shard] = handle
        return self._handles[shard]

    def __getitem__(self, index: int) -> dict[str, Any]:
        import bisect

        position = int(index) % self.total
        shard = bisect.bisect_right(self.offsets, position) - 1
        offset = position - self.offsets[shard]
        handle = self._open(shard)
        sample: dict[str, Any] = {}
        for name in handle.keys():  # noqa: SIM118 (safetensors.safe_open is not iterable)
            value = handle.get_slice(name)[offset : offset + 1][0]
            if name.startswith(FLOAT_KEYS_PREFIX):
                value = value.float()
            elif name == "reference":
                value = value.float() / 255.0
            sample[name] = value
        captions, keys = self._meta[shard]
        sample["caption"] = captions[offset]
        sample["key"] = keys[offset]
        return sample


def open_cache(datamodule: ImageTextDataModule, split: str) -> CachedDataset:
    folder = find_cache(datamodule, datamodule.cache.backbone)
    return CachedDataset(folder, split)


# ------------------------------------------------------------------------------------------ writing
def _encode_batch(
    batch: Mapping[str, Any], backbone: Any, device: torch.device, storage: torch.dtype
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, value in batch.items():
            if name == "pixels" or name.startswith("pixels_"):
                latents = backbone.encode_images(value.to(device=device, dtype=torch.float32))
                out["latents" + name[len("pixels") :]] = latents.to("cpu", storage).contiguous()
            elif name == "reference":
                out["reference"] = (value * 255).round().clamp(0, 255).to(torch.uint8).contiguous()
            elif isinstance(value, torch.Tensor):
                out[name] = value.contiguous()
        cond = backbone.encode_text(list(batch["caption"]))
        out["prompt_embeds"] = cond.prompt_embeds.to("cpu", storage).contiguous()
        if getattr(cond, "pooled_prompt_embeds", None) is not None:
            out["pooled_prompt_embeds"] = cond.pooled_prompt_embeds.to("cpu", storage).contiguous()
        if getattr(cond, "attention_mask", None) is not None:
            out["prompt_attention_mask"] = cond.attention_mask.to("cpu").contiguous()
    return out


class _ShardWriter:
    def __init__(self, folder: Path, split: str, shard_size: int, done: list[dict[str, Any]]) -> None:
        self.folder, self.split, self.shard_size = folder, split, shard_size
        self.done = done
        self.buffer: list[dict[str, torch.Tensor]] = []
        self.captions: list[str] = []
        self.keys: list[str] = []

    def add(self, tensors: Mapping[str, torch.Tensor], captions: list[str], keys: list[str]) -> None:
        for i in range(len(captions)):
            self.buffer.append({k: v[i] for k, v in tensors.items()})
            self.captions.append(captions[i])
            self.keys.append(keys[i])
            if len(self.buffer) == self.shard_size:
                self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        name = f"{self.split}-{len(self.done):05d}.safetensors"
        stacked = {k: torch.stack([s[k] for s in self.buffer]) for k in self.buffer[0]}
        tmp = self.folder / (name + ".tmp")
        save_file(stacked, str(tmp), metadata={"captions": json.dumps(self.captions), "keys": json.dumps(self.keys)})
        os.replace(tmp, self.folder / name)
        self.done.append({"file": name, "count": len(self.buffer)})
        _write_json(self.folder / "progress.json", self._progress())
        self.buffer, self.captions, self.keys = [], [], []

    def _progress(self) -> dict[str, Any]:
        existing = (
            json.loads((self.folder / "progress.json").read_text()) if (self.folder / "progress.json").is_file() else {}
        )
        existing.setdefault("splits", {})[self.split] = {"shards": self.done, "complete": False}
        return existing


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    os.replace(tmp, path)


def build_cache(
    datamodule: ImageTextDataModule,
    backbone_spec: Any,
    backbone: Any = None,
    *,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
    splits: tuple[str, ...] | None = None,
) -> Path:
    """Encode the dataset's splits with the backbone and write the cache; returns its folder.

    ``backbone_spec``: the backbone config (the key); ``backbone``: an already built Backbone for it
    (built from the spec when None). An existing complete cache with the same key is reused.
    """
    from tqdm.auto import tqdm

    datamodule.setup()
    key = cache_key(datamodule, backbone_spec)
    root = _cache_root(datamodule)
    folder = root / cache_dir_name(datamodule, key)
    if (folder / "manifest.json").is_file():
        log.info("cache: %s is complete already", folder)
        return folder
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    started = json.loads((partial / "progress.json").read_text()) if (partial / "progress.json").is_file() else {}
    if started and started.get("key") != json.loads(json.dumps(key, default=str)):
        shutil.rmtree(partial)
        partial.mkdir(parents=True)
        started = {}
    if not started:
        _write_json(partial / "progress.json", {"key": key, "splits": {}})
    if backbone is None:
        from xa_lightning.backbones import backbone_from_config

        backbone = backbone_from_config(plain(backbone_spec))
    device_obj = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = backbone.to(device_obj)
    storage = STORAGE_DTYPES[datamodule.cache.dtype]
    batch_size = int(batch_size or datamodule.batch_size)
    shapes: dict[str, list[int]] = {}
    summary: dict[str, Any] = {}
    for split in splits or datamodule.cache.splits:
        progress_state = json.loads((partial / "progress.json").read_text())
        split_state = progress_state.get("splits", {}).get(split, {})
        done = list(split_state.get("shards", []))
        if split_state.get("complete"):
            summary[split] = {"shards": done, "count": sum(s["count"] for s in done)}
            continue
        skip = sum(s["count"] for s in done)  # resume: the stream is deterministic, skip what is written
        writer = _ShardWriter(partial, split, int(datamodule.cache.shard_size), done)
        seen = 0
        start = time.perf_counter()
        with tqdm(desc=f"cache {split}", unit="img", disable=not progress) as bar:
            for batch in datamodule.iter_cache_batches(split, batch_size):
                n = len(batch["caption"])
                if seen + n <= skip:
                    seen += n
                    bar.update(n)
                    continue
                if seen < skip:  # a batch straddling the resume point
                    cut = skip - seen
                    batch = {k: v[cut:] for k, v in batch.items()}
                    seen, n = skip, n - cut
                tensors = _encode_batch(batch, backbone, device_obj, storage)
                shapes.update({k: list(v.shape[1:]) for k, v in tensors.items()})
                writer.add(tensors, list(batch["caption"]), list(batch["key"]))
                seen += n
                bar.update(n)
            writer.flush()
        state = json.loads((partial / "progress.json").read_text())
        state.setdefault("splits", {})[split] = {"shards": done, "complete": True}
        _write_json(partial / "progress.json", state)
        summary[split] = {"shards": done, "count": sum(s["count"] for s in done)}
        log.info("cache: %s %d samples in %.1fs", split, summary[split]["count"], time.perf_counter() - start)
    if not any(info["count"] for info in summary.values()):
        raise UserError(
            f"cache: no readable samples in {datamodule.name}; nothing to cache (counts: {datamodule.sample_counts()})"
        )
    _write_json(
        partial / "manifest.json",
        {
            "key": key,
            "splits": summary,
            "tensors": shapes,
            "counts": datamodule.sample_counts(),
            "created": time.time(),
        },
    )
    (partial / "progress.json").unlink(missing_ok=True)
    os.replace(partial, folder)
    return folder
