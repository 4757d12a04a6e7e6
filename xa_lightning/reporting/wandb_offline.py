"""Read an offline W&B run back from its ``.wandb`` file: ``xa-tables`` takes a run's metrics from it when
there is no ``metrics.json``, and the tests check with it that offline mode loses nothing.

The file is a LevelDB-style log (what ``wandb sync`` uploads): a 7-byte header (``:W&B``, magic,
version), then 32 KiB blocks of records, each with a 7-byte header (CRC32C, length, type: full /
first / middle / last fragment). Every record is a ``wandb.proto.wandb_internal_pb2.Record``.
wandb >= 0.19 no longer ships a Python reader, so this is a small one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK_SIZE = 32 * 1024
HEADER_SIZE = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (missing :W&B header)")
    records: list[bytes] = []
    position, pending = HEADER_SIZE, b""
    while position + HEADER_SIZE <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < HEADER_SIZE:  # block trailer padding
            position += left_in_block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + HEADER_SIZE])
        position += HEADER_SIZE
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            position += left_in_block - HEADER_SIZE
            continue
        chunk = data[position : position + length]
        if len(chunk) < length:  # the writer is still appending: stop at the last complete record
            break
        position += length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
            pending = b""
    return records


def _set_nested(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) if item.nested_key else [item.key]
    node = target
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = json.loads(item.value_json)


def read_offline_run(path: str | Path) -> dict[str, Any]:
    """``{"run_id", "name", "group", "tags", "config", "history": [row dicts], "summary", "step_metrics"}``
    of an offline run; ``step_metrics`` maps a ``define_metric`` name or glob to its x-axis metric.

    ``path``: the run directory (``.../wandb/offline-run-*``) or its ``.wandb`` file.
    """
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.wandb"))
        if not files:
            raise FileNotFoundError(f"no .wandb file in {path}")
        path = files[0]
    result: dict[str, Any] = {
        "run_id": None,
        "name": None,
        "group": None,
        "tags": [],
        "config": {},
        "history": [],
        "summary": {},
        "step_metrics": {},
    }
    for raw in _records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            result["run_id"] = record.run.run_id
            result["name"] = record.run.display_name or None
            result["group"] = record.run.run_group or None
            result["tags"] = list(record.run.tags)
            for item in record.run.config.update:
                _set_nested(result["config"], item)
        elif kind == "config":
            for item in record.config.update:
                _set_nested(result["config"], item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_nested(row, item)
            result["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set_nested(result["summary"], item)
        elif kind == "metric" and record.metric.step_metric:
            result["step_metrics"][record.metric.name or record.metric.glob_name] = record.metric.step_metric
    return result
