"""A checkpoint of weights as one safetensors file: no pickle, nothing that runs
code when read. The published models (``models/*.safetensors``) are such files.

The file holds the checkpoint's flat tensor dicts (``model``, ``ema``, the
``tokenizer``'s SentencePiece bytes) as tensors named ``<entry>.<name>``, each
shared tensor once (tied embeddings), and everything else (the resolved config,
the step, what was averaged) as JSON in the header's metadata, with a SHA-256 of
the tensors: safetensors itself checks no bytes, and a damaged weight must not
load. ``load`` gives back the dict ``torch.load`` gives for a ``.pt`` file, so
``load_checkpoint`` checks and uses both alike. A training checkpoint (optimizer,
RNG) has nested state that does not fit; only files of weights are written so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from transformer.files import atomic_write
from transformer.state_dicts import retie, tied_names

SUFFIX = ".safetensors"
MARK = "transformer-nmt checkpoint"  # the metadata's "format": one of ours


class SafeCheckpointError(ValueError):
    """A safetensors checkpoint cannot be written or read."""


def is_safetensors(path: Path) -> bool:
    """Does ``path`` start as a safetensors file (an 8-byte header length, then
    the JSON header)? A ``.pt`` file is a zip archive, which starts ``PK``."""
    with open(path, "rb") as f:
        head = f.read(9)
    return (
        len(head) == 9
        and head[8:] == b"{"
        and int.from_bytes(head[:8], "little") < path.stat().st_size
    )


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _flat_entries(ckpt: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of ``ckpt``'s flat tensor dicts under ``entry.name`` (shared
    ones once), and the rest of the checkpoint with the aliases."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {}
    aliases: dict[str, dict[str, str]] = {}
    stored: set[int] = set()  # storages an earlier entry holds
    for key, value in ckpt.items():
        if isinstance(value, dict) and any(
            isinstance(v, torch.Tensor) for v in value.values()
        ):
            if not all(isinstance(v, torch.Tensor) for v in value.values()):
                raise SafeCheckpointError(
                    f"its {key!r} entry mixes tensors with other values: only a "
                    "file of weights (transformer-average --weights-only) can be "
                    "written as safetensors"
                )
            tied = tied_names(value)
            aliases[key] = tied
            mine = set()
            for name, tensor in value.items():
                if name in tied:
                    continue
                where = tensor.untyped_storage().data_ptr()
                tensor = tensor.detach().cpu().contiguous()
                if where in stored:  # shared with another entry: a copy of its own
                    tensor = tensor.clone()
                mine.add(where)
                tensors[f"{key}.{name}"] = tensor
            stored |= mine
        elif _holds_tensors(value):
            raise SafeCheckpointError(
                f"its {key!r} entry holds nested tensors (a training checkpoint's "
                "optimizer or RNG state): only a file of weights "
                "(transformer-average --weights-only) can be written as safetensors"
            )
        else:
            rest[key] = value
    return tensors, {"entries": list(aliases), "tied": aliases, "checkpoint": rest}


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(v) for v in value)
    return False


def save(ckpt: dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint of weights (``model``, ``tokenizer``, maybe ``ema``,
    and plain values) as one safetensors file, atomically."""
    from safetensors.torch import save as to_bytes

    tensors, layout = _flat_entries(ckpt)
    try:
        header = {"checkpoint": json.dumps(layout["checkpoint"])}
    except TypeError as e:
        raise SafeCheckpointError(f"a value does not fit in JSON: {e}") from None
    header["format"] = MARK
    header["entries"] = json.dumps(layout["entries"])
    header["tied"] = json.dumps(layout["tied"])
    header["sha256"] = _digest(tensors)
    data = to_bytes(tensors, header)
    atomic_write(path, lambda f: f.write(data))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict of a file ``save`` wrote (as ``torch.load`` gives a
    ``.pt``); a damaged or foreign file is a ``SafeCheckpointError``."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load as from_bytes

    path = Path(path)
    data = path.read_bytes()
    try:
        tensors = from_bytes(data)
        with safe_open(path, "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, ValueError, OSError) as e:
        raise SafeCheckpointError(f"not a readable safetensors file ({e})") from None
    if header.get("format") != MARK:
        raise SafeCheckpointError(
            "a safetensors file, but no checkpoint of this toolkit (its metadata "
            "has no transformer-nmt config); a transformers model folder is "
            "loaded by naming the folder"
        )
    if _digest(tensors) != header.get("sha256"):
        raise SafeCheckpointError(
            "damaged: its tensors do not match the SHA-256 recorded in it; copy "
            "or write the file again"
        )
    try:
        ckpt = json.loads(header["checkpoint"])
        entries, tied = json.loads(header["entries"]), json.loads(header["tied"])
    except (KeyError, ValueError) as e:
        raise SafeCheckpointError(f"its metadata is damaged ({e})") from None
    for entry in entries:
        prefix = f"{entry}."
        state = {
            name[len(prefix) :]: t.to(map_location)
            for name, t in tensors.items()
            if name.startswith(prefix)
        }
        ckpt[entry] = retie(state, tied.get(entry, {}))
    return ckpt
