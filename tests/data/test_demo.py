"""The demo datasets are written in exactly the published on-disk formats, deterministically."""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile

import pyarrow.parquet as pq
from PIL import Image

from xa_lightning.data.cli import main


def test_laion_demo_is_img2dataset_output(demo_root):
    root = demo_root / "laion"
    assert sorted(p.name for p in root.iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "00001.parquet",
        "00001.tar",
        "00001_stats.json",
    ]
    with tarfile.open(root / "00000.tar") as tar:
        names = tar.getnames()
        assert all(re.fullmatch(r"\d{9}\.(jpg|json|txt)", n) for n in names), names[:5]
        first = names[0].split(".")[0]
        meta = json.loads(tar.extractfile(f"{first}.json").read())
        caption = tar.extractfile(f"{first}.txt").read().decode()
        image = Image.open(io.BytesIO(tar.extractfile(f"{first}.jpg").read()))
    assert image.format == "JPEG" and (meta["width"], meta["height"]) == image.size
    assert meta["caption"] == caption and meta["key"] == first and meta["status"] == "success"
    for column in ("aesthetic", "pwatermark", "punsafe", "original_width", "original_height", "sha256"):
        assert column in meta
    table = pq.read_table(root / "00000.parquet").to_pylist()
    statuses = [row["status"] for row in table]
    assert statuses.count("success") == 20 and statuses.count("failed_to_download") == 2
    ok = [row for row in table if row["status"] == "success"]
    # some rows fail each filter of conf/data/laion_demo.yaml
    assert any(r["aesthetic"] < 4.5 for r in ok) and any(r["pwatermark"] > 0.8 for r in ok)
    assert any(r["punsafe"] > 0.5 for r in ok) and any(min(r["original_width"], r["original_height"]) < 64 for r in ok)
    assert len({row["caption"] for row in ok}) > 10


def test_celebamask_hq_demo_layout(demo_root):
    root = demo_root / "celebamask_hq"
    lines = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 44 and all((root / "CelebA-HQ-img" / e["file"]).is_file() for e in lines)
    image = Image.open(root / "CelebA-HQ-img" / "0.jpg")
    assert image.mode == "RGB" and image.size == (128, 128)
    assert (root / "CelebAMask-HQ-mask-anno" / "0" / "00043_skin.png").is_file()
    mapping = (root / "CelebA-HQ-to-CelebA-mapping.txt").read_text().splitlines()
    assert mapping[0].split() == ["idx", "orig_idx", "orig_file"] and len(mapping) == 45
    identities = [line.split()[1] for line in (root / "identity_CelebA.txt").read_text().splitlines()]
    assert len(set(identities)) == 22 and all(identities.count(i) == 2 for i in set(identities))


def test_openimages_demo_layout(demo_root):
    root = demo_root / "openimages"
    with open(root / "oidv6-train-annotations-bbox.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
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
    ids = {p.stem for p in (root / "train").glob("*.jpg")}
    assert len(ids) == 16 and all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    assert {r["ImageID"] for r in rows} <= ids
    assert all(
        0 <= float(r["XMin"]) < float(r["XMax"]) <= 1 and 0 <= float(r["YMin"]) < float(r["YMax"]) <= 1 for r in rows
    )
    with open(root / "oidv7-class-descriptions-boxable.csv") as handle:
        classes = dict(csv.reader(handle))
    assert classes.pop("LabelName") == "DisplayName" and {r["LabelName"] for r in rows} <= set(classes)


def test_cli_demo_is_deterministic(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["demo", "--out", str(tmp_path / name), "--only", "laion,openimages"]) == 0
    written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(written) == {"laion", "openimages"}
    for rel in ("laion/00000.tar", "laion/00001.parquet", "openimages/oidv6-train-annotations-bbox.csv"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert main(["demo", "--out", str(tmp_path / "c"), "--only", "imagenet"]) == 2
    assert "unknown dataset 'imagenet'" in capsys.readouterr().err
