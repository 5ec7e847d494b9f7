"""A transformers MarianMT folder read as a checkpoint of ours.

``load_checkpoint`` hands a folder holding a ``config.json`` (or, when no such
file or folder exists, a Hugging Face Hub name such as
``Helsinki-NLP/opus-mt-en-de``) to ``read_marian``, which returns the dict a
``.pt`` checkpoint holds: our weights (``marian.from_marian``), the tokenizer
(the folder's ``source.spm`` / ``target.spm`` over its ``vocab.json``, reordered
as the weights are) and a resolved config. So ``transformer-eval``,
``-translate``, ``-serve``, ``-export`` and ``training.init_from`` take one.

Read from the folder: ``config.json`` (the architecture and special ids),
``model.safetensors`` (or ``pytorch_model.bin``, read with
``weights_only=True``), ``tokenizer_config.json`` (languages, special pieces,
``separate_vocabs``), ``generation_config.json`` (the beam size), and, in a
folder this toolkit exported, ``export.json`` (the data and decoding sections).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from transformer.config import Config, DataConfig, DecodingConfig, TrainingConfig
from transformer.hf.marian import (
    MarianError,
    VocabularyOrder,
    check_importable,
    from_marian,
    vocabulary_order,
)
from transformer.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("source.spm", "target.spm", "vocab.json")
OPTIONAL_FILES = (
    "target_vocab.json",
    "tokenizer_config.json",
    "generation_config.json",
    "export.json",
)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NOT_HUB = (".pt", ".safetensors", ".bin", ".yaml", ".json")


def is_model_folder(path: Path) -> bool:
    """A folder in the layout of transformers' ``save_pretrained``."""
    return path.is_dir() and (path / "config.json").is_file()


def looks_like_hub_name(text: str) -> bool:
    """``owner/name``, naming no local file (and not a checkpoint file name)."""
    return bool(_HUB_NAME.match(text)) and not text.endswith(_NOT_HUB)


def download(name: str) -> Path:
    """A Hub model's files in the Hub client's cache (downloaded once): the
    configuration, the tokenizer and the weights (safetensors when there are)."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as e:
        raise MarianError(
            f"{name}: no such file or folder; reading it from the Hugging Face Hub "
            f"needs huggingface_hub ({e})"
        ) from None
    patterns = [*TOKENIZER_FILES, *OPTIONAL_FILES, "config.json"]
    try:
        folder = Path(snapshot_download(name, allow_patterns=patterns))
        try:
            hf_hub_download(name, WEIGHT_FILES[0])
        except EntryNotFoundError:
            hf_hub_download(name, WEIGHT_FILES[1])
    except Exception as e:  # offline, unknown repository, refused: one line
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MarianError(
            f"{name}: no such file or folder, and not a Hugging Face Hub model "
            f"that could be downloaded here ({why})"
        ) from None
    return folder


def _json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise MarianError(f"{path.parent}: no {path.name}")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MarianError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise MarianError(f"{path}: not a JSON object")
    return value


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MarianError(f"{path}: unreadable weights ({e})") from None
    if (folder / "model.safetensors.index.json").is_file():
        raise MarianError(f"{folder}: weights in several shards are not supported")
    raise MarianError(f"{folder}: no {' or '.join(WEIGHT_FILES)}")


def _pieces(path: Path, rows: int) -> list[str]:
    """A ``vocab.json`` (piece -> id) as pieces by id, for ``rows`` embeddings."""
    mapping = _json(path)
    pieces = sorted(mapping, key=lambda p: mapping[p])
    ids = [mapping[p] for p in pieces]
    if ids != list(range(len(pieces))) or len(pieces) != rows:
        raise MarianError(
            f"{path}: ids must be 0..{rows - 1}, one per embedding row (it has "
            f"{len(pieces)} pieces)"
        )
    return pieces


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) else value


def _order(
    pieces: list[str], config: dict, generation: dict, tok: dict, where: Path
) -> VocabularyOrder:
    unk_piece = tok.get("unk_token", "<unk>")
    if isinstance(unk_piece, dict):  # an AddedToken as saved
        unk_piece = unk_piece.get("content", "<unk>")
    if unk_piece not in pieces:
        raise MarianError(f"{where}: the unk token {unk_piece!r} is not in it")
    pad = config.get("pad_token_id", generation.get("pad_token_id"))
    eos = _first(config.get("eos_token_id", generation.get("eos_token_id")))
    start = config.get(
        "decoder_start_token_id", generation.get("decoder_start_token_id", pad)
    )
    if pad is None or eos is None or start is None:
        raise MarianError(
            f"{where.parent}: config.json names no pad_token_id / eos_token_id"
        )
    return vocabulary_order(pieces, pad, pieces.index(unk_piece), eos, start, where)


def _languages(folder: Path, tok: dict) -> tuple[str, str]:
    """The languages the tokenizer names, else those of an ``opus-mt-xx-yy``
    name, else ``src`` / ``tgt``."""
    src, tgt = tok.get("source_lang"), tok.get("target_lang")
    if isinstance(src, str) and isinstance(tgt, str) and src and tgt:
        return src, tgt
    match = re.search(r"opus-mt-([A-Za-z_]+)-([A-Za-z_]+)", str(folder))
    return (match[1], match[2]) if match else ("src", "tgt")


def _config(
    folder: Path,
    model_cfg: Any,
    tok: dict,
    generation: dict,
    record: dict,
    config: dict,
) -> Config:
    """The resolved config: our export's record where the folder has one, else
    the languages and beam size the folder names (older MarianMT folders keep
    generation settings in ``config.json``)."""
    stored = record.get("config") if isinstance(record.get("config"), dict) else {}
    if stored:
        from transformer.config import config_from_dict

        stored = {k: v for k, v in stored.items() if k in ("data", "decoding")}
        base = config_from_dict(stored, across_sections=False)
        data, decoding = base.data, base.decoding
    else:
        src, tgt = _languages(folder, tok)
        data = DataConfig(src_lang=src, tgt_lang=tgt)
        beams = generation.get("num_beams") or config.get("num_beams") or 1
        decoding = DecodingConfig(
            strategy="beam" if beams > 1 else "greedy", beam_size=max(beams, 1)
        )
    return Config(
        data=data, model=model_cfg, training=TrainingConfig(), decoding=decoding
    )


def read_marian(folder: Path, origin: str | None = None) -> dict[str, Any]:
    """The checkpoint dict of a MarianMT folder (see the module docstring),
    without its ``format`` (the caller's); ``origin``: what the user named (a
    Hub name), for the record."""
    config = _json(folder / "config.json")
    if config.get("model_type") != "marian":
        raise MarianError(
            f"{folder}: not a MarianMT model (config.json has model_type "
            f"{config.get('model_type')!r}); transformers models are imported only "
            "as MarianMT"
        )
    check_importable(config, str(folder))
    missing = [n for n in TOKENIZER_FILES if not (folder / n).is_file()]
    if missing:
        raise MarianError(f"{folder}: no {', '.join(missing)} (MarianTokenizer's)")
    tok = _json(folder / "tokenizer_config.json", required=False)
    generation = _json(folder / "generation_config.json", required=False)
    record = _json(folder / "export.json", required=False)
    weights = _weights(folder)
    shared = config.get("share_encoder_decoder_embeddings", True)
    src_rows = config.get("vocab_size")
    tgt_rows = src_rows if shared else config.get("decoder_vocab_size") or src_rows
    src_pieces = _pieces(folder / "vocab.json", src_rows)
    separate = bool(tok.get("separate_vocabs", False))
    tgt_pieces = src_pieces
    if separate:
        tgt_pieces = _pieces(folder / "target_vocab.json", tgt_rows)
    elif tgt_rows != src_rows:
        raise MarianError(
            f"{folder}: decoder_vocab_size {tgt_rows} != vocab_size {src_rows} "
            "with one vocab.json"
        )
    src = _order(src_pieces, config, generation, tok, folder / "vocab.json")
    tgt = src
    if separate:
        tgt = _order(tgt_pieces, config, generation, tok, folder / "target_vocab.json")
    state, model_cfg = from_marian(weights, config, src, tgt, str(folder))
    src_proto = (folder / "source.spm").read_bytes()
    tgt_proto = (folder / "target.spm").read_bytes()
    try:
        tokenizer = Tokenizer(
            src_proto,
            None if tgt_proto == src_proto else tgt_proto,
            origins=(str(folder / "source.spm"), str(folder / "target.spm")),
            vocab=src.pieces,
            tgt_vocab=tgt.pieces if separate else None,
        )
    except TokenizerError as e:
        raise MarianError(f"{folder}: {e}") from None
    cfg = _config(folder, model_cfg, tok, generation, record, config)
    ckpt = {
        "model": state,
        "config": cfg.to_dict(),
        "tokenizer": tokenizer.state_dict(),
        "weights": "raw",
        "weights_only": True,
        "imported_from": origin or str(folder),
    }
    for key in ("step", "averaged_from", "averaged_steps"):
        if key in record:
            ckpt[key] = record[key]
    return ckpt
