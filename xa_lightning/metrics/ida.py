"""Identity alignment (IDA): cosine similarity of face embeddings, reference vs generated image.

Backends:

* ``insightface`` - the A4A paper's: a FaceAnalysis model folder such as ``antelopev2`` (SCRFD
  detector + ArcFace recognition ONNX files) given as ``model_dir``; nothing is downloaded. On a CUDA
  device it runs on that GPU (the rank's, under DDP).
* ``dlib`` - works offline from PyPI: ``dlib-bin`` plus the weights in ``face-recognition-models``
  (HOG or CNN face detector, 5-point landmarks, the ResNet 128-d face descriptor). Its embeddings are
  not centred, so two different people already score ~0.85-0.9 cosine; compare dlib IDA values with
  each other, not with the paper's insightface numbers.

A missing face never crashes: per image the metric records whether a face was found in the
generated and in the reference image, logs ``face_detection_rate`` beside IDA, and either counts a
generated image without a face as similarity 0 (``missing_face="zero"``, what paper numbers use: a
method that loses faces is not rewarded) or skips the pair (``"skip"``, IDA over pairs with both
faces). A reference without a face is never counted: it cannot measure identity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xa_lightning.errors import UserError
from xa_lightning.metrics.base import REFERENCES, EvaluationMetric, MetricContext, ReferenceCache, require
from xa_lightning.metrics.images import check_uint8_images, to_numpy_nhwc
from xa_lightning.metrics.weights import dlib_model_files, insightface_model_dir, onnx_providers

BACKENDS = ("dlib", "insightface")
MISSING_FACE = ("zero", "skip")


class FaceEmbedder:
    """Detects the largest face of an RGB uint8 ``(H, W, 3)`` image and returns its embedding (or None)."""

    name = "base"

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError


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
        if detector not in ("hog", "cnn"):
            raise UserError(f"eval.ida.detector={detector!r}: choose hog or cnn")
        files = dlib_model_files(model_dir, detector)
        if detector == "hog":
            self._detector = dlib.get_frontal_face_detector()
        else:
            cnn = dlib.cnn_face_detection_model_v1(str(files["cnn_detector"]))
            self._detector = lambda image, upsample: [d.rect for d in cnn(image, upsample)]
        self._landmarks = dlib.shape_predictor(str(files["landmarks"]))
        self._recognition = dlib.face_recognition_model_v1(str(files["recognition"]))
        self._dlib, self.upsample, self.chip_size, self.padding = dlib, upsample, chip_size, padding

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        faces = list(self._detector(image, self.upsample))
        if not faces:
            return None
        largest = max(faces, key=lambda rect: rect.area())
        shape = self._landmarks(image, largest)
        chip = self._dlib.get_face_chip(image, shape, size=self.chip_size, padding=self.padding)
        return np.asarray(self._recognition.compute_face_descriptor(chip), dtype=np.float64)


class InsightFaceEmbedder(FaceEmbedder):
    """insightface FaceAnalysis from a local model folder (antelopev2 as in the A4A paper) on ``device``."""

    name = "insightface"

    def __init__(
        self,
        model_dir: str | os.PathLike | None,
        det_size: int = 640,
        det_thresh: float = 0.5,
        device: str | torch.device = "cpu",
    ) -> None:
        folder = insightface_model_dir(model_dir)
        try:
            import onnxruntime
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise UserError("eval.ida.backend=insightface needs `pip install insightface onnxruntime`") from exc
        self.providers, self.provider_options, ctx_id = onnx_providers(device, onnxruntime.get_available_providers())
        try:
            self._app = FaceAnalysis(
                name=str(folder),
                allowed_modules=["detection", "recognition"],
                providers=self.providers,
                provider_options=self.provider_options,
            )
        except AssertionError as exc:
            raise UserError(f"eval.ida.model_dir: {folder} has no face detection model (SCRFD .onnx)") from exc
        if "recognition" not in self._app.models:
            raise UserError(f"eval.ida.model_dir: {folder} has no face recognition model (ArcFace .onnx)")
        self._app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=(det_size, det_size))

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        faces = self._app.get(np.ascontiguousarray(image[:, :, ::-1]))  # insightface takes BGR
        if not faces:
            return None
        largest = max(faces, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
        return np.asarray(largest.embedding, dtype=np.float64)


_EMBEDDERS: dict[tuple, FaceEmbedder] = {}


def build_face_embedder(
    backend: str = "dlib",
    model_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> FaceEmbedder:
    """A process-wide shared embedder per backend, options and (insightface) device."""
    if backend not in BACKENDS:
        raise UserError(f"eval.ida.backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "insightface":
        kwargs["device"] = torch.device(device)
    key = (backend, str(model_dir), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    if key not in _EMBEDDERS:
        cls = DlibFaceEmbedder if backend == "dlib" else InsightFaceEmbedder
        _EMBEDDERS[key] = cls(model_dir, **kwargs)
    return _EMBEDDERS[key]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


class IdentityAlignment(EvaluationMetric):
    """IDA: mean cosine similarity between the face embeddings of each reference and its generated image.

    ``update(images, references=references)`` with uint8 ``(B, 3, H, W)`` each. ``compute()`` is IDA (NaN
    when no pair counts); :meth:`results` adds ``face_detection_rate`` (generated images with a face)
    and ``reference_face_rate``. Per image (``last_scores``): ``ida`` (0 for a lost face under
    ``missing_face="zero"``, NaN when not counted) and ``face_detected``.
    """

    name = "ida"
    higher_is_better = True
    needs = frozenset({REFERENCES})

    def __init__(
        self,
        embedder: FaceEmbedder | None = None,
        backend: str = "dlib",
        model_dir: str | os.PathLike | None = None,
        missing_face: str = "zero",
        reference_cache_size: int = 4096,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if missing_face not in MISSING_FACE:
            raise UserError(f"eval.ida.missing_face={missing_face!r}: choose zero or skip")
        embedder = embedder if embedder is not None else build_face_embedder(backend, model_dir)
        self.__dict__["embedder"] = embedder
        self.missing_face = missing_face
        # References repeat (A4A: 100 references x 4 generations): embed each once.
        self._reference_embeddings = ReferenceCache(
            lambda batch: [embedder.embed(image) for image in to_numpy_nhwc(batch)], reference_cache_size
        )
        self.add_state("similarity_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pairs", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("generated_faces", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("reference_faces", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @classmethod
    def _embedder(cls, cfg: Any, device: torch.device) -> FaceEmbedder:
        return build_face_embedder(cfg.ida.backend, cfg.ida.model_dir, device, **cfg.ida.embedder_kwargs())

    @classmethod
    def prepare(cls, cfg: Any, device: torch.device) -> None:
        cls._embedder(cfg, device)  # loads the models (shared with the evaluation) or fails with a UserError

    @classmethod
    def from_config(cls, cfg: Any, context: MetricContext) -> IdentityAlignment:
        return cls(cls._embedder(cfg, context.device), missing_face=cfg.ida.missing_face)

    @property
    def embedder(self) -> FaceEmbedder:
        return self.__dict__["embedder"]

    def score(
        self, images: Tensor, prompts: Sequence[str] | None = None, references: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per image: (similarity as counted, face found in generated, face found in reference); no state change."""
        references = require(references, "references", self.name)
        check_uint8_images(images)
        check_uint8_images(references, "references")
        if references.shape[0] != images.shape[0]:
            raise ValueError(f"{references.shape[0]} references for {images.shape[0]} images")
        reference_embeddings = self._reference_embeddings(references)
        scores, found_generated, found_reference = [], [], []
        for image, reference_embedding in zip(to_numpy_nhwc(images), reference_embeddings):
            generated_embedding = self.embedder.embed(image)
            found_generated.append(generated_embedding is not None)
            found_reference.append(reference_embedding is not None)
            if generated_embedding is not None and reference_embedding is not None:
                scores.append(cosine(generated_embedding, reference_embedding))
            elif reference_embedding is not None and self.missing_face == "zero":
                scores.append(0.0)  # the generated image lost the face
            else:
                scores.append(float("nan"))
        return torch.tensor(scores, dtype=torch.float64), torch.tensor(found_generated), torch.tensor(found_reference)

    def update(self, images: Tensor, prompts: Sequence[str] | None = None, references: Tensor | None = None) -> None:
        scores, found_generated, found_reference = self.score(images, prompts, references)
        counted = ~torch.isnan(scores)
        self.similarity_sum = self.similarity_sum + scores[counted].sum().to(self.device)
        self.pairs = self.pairs + int(counted.sum())
        self.generated_faces = self.generated_faces + int(found_generated.sum())
        self.reference_faces = self.reference_faces + int(found_reference.sum())
        self.total = self.total + scores.numel()
        self.last_scores = {"ida": scores, "face_detected": found_generated.double()}

    def compute(self) -> Tensor:
        if int(self.pairs) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.similarity_sum / self.pairs

    def results(self) -> dict[str, float]:
        """IDA and the detection rates (synced across ranks)."""
        ida = float(self.compute())
        with self.sync_context(should_sync=self._to_sync, should_unsync=True):
            total = max(int(self.total), 1)
            return {
                self.log_name: ida,
                "face_detection_rate": int(self.generated_faces) / total,
                "reference_face_rate": int(self.reference_faces) / total,
            }
