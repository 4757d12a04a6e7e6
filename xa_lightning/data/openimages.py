"""OpenImages images by ImageID with the published CSVs, captioned (A4A's object experiments).

::

    <root>/<images_dir>/<ImageID>.jpg                  e.g. train/000002b66c9c498e.jpg
    <root>/oidv6-train-annotations-bbox.csv            ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,
                                                       IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside
    <root>/oidv7-class-descriptions-boxable.csv        LabelName,DisplayName (older files have no header)
    <root>/captions.jsonl                              {"file": "<ImageID>.jpg", "caption": ...}

The box CSV of the full train split is 2 GB; only the columns used and the rows of captioned images
are kept. Validation: ``val_size`` images chosen with the seed. The IP reference is the whole image
(``reference: image``) or an object crop (``reference: object``): a random usable box in training, the
largest in evaluation; group boxes and boxes under ``min_box_fraction`` of the image are not used.
"""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path
from typing import Any

from PIL import Image

from xa_lightning.data.base import CaptionedFolderDataModule
from xa_lightning.data.records import Record, read_captions
from xa_lightning.data.transforms import Box, square_around
from xa_lightning.errors import UserError

log = logging.getLogger("xa_lightning.data")

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf")


def read_class_names(path: Path) -> dict[str, str]:
    """LabelName (MID) -> DisplayName, with or without the header line."""
    names: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.reader(handle):
            if len(row) >= 2 and row[0] != "LabelName":
                names[row[0]] = row[1]
    return names


def read_boxes(path: Path, image_ids: set[str]) -> dict[str, list[tuple[str, Box, bool]]]:
    """ImageID -> [(LabelName, (xmin, ymin, xmax, ymax) normalised, is_group)] for the given images."""
    import pyarrow.compute as pc
    from pyarrow import csv as pacsv

    try:
        import pyarrow as pa

        # ImageIDs are hex strings; some are all digits, so never let the reader infer numbers
        types = {"ImageID": pa.string(), "LabelName": pa.string()}
        table = pacsv.read_csv(
            path, convert_options=pacsv.ConvertOptions(include_columns=list(BOX_COLUMNS), column_types=types)
        )
    except Exception as exc:  # missing columns, not a CSV
        raise UserError(
            f"data.boxes_csv: cannot read {path} as an OpenImages box CSV ({exc}); "
            f"it needs the columns {', '.join(BOX_COLUMNS)}"
        ) from exc
    table = table.filter(pc.is_in(table["ImageID"], value_set=_array(sorted(image_ids))))
    boxes: dict[str, list[tuple[str, Box, bool]]] = {}
    for row in table.to_pylist():
        try:
            box = (float(row["XMin"]), float(row["YMin"]), float(row["XMax"]), float(row["YMax"]))
        except (TypeError, ValueError):
            continue
        if not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            continue
        boxes.setdefault(str(row["ImageID"]), []).append((str(row["LabelName"]), box, bool(row["IsGroupOf"] == 1)))
    return boxes


def _array(values: list[str]):
    import pyarrow as pa

    return pa.array(values, type=pa.string())


class ObjectBox:
    """Reference box for ``reference: object``."""

    def __init__(self, min_box_fraction: float = 0.02, margin: float = 0.05) -> None:
        self.min_box_fraction = min_box_fraction
        self.margin = margin

    def __call__(self, record: Record, image: Image.Image, rng: Any) -> tuple[Box | None, list[str]]:
        usable = [
            (label, box)
            for label, box in record.boxes
            if (box[2] - box[0]) * (box[3] - box[1]) >= self.min_box_fraction
        ]
        if not usable:
            return None, ["no_object_box"]
        if rng is None:  # evaluation: the largest object
            _, box = max(usable, key=lambda item: (item[1][2] - item[1][0]) * (item[1][3] - item[1][1]))
        else:
            _, box = usable[int(rng.integers(0, len(usable)))]
        pixels = (box[0] * image.width, box[1] * image.height, box[2] * image.width, box[3] * image.height)
        return square_around(pixels, image.size, self.margin), []


class OpenImagesDataModule(CaptionedFolderDataModule):
    """OpenImages images + captions; samples carry ``reference`` (whole image or object crop)."""

    dataset_title = "openimages"

    name = "openimages"
    has_references = True

    def __init__(
        self,
        root: str | None = None,
        images_dir: str = "train",
        captions: str = "captions.jsonl",
        boxes_csv: str | None = "oidv6-train-annotations-bbox.csv",
        classes_csv: str | None = "oidv7-class-descriptions-boxable.csv",
        reference: str = "image",
        min_box_fraction: float = 0.02,
        val_size: int = 100,
        reference_resolution: int = 224,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if reference not in ("image", "object"):
            raise UserError(f"data.reference={reference!r}: choose image or object")
        self.root = Path(root).expanduser() if root else None
        self.images_name = images_dir
        self.captions_name = captions
        self.boxes_name = boxes_csv
        self.classes_name = classes_csv
        self.reference = reference
        self.min_box_fraction = float(min_box_fraction)
        self.val_size = int(val_size)
        self.reference_resolution = int(reference_resolution)
        self.class_names: dict[str, str] = {}
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []

    # ---------------------------------------------------------------- source
    def _build_demo(self, root: Path) -> None:
        from xa_lightning.data.demo import build_openimages_demo

        build_openimages_demo(root)

    def _check_source(self) -> Path | None:
        self._check_root_images_captions("set data.images_dir (e.g. train)")
        if self.reference == "object" and (not self.boxes_name or not self._path(self.boxes_name).is_file()):
            raise UserError(
                f"data.boxes_csv: {self.boxes_name and self._path(self.boxes_name)} does not exist; "
                "data.reference=object needs the OpenImages box CSV"
            )
        return self.root

    def _setup_index(self) -> None:
        images = self._path(self.images_name)
        entries = read_captions(self._path(self.captions_name), images, self.index_counter, "data.captions")
        boxes: dict[str, list[tuple[str, Box, bool]]] = {}
        if self.boxes_name and self._path(self.boxes_name).is_file():
            boxes = read_boxes(self._path(self.boxes_name), {Path(f).stem for f in entries})
        if self.classes_name and self._path(self.classes_name).is_file():
            self.class_names = read_class_names(self._path(self.classes_name))
        records = []
        for file, (path, caption) in sorted(entries.items()):
            image_id = Path(file).stem
            usable = [
                (self.class_names.get(label, label), box) for label, box, group in boxes.get(image_id, []) if not group
            ]
            records.append(Record(key=file, path=path, caption=caption, group=image_id, boxes=usable))
        if not records:
            raise UserError(
                f"data.captions: no usable entry in {self._path(self.captions_name)} "
                f"(counts: {self.index_counter.totals()})"
            )
        if self.val_size >= len(records):
            raise UserError(
                f"data.val_size={self.val_size}: the dataset has only {len(records)} captioned images; lower it"
            )
        held_out = set(random.Random(self.seed).sample(range(len(records)), self.val_size))
        self.train_records = [r for i, r in enumerate(records) if i not in held_out]
        self.val_records = [r for i, r in enumerate(records) if i in held_out]
        log.info("data: OpenImages %d train / %d val images", len(self.train_records), len(self.val_records))

    # ---------------------------------------------------------------- datasets
    def _reference_box(self) -> ObjectBox | None:
        return ObjectBox(self.min_box_fraction) if self.reference == "object" else None

    def source_fingerprint(self) -> dict[str, Any]:
        self.setup()
        stamps = []
        for name in (self.captions_name, self.boxes_name):
            if name and self._path(name).is_file():
                st = self._path(name).stat()
                stamps.append([str(self._path(name)), st.st_size, int(st.st_mtime)])
        return {
            "dataset": self.name,
            "root": str(self.root.resolve()),
            "files": stamps,
            "train": len(self.train_records),
            "val": len(self.val_records),
            "seed": self.seed,
            "reference": [self.reference, self.reference_resolution, self.min_box_fraction],
        }
