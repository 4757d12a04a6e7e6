"""Small demo datasets in exactly the published on-disk formats, from images shipped inside installed
packages (scikit-image, scikit-learn, matplotlib) with hand-written captions.

* ``laion/``: img2dataset output — ``00000.tar`` (``KEY.jpg``, ``KEY.txt``, ``KEY.json``), ``00000.parquet``
  (including failed downloads), ``00000_stats.json``; real metadata (aesthetic, pwatermark, punsafe,
  original size) with some samples that fail the demo filters.
* ``celebamask_hq/``: ``CelebA-HQ-img/<id>.jpg``, ``CelebAMask-HQ-mask-anno/<id//2000>/<id:05d>_<part>.png``,
  ``CelebA-HQ-to-CelebA-mapping.txt``, ``identity_CelebA.txt`` (CelebA's identity file; two images per
  identity), ``captions.jsonl``. Faces: scikit-image's LFW subset (25x25 grey, upscaled), the astronaut
  and Grace Hopper.
* ``openimages/``: ``train/<ImageID>.jpg``, ``oidv6-train-annotations-bbox.csv``,
  ``oidv7-class-descriptions-boxable.csv``, ``captions.jsonl``.

Everything is seeded: the same files on every machine. Each dataset is written to a temporary folder
and renamed into place, so a reader never sees half a dataset.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

DATASETS = ("laion", "celebamask_hq", "openimages")
FIXED_MTIME = 1_700_000_000  # tar member mtime: identical bytes on every build

# ------------------------------------------------------------------------------------------ sources
LAION_CAPTIONS: dict[str, list[str]] = {
    "astronaut": [
        "portrait of a smiling astronaut in an orange spacesuit next to an american flag",
        "official NASA photo of a female astronaut, space shuttle model in the background",
        "a woman in an orange flight suit with mission patches smiling at the camera",
        "astronaut studio portrait with a white helmet on the table",
    ],
    "chelsea": [
        "close-up of a tabby cat with green eyes looking at the camera",
        "a ginger striped cat staring, shallow depth of field",
        "macro photo of a cat's face with long white whiskers",
        "curious brown tabby cat, indoor portrait",
    ],
    "coffee": [
        "a cup of espresso on a red saucer on a wooden table",
        "top view of a red coffee cup with a silver spoon on a cafe table",
        "fresh espresso with crema in a red ceramic cup",
        "coffee break: red cup and saucer on dark wood",
    ],
    "rocket": [
        "a rocket on the launch pad at dusk, lit by floodlights",
        "rocket standing between lightning towers under a deep blue sky",
        "night launch preparation, rocket and service towers with bright lights",
        "long exposure photo of a launch complex before liftoff",
    ],
    "hubble_deep_field": [
        "the hubble deep field, thousands of distant galaxies on black",
        "deep space photograph full of colorful galaxies and stars",
        "astronomy image of faint galaxies scattered across the dark sky",
    ],
    "immunohistochemistry": [
        "microscope image of tissue stained brown and blue",
        "immunohistochemistry slide, glandular tissue under the microscope",
        "histology micrograph with brown stained cell membranes",
    ],
    "colorwheel": [
        "a rainbow color wheel on a black background",
        "circular gradient of all hues fading to white in the center",
    ],
    "camera": [
        "black and white photo of a man with a film camera on a tripod in a field",
        "vintage photograph of a cameraman in a dark coat, buildings in the distance",
        "a photographer looking through his camera, grayscale",
    ],
    "retina": [
        "fundus photograph of a human retina with red blood vessels",
        "medical image of the back of the eye, optic disc on the left",
    ],
    "china": [
        "a traditional chinese pagoda on a hill above a lake, summer day",
        "the tower of buddhist incense at the summer palace surrounded by trees",
        "colorful multi-storey chinese temple with green roofs, hazy sky",
    ],
    "flower": [
        "an orange dahlia in full bloom against dark green leaves",
        "close-up of a peach colored dahlia flower, soft background",
        "garden flower photography, round orange petals",
    ],
    "grace_hopper": [
        "portrait of rear admiral grace hopper in her navy uniform",
        "official portrait of a woman naval officer with medals, vintage photo",
        "an elderly woman in a dark navy uniform with a white collar, studio portrait",
    ],
}

# LFW subset faces 0..19 (scikit-image): one hand-written description each.
FACE_CAPTIONS: list[str] = [
    "a close-up of a man with short grey hair, his mouth open as if speaking",
    "a portrait of a smiling man with dark tousled hair",
    "a close-up photo of a young man with wavy hair and a slight smile",
    "a headshot of a man with slicked-back dark hair and a serious expression",
    "a dim close-up of a man wearing glasses, looking down",
    "a close-up of a man with glasses and a frown",
    "a photo of an older man with glasses and a stern look",
    "a close-up of a middle-aged man with short hair looking at the camera",
    "a photo of an older man with light hair squinting and smiling",
    "a close-up of an older man with thinning hair and glasses",
    "a man with glasses and short hair smiling slightly",
    "a portrait of a bald man with a goatee smiling",
    "a close-up of a man wearing a knit cap",
    "a photo of a man with a shaved head and a calm expression",
    "a close-up of a heavyset man with short dark hair",
    "a young man with short hair and a slight smirk",
    "a photo of a man covering his mouth with his hand",
    "a man in a baseball cap with a moustache",
    "a smiling young woman with dark hair speaking into a microphone",
    "a laughing man with short curly hair",
]
COLOR_FACES: dict[str, tuple[tuple[int, int, int, int], list[str]]] = {
    # source -> (crop box in the source image, captions of its two images)
    "astronaut": (
        (120, 0, 330, 210),
        [
            "a smiling woman with short curly brown hair in an orange spacesuit",
            "a woman astronaut with curly hair smiling, an american flag behind her",
        ],
    ),
    "grace_hopper": (
        (120, 40, 400, 320),
        [
            "an elderly woman with grey hair in a navy uniform and cap",
            "an old woman in a naval officer's hat looking at the camera",
        ],
    ),
}

# OpenImages demo: source -> (captions of the two images, boxes: (MID, XMin, XMax, YMin, YMax, IsGroupOf))
OPENIMAGES_CLASSES = {
    "/m/01g317": "Person",
    "/m/0dzct": "Human face",
    "/m/03120": "Flag",
    "/m/09rvcxw": "Rocket",
    "/m/0zvk5": "Helmet",
    "/m/01yrx": "Cat",
    "/m/02p5f1q": "Coffee cup",
    "/m/03q5c7": "Saucer",
    "/m/0cmx8": "Spoon",
    "/m/0dv5r": "Camera",
    "/m/073bxn": "Tripod",
    "/m/0cgh4": "Building",
    "/m/07j7r": "Tree",
    "/m/0c9ph5": "Flower",
    "/m/0ch_cf": "Fish",
    "/m/0k4j": "Car",
}
OPENIMAGES_SOURCES: dict[str, tuple[list[str], list[tuple[str, float, float, float, float, int]]]] = {
    "astronaut": (
        ["a woman in an orange space suit posing with a helmet", "an astronaut smiling in front of an american flag"],
        [
            ("/m/01g317", 0.02, 0.72, 0.03, 1.0, 0),
            ("/m/0dzct", 0.33, 0.55, 0.05, 0.32, 0),
            ("/m/03120", 0.0, 0.18, 0.0, 0.85, 0),
            ("/m/09rvcxw", 0.69, 0.93, 0.0, 0.55, 0),
            ("/m/0zvk5", 0.54, 1.0, 0.66, 1.0, 0),
        ],
    ),
    "chelsea": (
        ["a close up of a cat with green eyes", "a tabby cat looking at the camera"],
        [("/m/01yrx", 0.0, 1.0, 0.0, 1.0, 0)],
    ),
    "coffee": (
        ["a red cup of coffee on a saucer with a spoon", "an espresso cup on a wooden table"],
        [
            ("/m/02p5f1q", 0.28, 0.74, 0.03, 0.62, 0),
            ("/m/03q5c7", 0.06, 0.84, 0.18, 0.98, 0),
            ("/m/0cmx8", 0.52, 0.70, 0.36, 0.68, 0),
        ],
    ),
    "rocket": (
        ["a rocket sitting on a launch pad at night", "a tall rocket lit up by lights before launch"],
        [("/m/09rvcxw", 0.45, 0.55, 0.15, 0.97, 0)],
    ),
    "camera": (
        ["a man taking a picture with a camera on a tripod", "a black and white photo of a photographer"],
        [
            ("/m/01g317", 0.0, 0.60, 0.14, 1.0, 0),
            ("/m/0dv5r", 0.48, 0.66, 0.25, 0.42, 0),
            ("/m/073bxn", 0.55, 0.82, 0.38, 0.98, 0),
        ],
    ),
    "china": (
        ["a pagoda on top of a hill next to a lake", "a chinese temple surrounded by trees"],
        [
            ("/m/0cgh4", 0.04, 0.58, 0.02, 0.98, 0),
            ("/m/07j7r", 0.70, 1.0, 0.33, 1.0, 1),
            ("/m/07j7r", 0.0, 0.20, 0.45, 1.0, 0),
        ],
    ),
    "flower": (
        ["an orange flower with green leaves in the background", "a dahlia blooming in a garden"],
        [("/m/0c9ph5", 0.27, 0.73, 0.12, 0.86, 0), ("/m/0c9ph5", 0.50, 0.74, 0.86, 1.0, 0)],
    ),
    "grace_hopper": (
        ["an old woman in a navy uniform posing for a picture", "a portrait of a female naval officer"],
        [
            ("/m/01g317", 0.0, 1.0, 0.02, 1.0, 0),
            ("/m/0dzct", 0.27, 0.75, 0.10, 0.52, 0),
            ("/m/03120", 0.0, 0.28, 0.0, 0.45, 0),
        ],
    ),
}


@cache
def source_image(name: str) -> np.ndarray:
    """An RGB uint8 image shipped inside an installed package (no download)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        array = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as handle:
            array = np.asarray(Image.open(handle).convert("RGB"))
    else:
        import skimage.data

        array = getattr(skimage.data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).astype(np.uint8) if array.max() <= 1.0 else array.astype(np.uint8)
    image = Image.fromarray(array)
    if min(image.size) > 512:  # keep building fast
        image.thumbnail((640, 640), Image.Resampling.LANCZOS)
    return np.asarray(image)


@lru_cache(maxsize=1)
def lfw_faces() -> np.ndarray:
    import skimage.data

    return skimage.data.lfw_subset()[:100]  # the first 100 are faces, the rest are not


def _jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _augment(image: Image.Image, rng: np.random.Generator, min_area: float = 0.55) -> Image.Image:
    """A random crop (55-100 % of the area), flip and colour change: variety from few sources."""
    width, height = image.size
    area = rng.uniform(min_area, 1.0) * width * height
    aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(1.33))))
    crop_w = int(min(width, round(np.sqrt(area * aspect))))
    crop_h = int(min(height, round(np.sqrt(area / aspect))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    image = image.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.85, 1.15)))
    image = ImageEnhance.Color(image).enhance(float(rng.uniform(0.8, 1.25)))
    return image


def _resize_short(image: Image.Image, short: int) -> Image.Image:
    scale = short / min(image.size)
    return image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
    )


def _atomic_build(root: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temporary sibling folder, then rename it to ``root`` (unless someone else won)."""
    root = Path(root)
    if root.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset should not be
    try:
        write(tmp)
        try:
            os.rename(tmp, root)
        except OSError:
            if not root.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ------------------------------------------------------------------------------------------ LAION
def _laion_samples(num_shards: int, per_shard: int, seed: int) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    names = list(LAION_CAPTIONS)
    shards: list[list[dict]] = []
    counter = 0
    for shard in range(num_shards):
        rows = []
        for index in range(per_shard):
            name = names[counter % len(names)]
            captions = LAION_CAPTIONS[name]
            caption = captions[(counter // len(names)) % len(captions)]
            counter += 1
            key = f"{shard:05d}{index:04d}"
            source = Image.fromarray(source_image(name))
            image = _augment(source, rng)
            short = int(rng.choice([96, 128, 160, 192, 224]))
            image = _resize_short(image, short)
            scale_up = float(rng.choice([1.0, 2.0, 3.5, 6.0]))
            aesthetic = float(np.round(rng.uniform(4.2, 7.6), 4))
            pwatermark = float(np.round(rng.beta(1.2, 8.0), 4))
            punsafe = float(np.round(rng.beta(1.0, 40.0), 5))
            original = (round(image.width * scale_up), round(image.height * scale_up))
            # a few rows that the demo filters (conf/data/laion_demo.yaml) remove
            if index == 3:
                aesthetic = 4.31
            if index == 7:
                pwatermark = 0.93
            if index == 11:
                punsafe = 0.87
            if index == 14:
                original = (48, 40)
            jpeg = _jpeg(image, quality=int(rng.integers(82, 96)))
            meta = {
                "url": f"https://images.example.org/demo/{name}/{key}.jpg",
                "caption": caption,
                "key": key,
                "status": "success",
                "error_message": None,
                "width": image.width,
                "height": image.height,
                "original_width": original[0],
                "original_height": original[1],
                "exif": "{}",
                "sha256": hashlib.sha256(jpeg).hexdigest(),
                "similarity": float(np.round(rng.uniform(0.28, 0.42), 4)),
                "hash": int(rng.integers(-(2**62), 2**62)),
                "punsafe": punsafe,
                "pwatermark": pwatermark,
                "aesthetic": aesthetic,
            }
            rows.append({"key": key, "jpg": jpeg, "txt": caption, "json": meta})
        shards.append(rows)
    return shards


def build_laion_demo(root: Path, *, num_shards: int = 2, per_shard: int = 20, seed: int = 0) -> Path:
    """img2dataset-style shards of ``per_shard`` samples (+2 failed downloads per parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from webdataset import TarWriter

    def write(out: Path) -> None:
        for shard, rows in enumerate(_laion_samples(num_shards, per_shard, seed)):
            with TarWriter(str(out / f"{shard:05d}.tar"), encoder=False, mtime=FIXED_MTIME) as writer:
                for row in rows:
                    writer.write(
                        {
                            "__key__": row["key"],
                            "jpg": row["jpg"],
                            "txt": row["txt"].encode("utf-8"),
                            "json": json.dumps(row["json"]).encode("utf-8"),
                        }
                    )
            records = [dict(row["json"]) for row in rows]
            for failed in range(2):
                key = f"{shard:05d}{per_shard + failed:04d}"
                records.append(
                    {
                        **{k: None for k in records[0]},
                        "key": key,
                        "status": "failed_to_download",
                        "url": f"https://images.example.org/demo/missing/{key}.jpg",
                        "caption": "an image that could not be downloaded",
                        "error_message": "HTTP Error 404: Not Found",
                    }
                )
            pq.write_table(pa.Table.from_pylist(records), out / f"{shard:05d}.parquet")
            (out / f"{shard:05d}_stats.json").write_text(
                json.dumps(
                    {
                        "count": len(records),
                        "successes": len(rows),
                        "failed_to_download": 2,
                        "failed_to_resize": 0,
                        "status_dict": {"success": len(rows), "HTTP Error 404: Not Found": 2},
                    }
                )
            )

    return _atomic_build(root, write)


# ------------------------------------------------------------------------------------------ CelebAMask-HQ
def _face_masks(size: int) -> dict[str, Image.Image]:
    """Part masks of an aligned face (CelebAMask-HQ stores each part as a binary PNG)."""

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> Image.Image:
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).ellipse([(cx - rx) * size, (cy - ry) * size, (cx + rx) * size, (cy + ry) * size], fill=255)
        return mask

    return {
        "skin": ellipse(0.5, 0.52, 0.30, 0.38),
        "l_eye": ellipse(0.38, 0.45, 0.05, 0.025),
        "r_eye": ellipse(0.62, 0.45, 0.05, 0.025),
        "l_brow": ellipse(0.37, 0.39, 0.08, 0.02),
        "r_brow": ellipse(0.63, 0.39, 0.08, 0.02),
        "nose": ellipse(0.5, 0.56, 0.05, 0.08),
        "u_lip": ellipse(0.5, 0.70, 0.09, 0.02),
        "l_lip": ellipse(0.5, 0.73, 0.09, 0.025),
        "hair": ellipse(0.5, 0.12, 0.40, 0.15),
        "neck": ellipse(0.5, 0.97, 0.2, 0.1),
    }


def build_celebamask_hq_demo(root: Path, *, image_size: int = 128, seed: int = 0) -> Path:
    """22 identities x 2 images in the CelebAMask-HQ layout, captions.jsonl and CelebA's identity file."""

    def write(out: Path) -> None:
        rng = np.random.default_rng(seed)
        images_dir = out / "CelebA-HQ-img"
        masks_root = out / "CelebAMask-HQ-mask-anno"
        images_dir.mkdir()
        faces: list[tuple[Image.Image, list[str]]] = []
        for i, caption in enumerate(FACE_CAPTIONS):
            gray = Image.fromarray((lfw_faces()[i] * 255).astype(np.uint8)).resize(
                (image_size, image_size), Image.Resampling.BICUBIC
            )
            faces.append(
                (
                    gray.convert("RGB"),
                    [
                        f"a black and white {caption[2:] if caption.startswith('a ') else caption}",
                        f"a sepia-toned {caption[2:] if caption.startswith('a ') else caption}",
                    ],
                )
            )
        for name, (box, captions) in COLOR_FACES.items():
            face = (
                Image.fromarray(source_image(name)).crop(box).resize((image_size, image_size), Image.Resampling.LANCZOS)
            )
            faces.append((face, captions))
        masks = _face_masks(image_size // 2)
        mapping_lines = ["idx         orig_idx    orig_file"]
        identity_lines = []
        captions_lines = []
        image_id = 0
        for identity, (face, captions) in enumerate(faces, start=1):
            for variant in range(2):
                image = face
                if variant == 1:  # the same person again: shifted, flipped, toned
                    image = _augment(face, rng, min_area=0.8).resize((image_size, image_size), Image.Resampling.BICUBIC)
                    if identity <= len(FACE_CAPTIONS):
                        sepia = np.asarray(image.convert("L"), dtype=np.float32)[..., None] * np.array(
                            [1.07, 0.94, 0.74], dtype=np.float32
                        )
                        image = Image.fromarray(np.clip(sepia, 0, 255).astype(np.uint8))
                (images_dir / f"{image_id}.jpg").write_bytes(_jpeg(image, 95))
                mask_dir = masks_root / str(image_id // 2000)
                mask_dir.mkdir(parents=True, exist_ok=True)
                for part, mask in masks.items():
                    mask.save(mask_dir / f"{image_id:05d}_{part}.png")
                orig_idx = 1000 + 37 * image_id
                orig_file = f"{orig_idx + 1:06d}.jpg"
                mapping_lines.append(f"{image_id:<12d}{orig_idx:<12d}{orig_file}")
                identity_lines.append(f"{orig_file} {identity}")
                captions_lines.append(json.dumps({"file": f"{image_id}.jpg", "caption": captions[variant]}))
                image_id += 1
        (out / "CelebA-HQ-to-CelebA-mapping.txt").write_text("\n".join(mapping_lines) + "\n")
        (out / "identity_CelebA.txt").write_text("\n".join(identity_lines) + "\n")
        (out / "captions.jsonl").write_text("\n".join(captions_lines) + "\n")

    return _atomic_build(root, write)


# ------------------------------------------------------------------------------------------ OpenImages
BOX_HEADER = [
    "ImageID",
    "Source",
    "LabelName",
    "Confidence",
    "XMin",
    "XMax",
    "YMin",
    "YMax",
    "IsOccluded",
    "IsTruncated",
    "IsGroupOf",
    "IsDepiction",
    "IsInside",
]


def _image_id(name: str, variant: int) -> str:
    return hashlib.sha1(f"{name}:{variant}".encode()).hexdigest()[:16]


def build_openimages_demo(root: Path, *, long_side: int = 256, seed: int = 0) -> Path:
    """16 images (8 scenes x 2 views) with OpenImages box CSV, class CSV and captions.jsonl."""

    def write(out: Path) -> None:
        rng = np.random.default_rng(seed)
        images_dir = out / "train"
        images_dir.mkdir()
        box_rows = []
        captions_lines = []
        for name, (captions, boxes) in OPENIMAGES_SOURCES.items():
            source = Image.fromarray(source_image(name))
            for variant in range(2):
                image_id = _image_id(name, variant)
                image, view_boxes = source, list(boxes)
                if variant == 1:  # horizontal flip + crop of the right 85 %: boxes follow
                    width, height = source.size
                    cut = int(width * 0.15)
                    image = source.crop((cut, 0, width, height)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                    kept = []
                    for mid, x0, x1, y0, y1, group in boxes:
                        a0 = max(0.0, (x0 * width - cut) / (width - cut))
                        a1 = max(0.0, (x1 * width - cut) / (width - cut))
                        if a1 - a0 > 0.02:
                            kept.append((mid, round(1 - a1, 4), round(1 - a0, 4), y0, y1, group))
                    view_boxes = kept
                scale = long_side / max(image.size)
                image = image.resize(
                    (round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS
                )
                (images_dir / f"{image_id}.jpg").write_bytes(_jpeg(image, int(rng.integers(85, 96))))
                for mid, x0, x1, y0, y1, group in view_boxes:
                    box_rows.append(
                        [
                            image_id,
                            "xclick",
                            mid,
                            1,
                            f"{x0:.6f}",
                            f"{x1:.6f}",
                            f"{y0:.6f}",
                            f"{y1:.6f}",
                            0,
                            int(x0 <= 0.0 or x1 >= 1.0),
                            group,
                            0,
                            0,
                        ]
                    )
                captions_lines.append(json.dumps({"file": f"{image_id}.jpg", "caption": captions[variant]}))
        with open(out / "oidv6-train-annotations-bbox.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(BOX_HEADER)
            writer.writerows(box_rows)
        with open(out / "oidv7-class-descriptions-boxable.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["LabelName", "DisplayName"])
            writer.writerows(sorted(OPENIMAGES_CLASSES.items()))
        (out / "captions.jsonl").write_text("\n".join(captions_lines) + "\n")

    return _atomic_build(root, write)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "laion": build_laion_demo,
    "celebamask_hq": build_celebamask_hq_demo,
    "openimages": build_openimages_demo,
}


def build_demo(out: Path, only: list[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Write the demo datasets under ``out`` (``out/laion``, ``out/celebamask_hq``, ``out/openimages``).

    Existing datasets are kept unless ``force`` (then rebuilt).
    """
    out = Path(out)
    written = {}
    for name in only or DATASETS:
        if name not in BUILDERS:
            from xa_lightning.errors import UserError

            raise UserError(f"xa-data demo --only: unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
        target = out / name
        if force and target.exists():
            shutil.rmtree(target)
        written[name] = BUILDERS[name](target)
    return written
