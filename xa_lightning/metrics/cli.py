"""``xa-eval`` folder sub-commands; the JSON result is the last line of output.

    xa-eval fid --real DIR --fake DIR [--kid]      (or --reference-stats NAME|FILE instead of --real)
    xa-eval kid --real DIR --fake DIR
    xa-eval clip --images DIR --prompts FILE       (CLIP score; --references DIR: image-image similarity)
    xa-eval ida --generated DIR --reference DIR [--backend dlib|insightface] [--model-dir DIR]
    xa-eval edge-f1 --generated DIR --control DIR
    xa-eval fid-stats --real DIR --name NAME       (cache reference statistics: --reference-stats NAME)

Pairing of two folders (clip --references, ida, edge-f1): files with the same name are paired; else,
in sorted order, each reference covers ``len(generated) / len(reference)`` consecutive generated files
(e.g. 4 generations per reference). ``--prompts``: one line per image in sorted file order, or a
single line for all.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xa_lightning.errors import UserError


def _device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _print_result(result: dict[str, Any]) -> None:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    print(json.dumps(clean, sort_keys=False))


def _pair_files(generated_dir: str, reference_dir: str, what: tuple[str, str]) -> list[tuple[Path, Path]]:
    from xa_lightning.metrics.images import list_image_files

    generated = list_image_files(generated_dir, what[0])
    references = list_image_files(reference_dir, what[1])
    by_name = {p.name: p for p in references}
    if all(p.name in by_name for p in generated):
        return [(p, by_name[p.name]) for p in generated]
    if len(generated) % len(references) != 0:
        raise UserError(
            f"{what[0]} has {len(generated)} images and {what[1]} {len(references)}: name the files "
            "alike, or give k generated images per reference (in sorted order)"
        )
    per_reference = len(generated) // len(references)
    return [(g, references[i // per_reference]) for i, g in enumerate(generated)]


def _batches(pairs: list, size: int) -> list[list]:
    return [pairs[i : i + size] for i in range(0, len(pairs), size)]


def _stack(paths: Sequence[Path], size: int | None = None) -> Any:
    import torch

    from xa_lightning.metrics.images import load_image, resize_square

    images = [load_image(p) for p in paths]
    if size is not None or len({tuple(i.shape) for i in images}) > 1:
        side = size or min(min(i.shape[1:]) for i in images)
        images = [resize_square(i.unsqueeze(0), side)[0] for i in images]
    return torch.stack(images)


# ---------------------------------------------------------------------------------------------- commands
def cmd_fid(args: argparse.Namespace, kid_only: bool = False) -> dict[str, Any]:
    from xa_lightning.metrics.fid import FeatureStatistics, compute_statistics, frechet_distance, stats_path
    from xa_lightning.metrics.inception import get_inception
    from xa_lightning.metrics.kid import kernel_inception_distance

    device = _device(args.device)
    extractor = get_inception(args.weights_dir, device)
    if args.reference_stats:
        real = FeatureStatistics.load(stats_path(args.reference_stats), "--reference-stats")
    elif args.real:
        real = compute_statistics(args.real, extractor, args.batch_size, device=device, progress=True)
    else:
        raise UserError("give --real DIR or --reference-stats NAME|FILE")
    fake = compute_statistics(args.fake, extractor, args.batch_size, device=device, progress=True)
    result: dict[str, Any] = {"metric": "kid" if kid_only else "fid", "num_real": real.count, "num_fake": fake.count}
    if not kid_only:
        result["fid"] = frechet_distance(fake, real)
    if kid_only or args.kid:
        if real.features is None or fake.features is None:
            raise UserError(
                "KID needs the features of both sets; the reference statistics have none "
                "(recompute them with xa-eval fid-stats)"
            )
        mean, std = kernel_inception_distance(real.features, fake.features, args.kid_subsets, args.kid_subset_size)
        result["kid"], result["kid_std"] = mean, std
    return result


def cmd_fid_stats(args: argparse.Namespace) -> dict[str, Any]:
    from xa_lightning.metrics.fid import compute_statistics, stats_path
    from xa_lightning.metrics.inception import get_inception

    device = _device(args.device)
    target = Path(args.out) if args.out else stats_path(args.name)
    if target.exists() and not args.overwrite:
        raise UserError(f"{target} exists; pass --overwrite to recompute it or choose another --name")
    stats = compute_statistics(
        args.real,
        get_inception(args.weights_dir, device),
        args.batch_size,
        device=device,
        keep_features_up_to=args.keep_features,
        progress=True,
    )
    stats.save(target)
    return {
        "metric": "fid-stats",
        "name": args.name,
        "path": str(target),
        "num_images": stats.count,
        "features_kept": stats.features is not None,
    }


def cmd_clip(args: argparse.Namespace) -> dict[str, Any]:
    from xa_lightning.metrics.clip_score import ClipImageSimilarity, ClipScore, get_clip
    from xa_lightning.metrics.evaluate import read_prompts
    from xa_lightning.metrics.images import list_image_files

    if not args.prompts and not args.references:
        raise UserError("give --prompts FILE (CLIP score) and/or --references DIR (CLIP image similarity)")
    device = _device(args.device)
    clip = get_clip(
        args.model, args.pretrained, cache_dir=args.cache_dir, device=device, require_pretrained=args.require_pretrained
    )
    result: dict[str, Any] = {
        "metric": "clip",
        "model": args.model,
        "pretrained": args.pretrained,
        "trained": clip.trained,
    }
    if args.prompts:
        files = list_image_files(args.images, "--images")
        prompts = read_prompts(args.prompts, "--prompts")
        if len(prompts) == 1:
            prompts = prompts * len(files)
        if len(prompts) != len(files):
            raise UserError(
                f"--prompts has {len(prompts)} lines for {len(files)} images; give one line per image "
                "(sorted file order) or a single line for all"
            )
        metric = ClipScore(clip).to(device)
        for batch in _batches(list(zip(files, prompts)), args.batch_size):
            metric.update(_stack([f for f, _ in batch]), [p for _, p in batch])
        result[metric.log_name] = float(metric.compute())
        result["num_images"] = len(files)
    if args.references:
        metric = ClipImageSimilarity(clip).to(device)
        pairs = _pair_files(args.images, args.references, ("--images", "--references"))
        for batch in _batches(pairs, args.batch_size):
            metric.update(_stack([g for g, _ in batch]), references=_stack([r for _, r in batch]))
        result[metric.log_name] = float(metric.compute())
        result["num_pairs"] = len(pairs)
    return result


def cmd_ida(args: argparse.Namespace) -> dict[str, Any]:
    from xa_lightning.metrics.ida import IdentityAlignment, build_face_embedder

    kwargs = {"detector": args.detector} if args.backend == "dlib" else {"det_size": args.det_size}
    metric = IdentityAlignment(
        build_face_embedder(args.backend, args.model_dir, **kwargs), missing_face=args.missing_face
    )
    pairs = _pair_files(args.generated, args.reference, ("--generated", "--reference"))
    for generated, reference in pairs:  # one by one: the folders may mix image sizes
        metric.update(_stack([generated]), references=_stack([reference]))
    return {"metric": "ida", "backend": args.backend, **metric.results(), "num_pairs": len(pairs)}


def cmd_edge_f1(args: argparse.Namespace) -> dict[str, Any]:
    from xa_lightning.metrics.condition import EdgeF1

    metric = EdgeF1(args.low_threshold, args.high_threshold, args.radius, args.references)
    pairs = _pair_files(args.generated, args.control, ("--generated", "--control"))
    for generated, control in pairs:
        metric.update(_stack([generated]), references=_stack([control]))
    return {"metric": "edge_f1", "edge_f1": float(metric.compute()), "num_pairs": len(pairs)}


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xa-eval", description="Metrics on image folders (JSON last line).")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, batch: int = 16) -> None:
        p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
        p.add_argument("--batch-size", type=int, default=batch)

    for name in ("fid", "kid"):
        p = sub.add_parser(name, help=f"{name.upper()} between two folders (clean-fid compatible)")
        p.add_argument("--real", help="folder of real images")
        p.add_argument("--fake", required=True, help="folder of generated images")
        p.add_argument("--reference-stats", help="instead of --real: a name cached by fid-stats or a .npz")
        p.add_argument("--kid", action="store_true", help="also report KID (fid only)")
        p.add_argument("--kid-subsets", type=int, default=100)
        p.add_argument("--kid-subset-size", type=int, default=1000)
        p.add_argument("--weights-dir", default=None, help="folder of inception-2015-12-05.pt (default: cache)")
        common(p)
    p = sub.add_parser("fid-stats", help="precompute and cache a real set's FID statistics")
    p.add_argument("--real", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--out", default=None, help="file to write (default: <cache>/fid_stats/NAME.npz)")
    p.add_argument("--keep-features", type=int, default=10_000, help="keep features (KID, exact FID) up to N")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--weights-dir", default=None)
    common(p)
    p = sub.add_parser("clip", help="CLIP score (text-image) / CLIP image similarity")
    p.add_argument("--images", required=True)
    p.add_argument("--prompts", default=None, help="text file: one prompt per image (sorted) or one for all")
    p.add_argument("--references", default=None, help="folder of reference images (image-image similarity)")
    p.add_argument("--model", default="ViT-L-14")
    p.add_argument("--pretrained", default="openai")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--require-pretrained", action="store_true", help="fail instead of using a random encoder")
    common(p, 8)
    p = sub.add_parser("ida", help="identity alignment (face-embedding cosine)")
    p.add_argument("--generated", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--backend", choices=("dlib", "insightface"), default="dlib")
    p.add_argument("--model-dir", default=None, help="insightface: antelopev2 folder; dlib: .dat files folder")
    p.add_argument("--missing-face", choices=("zero", "skip"), default="zero", help="zero: a lost face scores 0")
    p.add_argument("--det-size", type=int, default=640)
    p.add_argument("--detector", choices=("hog", "cnn"), default="hog")
    p = sub.add_parser("edge-f1", help="ControlNet condition fidelity: edge F1 vs control maps")
    p.add_argument("--generated", required=True)
    p.add_argument("--control", required=True)
    p.add_argument("--low-threshold", type=int, default=100)
    p.add_argument("--high-threshold", type=int, default=200)
    p.add_argument("--radius", type=int, default=2)
    p.add_argument(
        "--references", choices=("edges", "image"), default="edges", help="--control holds edge maps, or photos"
    )
    return parser


COMMANDS = {
    "fid": cmd_fid,
    "kid": lambda a: cmd_fid(a, kid_only=True),
    "fid-stats": cmd_fid_stats,
    "clip": cmd_clip,
    "ida": cmd_ida,
    "edge-f1": cmd_edge_f1,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one folder sub-command; prints the JSON result as the last line. UserError -> exit 2."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        result = COMMANDS[args.command](args)
    except UserError as exc:
        print(f"xa-eval: error: {exc}", file=sys.stderr)
        return 2
    _print_result(result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
