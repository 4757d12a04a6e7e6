"""Identity alignment (IDA): cosine similarity of face embeddings, reference vs generated image.

Backends:

* ``insightface`` - the A4A paper's: a FaceAnalysis model folder such as ``antelopev2`` (SCRFD
  detector + ArcFace recognition ONNX files) given as ``model_dir``; nothing is downloaded.
* ``dlib`` - works offline from PyPI: ``dlib-bin`` plus the weights in ``face-recognition-models``
  (HOG or CNN face detector, 5-point landmarks, the ResNet 128-d face descriptor). Its embeddings are
  not centred, so two different people already score ~0.85-0.9 cosine; compare dlib IDA values with
  each other, not with the paper's insightface numbers.

A missing face never crashes: per image the metric records whether a face was found in the
generated and in the reference image, logs ``face_detection_rate`` beside IDA, and either skips the
pair (``missing_face="skip"``, IDA over pairs with both faces) or counts it as 0 (``"zero"``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from xa_lightning.errors import UserError
from xa_lightning.metrics.fid import _mark_updated
from xa_lightning.metrics.images import check_uint8_images, to_numpy_hwc

BACKENDS = ("dlib", "insightface")
DLIB_FILES = {
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
}


class FaceEmbedder:
    """Detects the largest face of an RGB uint8 ``(H, W, 3)`` image and returns its embedding (or None)."""

    name = "base"

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError


def face_recognition_models_dir() -> Path | None:
    """The ``models`` folder of the face-recognition-models package, located without importing it.

    (Importing it needs ``pkg_resources``, which recent setuptools no longer ship.)
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "models"
    return folder if folder.is_dir() else None


class DlibFaceEmbedder(FaceEmbedder):
    """dlib: HOG (or CNN) detector, 5-point alignment, 128-d ResNet descriptor."""

    name = "dlib"

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        detector: str = "hog",
        upsample: int = 1,
        chip_size: int = 150,
        padding: float = 0.25,
    ) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise UserError("eval.ida.backend=dlib needs dlib: `pip install dlib-bin face-recognition-models`") from exc
        folder = Path(model_dir).expanduser() if model_dir else face_recognition_models_dir()
        if folder is None:
            raise UserError(
                "eval.ida.backend=dlib: no model files; `pip install face-recognition-models` or set "
                "eval.ida.model_dir to a folder with " + ", ".join(DLIB_FILES.values())
            )
        needed = ["landmarks", "recognition"] + (["cnn_detector"] if detector == "cnn" else [])
        for key in needed:
            if not (folder / DLIB_FILES[key]).is_file():
                raise UserError(
                    f"eval.ida.model_dir: {folder / DLIB_FILES[key]} is missing; "
                    "`pip install face-recognition-models` or copy the dlib model files there"
                )
        if detector == "hog":
            self._detector = dlib.get_frontal_face_detector()
        elif detector == "cnn":
            cnn = dlib.cnn_face_detection_model_v1(str(folder / DLIB_FILES["cnn_detector"]))
            self._detector = lambda image, upsample: [d.rect for d in cnn(image, upsample)]
        else:
            raise UserError(f"eval.ida.detector={detector!r}: choose hog or cnn")
        self._landmarks = dlib.shape_predictor(str(folder / DLIB_FILES["landmarks"]))
        self._recognition = dlib.face_recognition_model_v1(str(folder / DLIB_FILES["recognition"]))
        self._dlib, self.upsample, self.chip_size, self.padding = dlib, upsample, chip_size, padding

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        faces = list(self._detector(image, self.upsample))
        if not faces:
            return None
        largest = max(faces, key=lambda rect: rect.area())
        shape = self._landmarks(image, largest)
        chip = self._dlib.get_face_chip(image, shape, size=self.chip_size, padding=self.padding)
        return np.asarray(self._recognition.compute_face_descriptor(chip), dtype=np.float64)


def _onnx_folder(model_dir: Path) -> Path:
    """antelopev2's zip unpacks to antelopev2/antelopev2/*.onnx on some systems: accept either."""
    if any(model_dir.glob("*.onnx")):
        return model_dir
    nested = [d for d in model_dir.iterdir() if d.is_dir() and any(d.glob("*.onnx"))]
    if len(nested) == 1:
        return nested[0]
    raise UserError(
        f"eval.ida.model_dir: {model_dir} has no .onnx files; unzip insightface's antelopev2 "
        "(detection + recognition ONNX) there, or use eval.ida.backend=dlib"
    )


class InsightFaceEmbedder(FaceEmbedder):
    """insightface FaceAnalysis from a local model folder (antelopev2 as in the A4A paper)."""

    name = "insightface"

    def __init__(
        self,
        model_dir: str | os.PathLike | None,
        det_size: int = 640,
        det_thresh: float = 0.5,
        providers: list[str] | None = None,
    ) -> None:
        if not model_dir:
            raise UserError(
                "eval.ida.model_dir is required for eval.ida.backend=insightface: a folder with "
                "antelopev2's ONNX files (e.g. ~/.insightface/models/antelopev2)"
            )
        folder = Path(model_dir).expanduser().resolve()
        if not folder.is_dir():
            raise UserError(
                f"eval.ida.model_dir: {folder} does not exist; download insightface's antelopev2 and "
                "unzip it there, or use eval.ida.backend=dlib"
            )
        folder = _onnx_folder(folder)
        try:
            import onnxruntime
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise UserError("eval.ida.backend=insightface needs `pip install insightface onnxruntime`") from exc
        if providers is None:
            available = onnxruntime.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self._app = FaceAnalysis(
                name=str(folder), allowed_modules=["detection", "recognition"], providers=providers
            )
        except AssertionError as exc:
            raise UserError(f"eval.ida.model_dir: {folder} has no face detection model (SCRFD .onnx)") from exc
        if "recognition" not in self._app.models:
            raise UserError(f"eval.ida.model_dir: {folder} has no face recognition model (ArcFace .onnx)")
        ctx_id = 0 if providers and providers[0] == "CUDAExecutionProvider" else -1
        self._app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=(det_size, det_size))

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        faces = self._app.get(np.ascontiguousarray(image[:, :, ::-1]))  # insightface takes BGR
        if not faces:
            return None
        largest = max(faces, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
        return np.asarray(largest.embedding, dtype=np.float64)


_EMBEDDERS: dict[tuple, FaceEmbedder] = {}


def build_face_embedder(
    backend: str = "dlib", model_dir: str | os.PathLike | None = None, **kwargs: Any
) -> FaceEmbedder:
    """A process-wide shared embedder per backend and options."""
    if backend not in BACKENDS:
        raise UserError(f"eval.ida.backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    key = (backend, str(model_dir), tuple(sorted(kwargs.items())))
    if key not in _EMBEDDERS:
        cls = DlibFaceEmbedder if backend == "dlib" else InsightFaceEmbedder
        _EMBEDDERS[key] = cls(model_dir, **kwargs)
    return _EMBEDDERS[key]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


class IdentityAlignment(Metric):
    """IDA: mean cosine similarity between the face embeddings of each reference and its generated image.

    ``update(images, references)`` with uint8 ``(B, 3, H, W)`` each. ``compute()`` is IDA;
    :meth:`extra_scalars` adds ``face_detection_rate`` (generated images with a face) and
    ``reference_face_rate``. IDA is NaN when no pair had both faces (``missing_face="skip"``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    log_name = "ida"

    def __init__(
        self,
        embedder: FaceEmbedder | None = None,
        backend: str = "dlib",
        model_dir: str | os.PathLike | None = None,
        missing_face: str = "skip",
        reference_cache_size: int = 4096,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if missing_face not in ("skip", "zero"):
            raise UserError(f"eval.ida.missing_face={missing_face!r}: choose skip or zero")
        self.__dict__["embedder"] = embedder if embedder is not None else build_face_embedder(backend, model_dir)
        self.missing_face = missing_face
        # References repeat (A4A: 100 references x 4 generations): embed each once.
        self._reference_cache: OrderedDict[bytes, np.ndarray | None] = OrderedDict()
        self._reference_cache_size = reference_cache_size
        self.add_state("similarity_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pairs", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("generated_faces", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("reference_faces", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _reference_embedding(self, image: np.ndarray) -> np.ndarray | None:
        key = hashlib.blake2b(image.tobytes(), digest_size=16).digest() + bytes(str(image.shape), "ascii")
        if key in self._reference_cache:
            self._reference_cache.move_to_end(key)
            return self._reference_cache[key]
        embedding = self.__dict__["embedder"].embed(image)
        self._reference_cache[key] = embedding
        if len(self._reference_cache) > self._reference_cache_size:
            self._reference_cache.popitem(last=False)
        return embedding

    def score(self, images: Tensor, references: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per image: (cosine or NaN, face found in generated, face found in reference); no state change."""
        check_uint8_images(images)
        check_uint8_images(references, "references")
        if references.shape[0] != images.shape[0]:
            raise ValueError(f"{references.shape[0]} references for {images.shape[0]} images")
        embedder = self.__dict__["embedder"]
        scores, found_generated, found_reference = [], [], []
        for image, reference in zip(images, references):
            reference_embedding = self._reference_embedding(to_numpy_hwc(reference))
            generated_embedding = embedder.embed(to_numpy_hwc(image))
            found_generated.append(generated_embedding is not None)
            found_reference.append(reference_embedding is not None)
            both = generated_embedding is not None and reference_embedding is not None
            scores.append(cosine(generated_embedding, reference_embedding) if both else float("nan"))
        return (torch.tensor(scores, dtype=torch.float64), torch.tensor(found_generated), torch.tensor(found_reference))

    def update(self, images: Tensor, references: Tensor) -> None:
        self.accumulate(self.score(images, references))

    def accumulate(self, scored: tuple[Tensor, Tensor, Tensor]) -> None:
        """Add the output of :meth:`score` to the state."""
        _mark_updated(self)
        scores, found_generated, found_reference = scored
        valid = ~torch.isnan(scores)
        self.similarity_sum = self.similarity_sum + scores[valid].sum().to(self.device)
        # "zero": a missing face counts as a pair with similarity 0 (when the reference had a face).
        counted = valid | (found_reference & ~found_generated) if self.missing_face == "zero" else valid
        self.pairs = self.pairs + int(counted.sum())
        self.generated_faces = self.generated_faces + int(found_generated.sum())
        self.reference_faces = self.reference_faces + int(found_reference.sum())
        self.total = self.total + scores.numel()

    def compute(self) -> Tensor:
        if int(self.pairs) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.similarity_sum / self.pairs

    def extra_scalars(self) -> dict[str, float]:
        """Detection rates logged beside IDA (synced across ranks)."""
        with self.sync_context(should_sync=self._to_sync, should_unsync=True):
            total = max(int(self.total), 1)
            return {
                "face_detection_rate": int(self.generated_faces) / total,
                "reference_face_rate": int(self.reference_faces) / total,
            }
