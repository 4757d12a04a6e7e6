"""CelebAMask-HQ in its published layout, captioned (A4A's identity experiments).

::

    <root>/CelebA-HQ-img/<id>.jpg                       1024x1024 aligned faces, id = 0..29999
    <root>/CelebAMask-HQ-mask-anno/<id // 2000>/<id:05d>_<part>.png   512x512 part masks (skin, nose, ...)
    <root>/CelebA-HQ-to-CelebA-mapping.txt              "idx orig_idx orig_file" (header line first)
    <root>/captions.jsonl                               {"file": "<id>.jpg", "caption": ...} (xa-data caption)
    [identity_CelebA.txt]                               CelebA's "<orig_file> <identity>" (optional)

Train / validation split by identity with a fixed seed: ``val_identities`` identities (A4A: 100) are held
out entirely. Without CelebA's identity file every image is its own identity. The IP reference is the
face image itself (``reference_crop: image``) or the face region from the part masks (``face``).
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xa_lightning.data.base import CaptionedFolderDataModule
from xa_lightning.data.records import Record, read_captions
from xa_lightning.data.transforms import Box, square_around
from xa_lightning.errors import UserError

log = logging.getLogger("xa_lightning.data")

FACE_PARTS = ("skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "mouth", "u_lip", "l_lip", "eye_g")


def mask_path(mask_dir: Path, image_id: int, part: str) -> Path:
    return mask_dir / str(image_id // 2000) / f"{image_id:05d}_{part}.png"


def read_mapping(path: Path) -> dict[int, str]:
    """CelebA-HQ idx -> CelebA file name (e.g. ``119614.jpg``)."""
    mapping: dict[int, str] = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 3 and parts[0].isdigit():
                mapping[int(parts[0])] = parts[2]
    return mapping


def read_identities(path: Path) -> dict[str, str]:
    """CelebA file name -> identity (``identity_CelebA.txt``)."""
    identities: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 2:
                identities[parts[0]] = parts[1]
    return identities


class FaceBox:
    """Reference box from the part masks: the union of the face parts, squared with a margin."""

    def __init__(self, mask_dir: Path, margin: float = 0.15) -> None:
        self.mask_dir = mask_dir
        self.margin = margin

    def __call__(self, record: Record, image: Image.Image, rng: Any) -> tuple[Box | None, list[str]]:
        try:
            image_id = int(Path(record.key).stem)
        except ValueError:
            return None, ["no_face_mask"]
        union: np.ndarray | None = None
        for part in FACE_PARTS:
            path = mask_path(self.mask_dir, image_id, part)
            if not path.is_file():
                continue
            try:
                with Image.open(path) as mask_image:
                    mask = np.asarray(mask_image.convert("L")) > 127
            except OSError:
                continue
            union = mask if union is None else (union | mask if union.shape == mask.shape else union)
        if union is None or not union.any():
            return None, ["no_face_mask"]
        rows, cols = np.nonzero(union)
        sy, sx = image.height / union.shape[0], image.width / union.shape[1]
        box = (cols.min() * sx, rows.min() * sy, (cols.max() + 1) * sx, (rows.max() + 1) * sy)
        return square_around(box, image.size, self.margin), []


class CelebAMaskHQDataModule(CaptionedFolderDataModule):
    """CelebAMask-HQ faces + captions; samples carry ``reference`` (the face) for IP adapters."""

    dataset_title = "CelebAMask-HQ"
    val_split_key = "data.val_identities"

    name = "celebamask_hq"
    has_references = True

    def __init__(
        self,
        root: str | None = None,
        captions: str = "captions.jsonl",
        images_dir: str = "CelebA-HQ-img",
        masks_dir: str = "CelebAMask-HQ-mask-anno",
        mapping_file: str = "CelebA-HQ-to-CelebA-mapping.txt",
        identity_file: str | None = None,
        val_identities: int = 100,
        reference_resolution: int = 224,
        reference_crop: str = "image",
        face_margin: float = 0.15,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if reference_crop not in ("image", "face"):
            raise UserError(f"data.reference_crop={reference_crop!r}: choose image or face")
        self.root = Path(root).expanduser() if root else None
        self.captions_name = captions
        self.images_name = images_dir
        self.masks_name = masks_dir
        self.mapping_name = mapping_file
        self.identity_name = identity_file
        self.val_identities = int(val_identities)
        self.reference_resolution = int(reference_resolution)
        self.reference_crop = reference_crop
        self.face_margin = float(face_margin)
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []

    # ---------------------------------------------------------------- source
    def _build_demo(self, root: Path) -> None:
        from xa_lightning.data.demo import build_celebamask_hq_demo

        build_celebamask_hq_demo(root)

    def _check_source(self) -> Path | None:
        self._check_root_images_captions("is data.root a CelebAMask-HQ folder?")
        return self.root

    def _setup_index(self) -> None:
        images = self._path(self.images_name)
        entries = read_captions(self._path(self.captions_name), images, self.index_counter, "data.captions")
        mapping_path = self._path(self.mapping_name)
        mapping = read_mapping(mapping_path) if mapping_path.is_file() else {}
        identities: dict[str, str] = {}
        if self.identity_name:
            identity_path = self._path(self.identity_name)
            if not identity_path.is_file():
                raise UserError(
                    f"data.identity_file: {identity_path} does not exist; set it to CelebA's "
                    "identity_CelebA.txt or to null (each image its own identity)"
                )
            identities = read_identities(identity_path)
        records = []
        for file, (path, caption) in entries.items():
            stem = Path(file).stem
            image_id = int(stem) if stem.isdigit() else None
            orig = mapping.get(image_id) if image_id is not None else None
            group = identities.get(orig, "") if orig else ""
            records.append(Record(key=file, path=path, caption=caption, group=group or f"image:{file}"))
        if not records:
            raise UserError(
                f"data.captions: no usable entry in {self._path(self.captions_name)} "
                f"(counts: {self.index_counter.totals()})"
            )
        records.sort(key=_natural_key)
        groups = sorted({r.group for r in records}, key=_natural_text)
        if self.val_identities >= len(groups):
            raise UserError(
                f"data.val_identities={self.val_identities}: the dataset has only {len(groups)} identities; lower it"
            )
        held_out = set(random.Random(self.seed).sample(groups, self.val_identities)) if self.val_identities else set()
        self.train_records = [r for r in records if r.group not in held_out]
        self.val_records = [r for r in records if r.group in held_out]
        log.info(
            "data: CelebAMask-HQ %d train / %d val images (%d held-out identities)",
            len(self.train_records),
            len(self.val_records),
            len(held_out),
        )

    # ---------------------------------------------------------------- datasets
    def _reference_box(self) -> FaceBox | None:
        return FaceBox(self._path(self.masks_name), self.face_margin) if self.reference_crop == "face" else None

    def _eval_order(self, records: list[Record]) -> list[Record]:
        # one image per held-out identity first (A4A: 100 references x 4 generations), then the rest
        firsts: dict[str, int] = {}
        for i, record in enumerate(records):
            firsts.setdefault(record.group, i)
        first_set = set(firsts.values())
        return [records[i] for i in sorted(first_set)] + [r for i, r in enumerate(records) if i not in first_set]

    def source_fingerprint(self) -> dict[str, Any]:
        self.setup()
        captions = self._path(self.captions_name)
        st = captions.stat()
        return {
            "dataset": self.name,
            "root": str(self.root.resolve()),
            "captions": [str(captions), st.st_size, int(st.st_mtime)],
            "train": len(self.train_records),
            "val": len(self.val_records),
            "val_identities": self.val_identities,
            "seed": self.seed,
            "reference": [self.reference_crop, self.reference_resolution, self.face_margin],
        }


def _natural_text(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _natural_key(record: Record) -> list[Any]:
    return _natural_text(record.key)
