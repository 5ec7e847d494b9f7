"""SentencePiece tokenization: train on the training data or load, with fixed ids."""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
import torch

from transformer.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TokenizerConfig
from transformer.files import atomic_write_bytes

log = logging.getLogger(__name__)

SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}


class TokenizerError(ValueError):
    """A SentencePiece model is missing, unreadable or has other special ids."""


def _processor(proto: bytes, origin: str) -> spm.SentencePieceProcessor:
    try:
        sp = spm.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{origin}: not a SentencePiece model: {e}") from e
    for name, expected in SPECIAL_IDS.items():
        got = getattr(sp, f"{name}_id")()
        if got != expected:
            raise TokenizerError(
                f"{origin}: {name} id is {got}, but this toolkit needs pad=0 unk=1 "
                "bos=2 eos=3; retrain the model with those ids"
                if proto
                else f"{origin}: an empty file, not a SentencePiece model"
            )
    return sp


def tag_piece(lang: str) -> str:
    """The reserved piece that asks for output in ``lang``: ``<2de>``."""
    return f"<2{lang}>"


# the reserved piece that marks a back-translated source (Caswell et al. 2019)
BT_PIECE = "<BT>"


def train_sentencepiece(
    sentences: Iterable[str], cfg: TokenizerConfig, reserved: Iterable[str] = ()
) -> bytes:
    """Train a SentencePiece model on ``sentences``; return its serialized proto.

    ``reserved``: pieces given the ids after the special ones as control symbols,
    which no text ever encodes to (the text ``<2de>`` is split like any other)
    and decoding drops: language tags.
    """
    model = io.BytesIO()
    try:
        _train(sentences, cfg, model, list(reserved))
    except RuntimeError as e:  # SentencePiece reports bad input as RuntimeError
        raise TokenizerError(f"training the SentencePiece model failed: {e}") from e
    return model.getvalue()


def _train(
    sentences: Iterable[str],
    cfg: TokenizerConfig,
    model: io.BytesIO,
    reserved: list[str],
) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=cfg.vocab_size,
        model_type=cfg.model_type,
        character_coverage=cfg.character_coverage,
        input_sentence_size=0,  # the caller samples (data.tokenizer.sample_sentences)
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        control_symbols=reserved,
        # small corpora (toy tasks) may not have vocab_size distinct pieces
        hard_vocab_limit=False,
        minloglevel=2,
    )


class Tokenizer:
    """Source and target SentencePiece models (the same object when joint).

    Encoding returns pieces' ids without <bos>/<eos>; the data pipeline adds them.
    """

    def __init__(
        self,
        src_proto: bytes,
        tgt_proto: bytes | None = None,
        origins: tuple[str, str] = ("source tokenizer", "target tokenizer"),
    ) -> None:
        """``origins`` name the two models in errors (their files, or a checkpoint)."""
        self.src_proto = src_proto
        self.tgt_proto = tgt_proto
        self.src = _processor(src_proto, origins[0])
        self.tgt = self.src if tgt_proto is None else _processor(tgt_proto, origins[1])

    @property
    def joint(self) -> bool:
        return self.tgt_proto is None

    @property
    def src_vocab_size(self) -> int:
        return self.src.vocab_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.vocab_size()

    def encode_src(self, texts: list[str]) -> list[list[int]]:
        return self.src.encode(texts, out_type=int)

    def encode_tgt(self, texts: list[str]) -> list[list[int]]:
        return self.tgt.encode(texts, out_type=int)

    def decode_tgt(self, ids: list[int]) -> str:
        """Detokenize target ids, dropping specials (and anything after <eos>)."""
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return self.tgt.decode([i for i in ids if i not in (PAD_ID, BOS_ID)])

    def tag_id(self, lang: str) -> int | None:
        """The id of ``lang``'s tag (``<2xx>``), None when the tokenizer has none;
        a joint or a separate pair of models hold the tags under the same ids."""
        return self.tags.get(lang)

    @functools.cached_property
    def reserved(self) -> dict[str, int]:
        """Piece -> id of every reserved piece (language tags, ``<BT>``): the
        control pieces right after the four special ids, which no text encodes
        to, decoding drops, and no search emits."""
        out = {}
        for i in range(len(SPECIAL_IDS), self.tgt_vocab_size):
            if not self.tgt.is_control(i):
                break
            out[self.tgt.id_to_piece(i)] = i
        return out

    @property
    def tags(self) -> dict[str, int]:
        """Language -> the id of its tag (``<2xx>``)."""
        return {
            piece[2:-1]: i
            for piece, i in self.reserved.items()
            if piece.startswith("<2") and piece.endswith(">")
        }

    @property
    def bt_id(self) -> int | None:
        """The id of ``<BT>``, None when the tokenizer reserves none."""
        return self.reserved.get(BT_PIECE)

    def src_pieces(self, text: str) -> list[str]:
        return self.src.encode(text, out_type=str)

    def tgt_pieces(self, ids: list[int]) -> list[str]:
        return [self.tgt.id_to_piece(i) for i in ids]

    def hash(self) -> str:
        import hashlib

        digest = hashlib.sha256(self.src_proto)
        digest.update(self.tgt_proto or b"")
        return digest.hexdigest()[:16]

    # --- persistence ---

    def save(self, directory: str | Path) -> list[Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.joint:
            files = {directory / "spm.model": self.src_proto}
        else:
            files = {
                directory / "spm.src.model": self.src_proto,
                directory / "spm.tgt.model": self.tgt_proto,
            }
        for path, proto in files.items():
            atomic_write_bytes(path, proto)
        return list(files)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors (so that ``torch.load(weights_only=True)`` reads them back)."""
        state = {"src": torch.frombuffer(bytearray(self.src_proto), dtype=torch.uint8)}
        if self.tgt_proto is not None:
            state["tgt"] = torch.frombuffer(
                bytearray(self.tgt_proto), dtype=torch.uint8
            )
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Tokenizer:
        src, tgt = state.get("src"), state.get("tgt")
        if not isinstance(src, torch.Tensor) or not (
            tgt is None or isinstance(tgt, torch.Tensor)
        ):
            raise TokenizerError("no SentencePiece model under 'src' (and 'tgt')")
        return cls(
            state["src"].numpy().tobytes(),
            None if tgt is None else tgt.numpy().tobytes(),
        )

    @classmethod
    def from_files(cls, cfg: TokenizerConfig) -> Tokenizer:
        if cfg.joint:
            model = _read_model(cfg.model, "data.tokenizer.model")
            return cls(model, origins=(f"data.tokenizer.model: {cfg.model}",) * 2)
        return cls(
            _read_model(cfg.src_model, "data.tokenizer.src_model"),
            _read_model(cfg.tgt_model, "data.tokenizer.tgt_model"),
            origins=(
                f"data.tokenizer.src_model: {cfg.src_model}",
                f"data.tokenizer.tgt_model: {cfg.tgt_model}",
            ),
        )

    @classmethod
    def train(
        cls,
        cfg: TokenizerConfig,
        src_sentences: Iterator[str] | list[str],
        tgt_sentences: Iterator[str] | list[str],
        tags: Iterable[str] = (),
        extra: Iterable[str] = (),
    ) -> Tokenizer:
        """Train on the two sides' sentences; ``tags``: languages whose tags the
        models reserve, ``extra``: other reserved pieces (``BT_PIECE``), in both
        models so that ids agree."""
        reserved = [tag_piece(lang) for lang in tags] + list(extra)
        if cfg.joint:
            joint = list(src_sentences) + list(tgt_sentences)
            log.info("training a joint SentencePiece model on %d sentences", len(joint))
            return cls(train_sentencepiece(joint, cfg, reserved))
        log.info("training separate SentencePiece models")
        return cls(
            train_sentencepiece(src_sentences, cfg, reserved),
            train_sentencepiece(tgt_sentences, cfg, reserved),
        )


def _read_model(path: str | None, key: str) -> bytes:
    if not path:
        raise TokenizerError(f"{key}: no SentencePiece model file given")
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TokenizerError(
            f"{key}: {path}: cannot read SentencePiece model: {e}"
        ) from e
