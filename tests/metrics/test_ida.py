"""IDA: real dlib weights on real photos; the insightface code path on small ONNX models exported here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from xa_lightning.errors import UserError
from xa_lightning.metrics.ida import IdentityAlignment, InsightFaceEmbedder, build_face_embedder

from .conftest import photo


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)


def _score(metric: IdentityAlignment, generated: np.ndarray, reference: np.ndarray) -> float:
    return float(metric.score(_tensor(generated), references=_tensor(reference))[0][0])


@pytest.fixture(scope="module")
def dlib_metric() -> IdentityAlignment:
    return IdentityAlignment(build_face_embedder("dlib"))


def test_dlib_same_person_scores_far_above_different_people(dlib_metric):
    astronaut, hopper = photo("astronaut"), photo("grace_hopper")
    same = [
        _score(dlib_metric, astronaut[:, ::-1], astronaut),  # flipped
        _score(dlib_metric, astronaut[20:400, 60:440], astronaut),  # re-cropped
        _score(dlib_metric, hopper[:, ::-1], hopper),
        _score(dlib_metric, hopper[50:450, 30:480], hopper),
    ]
    different = [
        _score(dlib_metric, hopper, astronaut),
        _score(dlib_metric, hopper[:, ::-1], astronaut[20:400, 60:440]),
    ]
    # dlib descriptors are not centred: different people still reach ~0.88 cosine (docs/evaluation.md).
    assert min(same) > 0.97
    assert max(different) < 0.93
    assert min(same) - max(different) > 0.06


class _CountingEmbedder:
    """The real embedder, counting the images it embeds."""

    def __init__(self, embedder) -> None:
        self.embedder, self.calls = embedder, 0

    def embed(self, image: np.ndarray):
        self.calls += 1
        return self.embedder.embed(image)


def test_no_face_is_counted_not_a_crash(dlib_metric):
    astronaut, coffee = photo("astronaut"), np.zeros((512, 512, 3), dtype=np.uint8)
    coffee[:400] = photo("coffee")[:, :512]  # a photo without a face, padded to the astronaut's size
    zero = IdentityAlignment(dlib_metric.embedder)  # the default: what paper numbers use
    skip = IdentityAlignment(dlib_metric.embedder, missing_face="skip")
    generated = torch.cat([_tensor(astronaut[:, ::-1]), _tensor(coffee)])
    references = torch.cat([_tensor(astronaut), _tensor(astronaut)])
    for metric in (skip, zero):
        metric.update(generated, references=references)
    rates = {"face_detection_rate": 0.5, "reference_face_rate": 1.0}
    assert skip.results() == {"ida": float(skip.compute()), **rates}
    assert float(skip.compute()) > 0.97  # over the one pair with faces
    assert float(zero.compute()) == pytest.approx(float(skip.compute()) / 2)  # the missing face scores 0
    assert zero.results()["ida"] == pytest.approx(float(zero.compute()))
    # per image: the lost face is 0 under "zero" (the mean of the per-image values is IDA), not counted under "skip"
    assert zero.last_scores["ida"].tolist() == [pytest.approx(float(skip.compute())), 0.0]
    assert math.isnan(skip.last_scores["ida"][1]) and skip.last_scores["face_detected"].tolist() == [1.0, 0.0]
    nothing = IdentityAlignment(dlib_metric.embedder)
    nothing.update(_tensor(coffee), references=_tensor(coffee))  # no reference face: never counted
    assert math.isnan(float(nothing.compute())) and nothing.results()["face_detection_rate"] == 0.0


def test_each_reference_is_embedded_once(dlib_metric):
    hopper = photo("grace_hopper")[:400, 50:450]
    counting = _CountingEmbedder(dlib_metric.embedder)
    metric = IdentityAlignment(counting)
    references = _tensor(hopper).repeat(4, 1, 1, 1)  # one reference, 4 generations, 2 batches
    generated = torch.cat([_tensor(hopper[:, ::-1])] * 4)
    metric.update(generated[:2], references=references[:2])
    metric.update(generated[2:], references=references[2:])
    assert counting.calls == 4 + 1
    assert float(metric.compute()) > 0.97


# ---------------------------------------------------------------------------------------------- insightface
class _BrightnessDetector(torch.nn.Module):
    """SCRFD-shaped detector (3 strides x 2 anchors, boxes + 5 keypoints): every anchor scores
    sigmoid(20 * mean brightness), so bright images have a face and dark ones none."""

    def __init__(self) -> None:
        super().__init__()
        # distances in stride units: a box and a plausible 5-point face layout around each anchor
        self.register_buffer("box", torch.full((1, 4), 3.0))
        self.register_buffer("kps", torch.tensor([[-1.2, -0.8, 1.2, -0.8, 0.0, 0.3, -0.9, 1.4, 0.9, 1.4]]))

    def forward(self, image: torch.Tensor):  # (1, 3, 128, 128), already (x - 127.5) / 128
        score = torch.sigmoid(20 * image.mean()).reshape(1, 1)
        scores, boxes, points = [], [], []
        for stride in (8, 16, 32):
            anchors = (128 // stride) ** 2 * 2
            scores.append(score.expand(anchors, 1))
            boxes.append(self.box.expand(anchors, 4) * (8 / stride))
            points.append(self.kps.expand(anchors, 10) * (8 / stride))
        return (*scores, *boxes, *points)


class _TinyRecognizer(torch.nn.Module):
    """ArcFace-shaped (112 x 112 -> 512) random convolutional embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 7, stride=4)
        self.head = torch.nn.Linear(8 * 27 * 27, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def insightface_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faces") / "tiny_antelope"
    folder.mkdir()
    names = [f"score_{s}" for s in (8, 16, 32)] + [f"bbox_{s}" for s in (8, 16, 32)] + [f"kps_{s}" for s in (8, 16, 32)]
    torch.onnx.export(
        _BrightnessDetector(),
        (torch.zeros(1, 3, 128, 128),),
        str(folder / "det_tiny.onnx"),
        input_names=["input.1"],
        output_names=names,
        dynamo=False,
    )
    torch.onnx.export(
        _TinyRecognizer().eval(),
        (torch.zeros(1, 3, 112, 112),),
        str(folder / "w600k_tiny.onnx"),
        input_names=["input.1"],
        output_names=["embedding"],
        dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
        dynamo=False,
    )
    return folder


def test_insightface_backend_runs_the_faceanalysis_path(insightface_dir):
    metric = IdentityAlignment(InsightFaceEmbedder(insightface_dir, det_size=128), missing_face="skip")
    rng = np.random.default_rng(0)
    bright = rng.integers(140, 256, (160, 160, 3), dtype=np.uint8)
    other = rng.integers(140, 256, (160, 160, 3), dtype=np.uint8)
    dark = np.zeros((160, 160, 3), dtype=np.uint8)
    assert _score(metric, bright, bright) == pytest.approx(1.0, abs=1e-6)  # same face crop, same embedding
    assert _score(metric, other, bright) < 0.999
    scores, found_generated, found_reference = metric.score(_tensor(dark), references=_tensor(bright))
    assert math.isnan(float(scores[0])) and not bool(found_generated[0]) and bool(found_reference[0])


def test_insightface_nested_antelopev2_folder_and_missing_dir(insightface_dir, tmp_path):
    nested_parent = insightface_dir.parent  # holds only the folder with the .onnx files, like antelopev2.zip
    embedder = build_face_embedder("insightface", nested_parent, det_size=128)
    assert embedder.embed(np.full((128, 128, 3), 200, dtype=np.uint8)).shape == (512,)
    with pytest.raises(UserError, match="eval.ida.model_dir"):
        InsightFaceEmbedder(tmp_path / "antelopev2")
    with pytest.raises(UserError, match="choose one of"):
        build_face_embedder("facenet")


def test_insightface_runs_on_the_ranks_gpu():
    """Each DDP rank's face models go to its own GPU (device_id), CPU as fallback; CPU-only stays on the CPU."""
    from xa_lightning.metrics.weights import onnx_providers

    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(torch.device("cuda", 3), both) == (both, [{"device_id": 3}, {}], 3)
    assert onnx_providers("cuda:1", both)[1] == [{"device_id": 1}, {}]
    assert onnx_providers("cpu", both) == (["CPUExecutionProvider"], [{}], -1)
    assert onnx_providers("cuda:2", ["CPUExecutionProvider"]) == (["CPUExecutionProvider"], [{}], -1)


def test_ida_metric_builds_its_embedder_for_the_metrics_device(insightface_dir):
    import onnxruntime

    from xa_lightning.metrics.base import MetricContext
    from xa_lightning.metrics.config import EvaluationConfig
    from xa_lightning.metrics.weights import onnx_providers

    cfg = EvaluationConfig.coerce(
        {"metrics": ["ida"], "ida": {"backend": "insightface", "model_dir": str(insightface_dir), "det_size": 128}}
    )
    device = torch.device("cuda", 1)  # no GPU here: the providers this machine offers for that device
    metric = IdentityAlignment.from_config(cfg, MetricContext("method", device))
    expected = onnx_providers(device, onnxruntime.get_available_providers())
    assert (metric.embedder.providers, metric.embedder.provider_options) == expected[:2]
    assert metric.missing_face == "zero"


def test_ida_cli_pairs_folders_and_prints_json(tmp_path, capsys):
    from PIL import Image

    from xa_lightning.metrics.cli import main

    generated, reference = tmp_path / "generated", tmp_path / "reference"
    generated.mkdir()
    reference.mkdir()
    astronaut = photo("astronaut")
    Image.fromarray(astronaut).save(reference / "a.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(generated / "a_0.png")
    Image.fromarray(photo("coffee")).save(generated / "a_1.png")  # 2 generations for 1 reference
    assert main(["ida", "--generated", str(generated), "--reference", str(reference)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_pairs"] == 2 and result["face_detection_rate"] == 0.5
    assert 0.97 / 2 < result["ida"] <= 0.5  # the lost face counts 0 by default
    assert main(["ida", "--generated", str(generated), "--reference", str(reference), "--missing-face", "skip"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ida"] > 0.97
