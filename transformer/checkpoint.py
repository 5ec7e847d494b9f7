"""The checkpoint file: self-describing, written atomically, read with
weights_only=True and checked before use; which weights it holds and whether two
checkpoints mean the same model. Loading a model for decoding is
``transformer.inference``'s."""

from __future__ import annotations

import logging
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transformer import safe_checkpoint
from transformer.config import (
    Config,
    ConfigError,
    ModelConfig,
    config_from_dict,
    migrate,
)
from transformer.files import atomic_write
from transformer.safe_checkpoint import SUFFIX, SafeCheckpointError, is_safetensors
from transformer.state_dicts import cast_weights, non_finite_weights

log = logging.getLogger(__name__)

# 2: training.lr is the peak rate for every schedule (1: noam's lr was a factor)
FORMAT_VERSION = 2


_RUN_FILES = ("best.pt", "last.pt")  # what a run folder holds, for hints


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the configuration."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through ``atomic_write`` (temporary file, fsync, rename): a kill
    at any moment leaves either the old file or the new one, never half of one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def saved_size(obj: Any) -> int:
    """About the bytes ``torch.save(obj)`` writes, from above: each tensor
    storage once, 512 bytes a storage for its zip record and pickled reference
    (about 300 are used), and 64 KiB for the rest of the structure."""
    storages: dict[tuple[int, str], int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[(storage.data_ptr(), str(item.device))] = storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sum(storages.values()) + 512 * len(storages) + (64 << 10)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every random state a training step of this process can touch, in
    weights_only-safe types; on CUDA, the generator of this process's ``device``."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if device is not None and device.type == "cuda" and isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda, device)


def _check_archive(path: Path) -> None:
    """torch.save writes a zip archive with a CRC-32 per record, which torch.load
    does not check: a damaged byte would load as a wrong weight. Reading each
    record checks it (records written without a CRC, as 0, are skipped). A file
    that starts as a zip archive but has no end (a copy or a write cut short) is
    called truncated; one that is no zip archive at all (older torch formats) is
    left to torch.load."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise CheckpointError(
                    f"{path}: truncated (the archive has no end); copy or write "
                    "the file again"
                )
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:  # torch.serialization.set_crc32_options(False)
                    continue
                with archive.open(info) as record:
                    while record.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(
            f"{path}: damaged ({e}); copy or write the file again"
        ) from None


def _check_layout(ckpt: Any, path: Path) -> None:
    """The keys and types every checkpoint of this toolkit has, and a format this
    version reads: a file that passes is safe to index without a traceback."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path}: not a checkpoint of this toolkit (it holds a "
            f"{type(ckpt).__name__}, not a dict)"
        )
    missing = [k for k in ("model", "config", "tokenizer") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: not a checkpoint of this toolkit (no {', '.join(missing)})"
        )
    version = ckpt.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: not a checkpoint format ({version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by a newer version of this toolkit (format {version}; "
            f"this one reads formats up to {FORMAT_VERSION}): upgrade to read it"
        )
    for key in ("model", "ema"):
        state = ckpt.get(key, {})
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise CheckpointError(f"{path}: its {key!r} entry is not a state dict")
    for key in ("config", "tokenizer"):
        if not isinstance(ckpt[key], dict):
            raise CheckpointError(
                f"{path}: its {key!r} entry is a {type(ckpt[key]).__name__}, not a dict"
            )


def _load_failure(path: Path, e: Exception) -> str:
    """Why torch.load refused a file, without torch's advice to load it unsafely."""
    text = str(e)
    blocked = re.search(r"unsupported GLOBAL (\S+)", text)
    if isinstance(e, pickle.UnpicklingError) and blocked:
        return (
            f"it holds a Python object ({blocked.group(1)}) that a safe load "
            "refuses: only tensors and plain containers are read"
        )
    if not zipfile.is_zipfile(path):
        return "not a file written by torch.save"
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint safely (no code can run) and check that it is one of ours:
    a ``.pt`` file (``torch.load(weights_only=True)``), a safetensors file, or a
    transformers MarianMT folder or Hub name, converted (``transformer.hf``)."""
    path = Path(path)
    marian = _marian_folder(path)
    if marian is not None:
        ckpt = _read_marian(marian, path)
        _check_layout(ckpt, path)
        return ckpt
    if path.is_dir():
        hint = next(
            (f"; did you mean {path / n}?" for n in _RUN_FILES if (path / n).is_file()),
            "",
        )
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        moved = path.with_suffix(SUFFIX)
        if path.suffix == ".pt" and moved.is_file():
            raise CheckpointError(
                f"{path}: checkpoint not found; did you mean {moved}? (the "
                "published models are safetensors files now)"
            )
        raise CheckpointError(f"{path}: checkpoint not found")
    if is_safetensors(path):
        try:
            ckpt = safe_checkpoint.load(path, map_location)
        except SafeCheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        _check_layout(ckpt, path)
        return ckpt
    _check_archive(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        why = _load_failure(path, e)
        raise CheckpointError(
            f"{path}: not a readable checkpoint of this toolkit ({why})"
        ) from e
    _check_layout(ckpt, path)
    return ckpt


def _marian_folder(path: Path) -> Path | None:
    """The transformers model folder ``path`` names (a Hub name: downloaded into
    the Hub's cache), or None when it names none."""
    from transformer.hf.importing import (
        download,
        is_model_folder,
        looks_like_hub_name,
    )
    from transformer.hf.marian import MarianError

    if is_model_folder(path):
        return path
    if path.exists() or not looks_like_hub_name(str(path)):
        return None
    try:
        return download(str(path))
    except MarianError as e:
        raise CheckpointError(str(e)) from None


def _read_marian(folder: Path, named: Path) -> dict:
    from transformer.hf.importing import read_marian
    from transformer.hf.marian import MarianError

    try:
        return {"format": FORMAT_VERSION, **read_marian(folder, str(named))}
    except MarianError as e:
        raise CheckpointError(str(e)) from None


def save_weights_file(ckpt: dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint without training state: a ``.safetensors`` file (no
    pickle; ``transformer.safe_checkpoint``) or, under any other name, with
    ``torch.save``."""
    if Path(path).suffix == SUFFIX:
        try:
            safe_checkpoint.save(ckpt, path)
        except SafeCheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    else:
        atomic_save(ckpt, path)


def checkpoint_config(ckpt: dict, path: str | Path = "checkpoint") -> Config:
    """The resolved config stored in a checkpoint, in today's meaning of its keys."""
    try:
        cfg = config_from_dict(migrate(ckpt["config"]), across_sections=False)
    except (ConfigError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: stored config is invalid: {e}") from e
    t = cfg.training
    if ckpt.get("format", 1) < 2 and t.schedule == "noam":
        # format 1 stored noam's lr as a factor of d_model^-0.5 * warmup^-0.5
        t.lr *= cfg.model.d_model**-0.5 * max(t.warmup_steps, 1) ** -0.5
    return cfg


# may change between a checkpoint and a resumed or fine-tuned run
_NOT_ARCHITECTURE = {"dropout", "attention_dropout", "gumbel_temperature"}


def architecture_diffs(a: ModelConfig, b: ModelConfig) -> list[str]:
    """The architecture fields on which two model configs differ (only ``arch``
    when their architectures do)."""
    if a.arch != b.arch:
        return ["arch"]
    return [
        name
        for name, value in vars(b).items()
        if getattr(a, name) != value and name not in _NOT_ARCHITECTURE
    ]


def check_compatible(saved: ModelConfig, wanted: ModelConfig, path: str | Path) -> None:
    """Name every architecture field on which a checkpoint differs from the config."""
    diffs = [
        f"model.{name}: checkpoint {getattr(saved, name)!r}, config "
        f"{getattr(wanted, name)!r}"
        for name in architecture_diffs(saved, wanted)
    ]
    if diffs:
        raise CheckpointError(
            f"{path} was trained with another architecture:\n  " + "\n  ".join(diffs)
        )


WEIGHTS = ("raw", "ema")  # the trained weights, or their moving average


def model_weights(
    ckpt: dict, path: str | Path, weights: str = "raw", use_raw: str = "--weights raw"
) -> dict[str, torch.Tensor]:
    """The checkpoint's ``raw`` weights or their ``ema`` (``training.ema_decay``),
    floating-point tensors in float32 (a published file may hold float16)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS} (got {weights!r})")
    if weights == "ema" and "ema" not in ckpt:
        raise CheckpointError(
            f"{path}: holds no EMA weights ({_why_no_ema(ckpt)}); use {use_raw}"
        )
    state = ckpt["ema" if weights == "ema" else "model"]
    bad = non_finite_weights(state)
    if bad:  # a run that diverged, or weights damaged before they were saved
        raise CheckpointError(
            f"{path}: {len(bad)} {weights} weight tensor(s) hold NaN or inf (first: "
            f"{bad[0]}): the file is damaged, or the run had diverged"
        )
    return cast_weights(state, torch.float32)


def _why_no_ema(ckpt: dict) -> str:
    """Why a checkpoint without an ``ema`` entry has none, for the error."""
    if ckpt.get("weights") == "ema":
        return "its weights already are the EMA (written with --weights ema)"
    if "averaged_from" in ckpt:
        if ckpt.get("weights_only"):
            return "written by transformer-average with --weights-only"
        return (
            "written by transformer-average, which keeps them only when every "
            "input holds them and --weights-only is not given"
        )
    training = ckpt["config"].get("training")
    decay = training.get("ema_decay", 0) if isinstance(training, dict) else 0
    return f"trained with training.ema_decay: {decay}"


def same_tokenizer(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Do two stored tokenizers hold the same SentencePiece model bytes?"""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def repeated_paths(paths: list[str | Path]) -> list[str | Path]:
    """The paths naming a file an earlier path already named."""
    seen: set[Path] = set()
    repeats = []
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            repeats.append(path)
        seen.add(resolved)
    return repeats
