"""Checkpoint files that are written atomically and read without executing code (``xa_lightning.weights``)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from xa_lightning.errors import UserError
from xa_lightning.weights import read_object

log = logging.getLogger(__name__)

TEMP_PATTERN = re.compile(r"^\..+\.tmp-(\d+)$")  # .<name>.tmp-<pid>, what atomic_torch_save writes first
FREE_SPACE_MARGIN = 1.1  # a checkpoint needs about its tensors' bytes; keep 10 % (+ 16 MiB) to spare
FREE_SPACE_EXTRA = 16 * 2**20


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (the new name survives a power loss, not only the data)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, rename over it, fsync the directory.

    A kill at any moment leaves either the previous file or the new one, never a torn file; a temporary
    file a kill leaves behind is removed by :func:`remove_stale_temp_files` at the next start.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of saves that a kill interrupted (their process is gone); returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        match = TEMP_PATTERN.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        log.info("removed %d temporary file(s) of interrupted checkpoint saves in %s", len(removed), directory)
    return removed


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside a (nested) checkpoint dict: about the size of the file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def check_free_space(path: Path, needed: int) -> None:
    """Fail before writing when the checkpoint cannot fit: the previous checkpoint stays as it is."""
    free = shutil.disk_usage(path.parent).free
    wanted = int(needed * FREE_SPACE_MARGIN) + FREE_SPACE_EXTRA
    if free < wanted:
        kept = f"the previous {path.name} is kept" if path.exists() else "no checkpoint was written"
        raise UserError(
            f"not enough free space in {path.parent} to save {path.name} (needs about {wanted / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free); {kept}; free some space or set callbacks.model_checkpoint.dirpath=..."
        )


def unreadable_reason(path: str | os.PathLike) -> str | None:
    """Why a checkpoint file cannot be used (cut short, not a checkpoint), without loading it; None if fine."""
    try:  # torch.save writes a zip archive whose directory is at the end: a cut file has none
        with zipfile.ZipFile(path):
            pass
    except zipfile.BadZipFile:
        return "cut short or not a checkpoint"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint read through the one safe weight reader (``weights_only``: no pickled code runs)."""
    return read_object(
        path, "checkpoint", fix="pass an existing .ckpt (or ckpt_path=last to resume)", map_location=map_location
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: a free-space check, atomic writes (temp file + rename + directory fsync),
    temporary files of interrupted saves removed, and ``weights_only`` reads."""

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[Path] = set()

    def _clean_once(self, directory: Path) -> None:
        if directory not in self._cleaned:
            self._cleaned.add(directory)
            remove_stale_temp_files(directory)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._clean_once(path.parent)
        check_free_space(path, tensor_bytes(checkpoint))
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        self._clean_once(Path(path).parent)
        return safe_torch_load(path, map_location=map_location or "cpu")
