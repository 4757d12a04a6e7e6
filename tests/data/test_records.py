"""CelebAMask-HQ and OpenImages: identity split, references (whole, face crop, object crop), eval helpers."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from xa_lightning.data import CelebAMaskHQDataModule, OpenImagesDataModule
from xa_lightning.errors import UserError


def celeba(root, **kwargs):
    options = dict(
        root=str(root),
        identity_file="identity_CelebA.txt",
        val_identities=4,
        resolution=32,
        reference_resolution=24,
        batch_size=4,
        num_workers=0,
        log_counts=False,
    )
    options.update(kwargs)
    datamodule = CelebAMaskHQDataModule(**options)
    datamodule.setup()
    return datamodule


def identity_of(root):
    mapping = {}
    for line in (root / "CelebA-HQ-to-CelebA-mapping.txt").read_text().splitlines()[1:]:
        idx, _, orig = line.split()
        mapping[f"{idx}.jpg"] = orig
    ids = dict(line.split() for line in (root / "identity_CelebA.txt").read_text().splitlines())
    return {file: ids[orig] for file, orig in mapping.items()}


def test_celeba_split_holds_out_whole_identities(demo_root):
    root = demo_root / "celebamask_hq"
    identity = identity_of(root)
    datamodule = celeba(root)
    train = {identity[r.key] for r in datamodule.train_records}
    val = {identity[r.key] for r in datamodule.val_records}
    assert len(val) == 4 and not train & val and len(datamodule.val_records) == 8
    assert [r.key for r in celeba(root).val_records] == [r.key for r in datamodule.val_records]
    assert {identity[r.key] for r in celeba(root, seed=3).val_records} != val
    # evaluation: one reference per held-out identity first, prompts aligned with references
    prompts, references = datamodule.eval_prompts(4), datamodule.eval_references(4)
    firsts = {}
    for record in datamodule.val_records:
        firsts.setdefault(identity[record.key], record)
    assert prompts == [r.caption for r in sorted(firsts.values(), key=lambda r: int(r.key.split(".")[0]))]
    assert references.shape == (4, 3, 24, 24) and references.min() >= 0 and references.max() <= 1
    with pytest.raises(UserError, match="val_identities=40: the dataset has only 22 identities"):
        celeba(root, val_identities=40)


def test_celeba_reference_is_the_face_image_or_its_mask_crop(demo_root, tmp_path):
    batch = next(iter(celeba(demo_root / "celebamask_hq").train_dataloader()))
    assert set(batch) >= {"pixels", "reference", "caption", "key", "original_size", "crop_top_left", "target_size"}
    assert batch["reference"].shape == (4, 3, 24, 24) and batch["original_size"].tolist()[0] == [128, 128]
    # a face whose skin mask covers a bright square in a dark image: the face crop is that square
    root = tmp_path / "celeba"
    (root / "CelebA-HQ-img").mkdir(parents=True)
    (root / "CelebAMask-HQ-mask-anno" / "0").mkdir(parents=True)
    for i in range(3):
        image = np.zeros((128, 128, 3), np.uint8)
        image[40:88, 40:88] = 230
        Image.fromarray(image).save(root / "CelebA-HQ-img" / f"{i}.jpg", quality=95)
        mask = np.zeros((64, 64), np.uint8)
        mask[20:44, 20:44] = 255
        Image.fromarray(mask).save(root / "CelebAMask-HQ-mask-anno" / "0" / f"{i:05d}_skin.png")
    (root / "captions.jsonl").write_text(
        "".join(json.dumps({"file": f"{i}.jpg", "caption": f"face {i}"}) + "\n" for i in range(3))
    )
    whole = celeba(root, identity_file=None, val_identities=1, batch_size=1).eval_references(1)
    face = celeba(
        root, identity_file=None, val_identities=1, batch_size=1, reference_crop="face", face_margin=0.0
    ).eval_references(1)
    assert whole.mean() < 0.4 and face.mean() > 0.85


def test_openimages_object_reference_crops_a_usable_box(demo_root, tmp_path):
    demo = OpenImagesDataModule(
        root=str(demo_root / "openimages"),
        val_size=4,
        resolution=32,
        batch_size=4,
        num_workers=0,
        reference="object",
        reference_resolution=24,
        log_counts=False,
    )
    demo.setup()
    batch = next(iter(demo.train_dataloader()))
    assert batch["reference"].shape == (4, 3, 24, 24) and len(demo.val_records) == 4
    assert demo.class_names["/m/01yrx"] == "Cat" and all(r.boxes for r in demo.train_records)
    # red object box (usable) on the left, a larger blue group box on the right (never used)
    root = tmp_path / "oi"
    (root / "train").mkdir(parents=True)
    image = np.zeros((80, 160, 3), np.uint8)
    image[:, :80] = (220, 20, 20)
    image[:, 80:] = (20, 20, 220)
    ids = [f"{i:016x}" for i in range(3)]
    for image_id in ids:
        Image.fromarray(image).save(root / "train" / f"{image_id}.jpg", quality=95)
    with open(root / "oidv6-train-annotations-bbox.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
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
        )
        for image_id in ids:
            writer.writerow([image_id, "xclick", "/m/0cmx8", 1, 0.1, 0.4, 0.2, 0.8, 0, 0, 0, 0, 0])
            writer.writerow([image_id, "xclick", "/m/07j7r", 1, 0.5, 1.0, 0.0, 1.0, 0, 0, 1, 0, 0])
    (root / "oidv7-class-descriptions-boxable.csv").write_text("/m/0cmx8,Spoon\n/m/07j7r,Tree\n")  # v6 style
    (root / "captions.jsonl").write_text(
        "".join(json.dumps({"file": f"{i}.jpg", "caption": "a red thing"}) + "\n" for i in ids)
    )
    options = dict(
        root=str(root),
        val_size=1,
        resolution=32,
        batch_size=1,
        num_workers=0,
        reference_resolution=16,
        log_counts=False,
    )
    obj = OpenImagesDataModule(reference="object", **options)
    whole = OpenImagesDataModule(reference="image", **options)
    ref_obj, ref_whole = obj.eval_references(1)[0], whole.eval_references(1)[0]
    assert ref_obj[0].mean() > 0.8 and ref_obj[2].mean() < 0.2  # red only
    assert obj.class_names == {"/m/0cmx8": "Spoon", "/m/07j7r": "Tree"}
    assert [label for label, _ in obj.train_records[0].boxes] == ["Spoon"]  # the group box is dropped
    assert ref_whole[0].mean() < 0.8  # the centre square shows both colours
    train_batch = next(iter(obj.train_dataloader()))
    assert train_batch["reference"][0, 0].mean() > 0.8


def test_missing_roots_and_files_are_one_clear_error(tmp_path, demo_root):
    for cls in (CelebAMaskHQDataModule, OpenImagesDataModule):
        with pytest.raises(
            UserError,
            match=rf"^data\.root: {tmp_path}/absent does not exist; set data\.root=\.\.\. "
            r"or run xa-data demo$",
        ):
            cls(root=str(tmp_path / "absent")).prepare_data()
    with pytest.raises(UserError, match=r"data\.captions: .*nope\.jsonl does not exist; write it with `xa-data"):
        celeba(demo_root / "celebamask_hq", captions="nope.jsonl")
    with pytest.raises(UserError, match=r"data\.identity_file: .*ids\.txt does not exist"):
        celeba(demo_root / "celebamask_hq", identity_file="ids.txt")
    assert torch.is_tensor(celeba(demo_root / "celebamask_hq").real_images(2))
