"""xa-data caption: BLIP-2 from a saved directory, batched = one by one, resumable, broken files skipped."""

from __future__ import annotations

import json

import pytest

from tests.data.helpers import save_tiny_blip2, smooth_image
from xa_lightning.data.captioning import Blip2Captioner, load_blip2
from xa_lightning.data.cli import main


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    return save_tiny_blip2(tmp_path_factory.mktemp("blip2"))


def read(out):
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_caption_folder_batched_resumable(blip2_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        smooth_image(i, (40 + 8 * i, 36)).save(images / f"img{i}.jpg")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "captions.jsonl"
    argv = [
        "caption",
        str(images),
        "--out",
        str(out),
        "--model",
        str(blip2_dir),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--no-progress",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["captioned"] == 5 and report["counts"] == {"skipped_corrupt_image": 1}
    lines = read(out)
    assert [e["file"] for e in lines] == [f"img{i}.jpg" for i in range(5)]
    assert all(isinstance(e["caption"], str) and e["caption"].strip() for e in lines)
    # batching changes nothing: each caption equals the model's caption of that image alone
    processor, model = load_blip2(str(blip2_dir))
    single = Blip2Captioner(processor, model, max_new_tokens=6)
    from PIL import Image

    for entry in lines[:3]:
        assert single([Image.open(images / entry["file"]).convert("RGB")]) == [entry["caption"]]

    # resumable: a second run does nothing; a new image and an interrupted last line are redone
    before = out.read_bytes()
    assert main(argv) == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["captioned"] == 0
    assert out.read_bytes() == before
    smooth_image(9).save(images / "img9.jpg")
    lines[4:] = []  # img4's line was being written when the run was killed
    out.write_bytes(b"".join((json.dumps(e) + "\n").encode() for e in lines) + b'{"file": "img4.jpg", "capt')
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["captioned"] == 2
    assert sorted(e["file"] for e in read(out)) == [f"img{i}.jpg" for i in (0, 1, 2, 3, 4, 9)]


def test_caption_model_errors_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "images").mkdir()
    smooth_image(0).save(tmp_path / "images" / "a.jpg")
    out = tmp_path / "c.jsonl"
    assert main(["caption", str(tmp_path / "images"), "--out", str(out), "--model", str(tmp_path / "nope")]) == 2
    assert "--model:" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["caption", str(tmp_path / "images"), "--out", str(out), "--model", "Salesforce/blip2-opt-2.7b"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot load BLIP-2 'Salesforce/blip2-opt-2.7b'" in err and len(err.strip().splitlines()) == 1
    assert main(["caption", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert not out.exists()
