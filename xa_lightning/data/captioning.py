"""``xa-data caption``: BLIP-2 captions for a folder of images, as a captions JSONL (A4A's recipe).

The output is resumable: files already in the JSONL are skipped, each batch is appended and flushed, and
a line cut off by a crash is dropped on the next run. Images that cannot be read are counted and left
out (they are retried on the next run).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xa_lightning.data.counters import SampleCounter, SampleSkipped
from xa_lightning.data.images import DEFAULT_MAX_PIXELS, decode_caption, decode_image
from xa_lightning.data.records import iter_captions_jsonl
from xa_lightning.errors import UserError

log = logging.getLogger("xa_lightning.data")

DEFAULT_CAPTION_MODEL = "Salesforce/blip2-opt-2.7b"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class CaptionReport:
    """What one ``caption_folder`` run did."""

    captioned: int = 0
    already_done: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    out: Path | None = None


def list_images(folder: Path, recursive: bool = False) -> list[str]:
    """Image files under ``folder`` as sorted POSIX paths relative to it."""
    pattern = "**/*" if recursive else "*"
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.glob(pattern)
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def already_captioned(out: Path) -> set[str]:
    """Files in an existing captions JSONL; a partly written last line is removed from the file."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1  # drop the unfinished last line (the only thing we ever rewrite)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(data[:cut])
        os.replace(tmp, out)
        log.warning("caption: %s ended in a partial line (interrupted run); dropped it", out)
    return {line.file for line in iter_captions_jsonl(out)}


def load_blip2(
    model: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
) -> tuple[Any, Any]:
    """(processor, model) from a local directory or a hub id; offline failures are one clear UserError."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    is_dir = Path(model).expanduser().is_dir()
    source = str(Path(model).expanduser()) if is_dir else model
    if not is_dir and ("/" not in model or model.startswith((".", "/", "~"))):
        raise UserError(f"--model: {model} is neither a local directory nor a hub id (owner/name)")
    offline = bool(os.environ.get("HF_HUB_OFFLINE")) if local_files_only is None else local_files_only
    attempts = [True] if (is_dir or offline) else [True, False]
    last_error: Exception | None = None
    for local_only in attempts:
        try:
            processor = Blip2Processor.from_pretrained(source, local_files_only=local_only)
            network = Blip2ForConditionalGeneration.from_pretrained(
                source, local_files_only=local_only, dtype=dtype or torch.float32
            )
            return processor, network.to(device).eval()
        except (OSError, ValueError) as exc:
            last_error = exc
    where = "local directory" if is_dir else ("Hugging Face cache (offline)" if offline else "Hugging Face Hub")
    reason = str(last_error).splitlines()[0] if last_error else "unknown error"
    raise UserError(
        f"--model: cannot load BLIP-2 {model!r} from the {where} ({reason}); pass --model with a "
        "local directory holding a Blip2ForConditionalGeneration + Blip2Processor"
    )


class Blip2Captioner:
    """Batched BLIP-2 captioning (greedy decoding, deterministic)."""

    def __init__(self, processor: Any, model: Any, max_new_tokens: int = 30, prompt: str | None = None) -> None:
        self.processor = processor
        self.model = model
        self.max_new_tokens = int(max_new_tokens)
        self.prompt = prompt
        tokenizer = processor.tokenizer
        # tokens a caption can never contain (a random or badly tuned model may emit them)
        never = {
            tokenizer.bos_token_id,
            tokenizer.pad_token_id,
            getattr(model.config, "image_token_index", None),
            getattr(model.config, "image_token_id", None),
        }
        never.discard(None)
        never.discard(tokenizer.eos_token_id)
        self.suppress = sorted(int(t) for t in never)

    @torch.no_grad()
    def __call__(self, images: Sequence[Any]) -> list[str]:
        kwargs: dict[str, Any] = {"images": list(images), "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs)
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}
        generated = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            suppress_tokens=self.suppress or None,
        )
        if "input_ids" in inputs and generated.shape[1] > inputs["input_ids"].shape[1]:
            prompt_len = inputs["input_ids"].shape[1]
            if torch.equal(generated[:, :prompt_len], inputs["input_ids"]):
                generated = generated[:, prompt_len:]
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        return [decode_caption(t)[0] or "" for t in texts]


def caption_folder(
    folder: str | Path,
    out: str | Path,
    *,
    model: str = DEFAULT_CAPTION_MODEL,
    batch_size: int = 8,
    max_new_tokens: int = 30,
    prompt: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    recursive: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    local_files_only: bool | None = None,
    progress: bool = True,
    captioner: Blip2Captioner | None = None,
) -> CaptionReport:
    """Caption every image of ``folder`` not yet in ``out`` (JSONL: ``{"file", "caption"}``)."""
    from tqdm.auto import tqdm

    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    if not folder.is_dir():
        raise UserError(f"caption: {folder} is not a directory; pass the folder of images to caption")
    if int(batch_size) < 1:
        raise UserError(f"--batch-size={batch_size}: must be at least 1")
    files = list_images(folder, recursive)
    done = already_captioned(out)
    todo = [f for f in files if f not in done]
    report = CaptionReport(already_done=len(files) - len(todo), out=out)
    if not todo:
        log.info("caption: all %d images of %s are already in %s", len(files), folder, out)
        return report
    if captioner is None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}.get(dtype)
        if dtype is not None and torch_dtype is None:
            raise UserError(f"--dtype={dtype}: choose fp32, fp16 or bf16")
        processor, network = load_blip2(model, device, torch_dtype, local_files_only)
        captioner = Blip2Captioner(processor, network, max_new_tokens, prompt)
    counter = SampleCounter(1)
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(out, "a", encoding="utf-8") as handle,
        tqdm(total=len(todo), desc="caption", unit="img", disable=not progress) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            names, images = [], []
            for name in todo[start : start + batch_size]:
                try:
                    image, _, conversions = decode_image(folder / name, max_pixels=max_pixels)
                except SampleSkipped as exc:
                    counter.skip(exc)
                    continue
                counter.convert(conversions, detail=name)
                names.append(name)
                images.append(image)
            if images:
                for name, caption in zip(names, captioner(images)):
                    if not caption:
                        counter.add("skipped_empty_caption", detail=name)
                        continue
                    handle.write(json.dumps({"file": name, "caption": caption}, ensure_ascii=False) + "\n")
                    report.captioned += 1
                handle.flush()
            bar.update(min(batch_size, len(todo) - start))
    report.counts = counter.totals()
    return report
