"""``xa-data``: dataset chores.

    xa-data demo [--out DIR] [--only laion,celebamask_hq,openimages] [--force]
    xa-data caption DIR --out captions.jsonl [--model ID|DIR] [--batch-size 8] [--prompt TEXT]
    xa-data cache data=<data config> backbone=<backbone config> [key=value ...] [--batch-size N]

``cache`` composes ``conf/data/<name>.yaml`` and ``conf/backbone/<name>.yaml`` exactly as ``xa-train``
does (Hydra overrides such as ``data.resolution=128`` or ``data.root=/datasets/x`` apply), so the cache
key it writes is the one a run with the same overrides looks for.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from xa_lightning.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xa-data", description="Dataset chores: demo data, captions, caches.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,caption,cache}")

    demo = sub.add_parser(
        "demo",
        help="write the demo datasets in their real on-disk formats",
        description="Write the LAION (img2dataset shards), CelebAMask-HQ and OpenImages demo "
        "datasets from images shipped in installed packages.",
    )
    demo.add_argument("--out", default=None, help="output folder (default: <repo>/data/demo)")
    demo.add_argument("--only", default=None, help="comma-separated subset of laion,celebamask_hq,openimages")
    demo.add_argument("--force", action="store_true", help="rebuild datasets that already exist")

    caption = sub.add_parser(
        "caption",
        help="caption a folder of images with BLIP-2 (resumable JSONL)",
        description='Write {"file", "caption"} lines for every image of DIR that is not '
        "in --out yet, with a BLIP-2 model from transformers.",
    )
    caption.add_argument("folder", help="folder of images")
    caption.add_argument("--out", required=True, help="captions JSONL (appended to; existing files are skipped)")
    caption.add_argument(
        "--model", default=None, help="BLIP-2 hub id or local directory (default: Salesforce/blip2-opt-2.7b)"
    )
    caption.add_argument("--batch-size", type=int, default=8)
    caption.add_argument("--max-new-tokens", type=int, default=30)
    caption.add_argument("--prompt", default=None, help="optional text prompt (e.g. 'a photo of')")
    caption.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    caption.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"))
    caption.add_argument("--recursive", action="store_true", help="also caption images in sub-folders")
    caption.add_argument("--local-files-only", action="store_true", help="never download the model")
    caption.add_argument("--no-progress", action="store_true")

    cache = sub.add_parser(
        "cache",
        help="precompute VAE latents and text embeddings for a data config",
        description="Encode a dataset with a backbone's VAE and text encoder(s) into "
        "safetensors shards that data.cache.enabled=true reads.",
    )
    cache.add_argument(
        "overrides",
        nargs="*",
        help="data=<name> backbone=<name> and Hydra overrides (e.g. data.resolution=128 data.root=/x)",
    )
    cache.add_argument("--batch-size", type=int, default=None, help="encoding batch size (default: data's)")
    cache.add_argument("--device", default=None)
    cache.add_argument("--splits", default=None, help="comma-separated: train,val (default: data.cache.splits)")
    cache.add_argument("--no-progress", action="store_true")
    return parser


def compose_cache_config(overrides: Sequence[str]):
    """The data + backbone (+ paths) config for ``xa-data cache``, composed like xa-train's."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from xa_lightning.config import config_dir, one_line, register_resolvers

    groups = {"data": None, "backbone": None, "paths": "default"}
    rest = []
    for item in overrides:
        name, _, value = item.partition("=")
        if name in groups and value:
            groups[name] = value
        else:
            rest.append(item)
    if not groups["data"]:
        raise UserError("xa-data cache: say which data config to cache, e.g. data=laion_demo")
    if not groups["backbone"]:
        raise UserError("xa-data cache: say which backbone to encode with, e.g. backbone=sd15_tiny")
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(overrides=[f"+{k}={v}" for k, v in groups.items()] + rest)
    except Exception as exc:
        raise UserError(one_line(exc)) from exc
    finally:
        GlobalHydra.instance().clear()
    return cfg


def _demo(args: argparse.Namespace) -> int:
    from xa_lightning.data.demo import build_demo

    if args.out is None:
        from xa_lightning.paths import repo_root

        out = repo_root() / "data" / "demo"
    else:
        out = Path(args.out)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    written = build_demo(out, only=only, force=args.force)
    print(json.dumps({name: str(path) for name, path in written.items()}))
    return 0


def _caption(args: argparse.Namespace) -> int:
    from xa_lightning.data.captioning import DEFAULT_CAPTION_MODEL, caption_folder

    report = caption_folder(
        args.folder,
        args.out,
        model=args.model or DEFAULT_CAPTION_MODEL,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        prompt=args.prompt,
        device=args.device,
        dtype=args.dtype,
        recursive=args.recursive,
        local_files_only=True if args.local_files_only else None,
        progress=not args.no_progress,
    )
    print(
        json.dumps(
            {
                "out": str(report.out),
                "captioned": report.captioned,
                "already_done": report.already_done,
                "counts": report.counts,
            }
        )
    )
    return 0


def _cache(args: argparse.Namespace) -> int:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from xa_lightning.data.cache import build_cache

    cfg = compose_cache_config(args.overrides)
    missing = sorted(OmegaConf.missing_keys(cfg.data))
    if missing:
        raise UserError(f"config key {missing[0]} is required: add {missing[0]}=... to xa-data cache")
    try:
        datamodule = instantiate(cfg.data)
    except UserError:
        raise
    except Exception as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, UserError) else None
        if cause is not None:
            raise cause from exc
        raise
    datamodule.prepare_data()
    splits = tuple(s.strip() for s in args.splits.split(",")) if args.splits else None
    folder = build_cache(
        datamodule,
        cfg.backbone,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
        splits=splits,
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    print(
        json.dumps(
            {
                "cache": str(folder),
                "splits": {k: v["count"] for k, v in manifest["splits"].items()},
                "counts": manifest.get("counts", {}),
            }
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``xa-data``; returns the exit status (UserError: message on stderr, status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return {"demo": _demo, "caption": _caption, "cache": _cache}[args.command](args)
    except UserError as exc:
        print(f"xa-data: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
