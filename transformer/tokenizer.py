"""SentencePiece tokenization: train on the training data or load, with fixed ids."""

from __future__ import annotations

import functools
import io
import json
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


def _load_processor(proto: bytes, origin: str) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{origin}: not a SentencePiece model: {e}") from e


def _processor(proto: bytes, origin: str) -> spm.SentencePieceProcessor:
    sp = _load_processor(proto, origin)
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


# the pieces of the special ids in a vocabulary (``Tokenizer(vocab=...)``)
SPECIAL_PIECES = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}


class MappedModel:
    """A SentencePiece model whose pieces take their ids from a vocabulary (a
    list of pieces, by id) instead of the model's own: how transformers' MarianMT
    tokenizes, with source and target models over one joint ``vocab.json``.

    It has the methods of ``SentencePieceProcessor`` that this toolkit calls, so
    callers do not tell the two apart. As ``MarianTokenizer`` does, a piece the
    vocabulary lacks is <unk>, and a sentence that starts with a language code
    (``>>fr<<``) keeps the code as one piece.
    """

    def __init__(self, sp: spm.SentencePieceProcessor, pieces: list[str]) -> None:
        self.sp, self.pieces = sp, pieces
        self.ids = {piece: i for i, piece in enumerate(pieces)}

    def vocab_size(self) -> int:
        return len(self.pieces)

    def id_to_piece(self, i: int) -> str:
        return self.pieces[i]

    def piece_to_id(self, piece: str) -> int:
        return self.ids.get(piece, UNK_ID)

    def is_control(self, i: int) -> bool:
        return i < len(SPECIAL_IDS)

    @staticmethod
    def _split_code(text: str) -> tuple[list[str], str]:
        end = text.find("<<") if text.startswith(">>") else -1
        if end == -1:
            return [], text
        return [text[: end + 2]], text[end + 2 :]

    def encode(self, texts, out_type=int, num_threads: int = -1):
        """Pieces (``out_type=str``) or ids of one text or a list of them."""
        if isinstance(texts, str):
            return self.encode([texts], out_type)[0]
        split = [self._split_code(text) for text in texts]
        rest = [text for _, text in split]
        encoded = self.sp.encode(rest, out_type=str, num_threads=num_threads)
        pieces = [code + row for (code, _), row in zip(split, encoded, strict=True)]
        if out_type is str:
            return pieces
        return [[self.ids.get(p, UNK_ID) for p in row] for row in pieces]

    def decode(self, ids: list[int]) -> str:
        text = self.sp.decode_pieces([self.pieces[i] for i in ids])
        # a piece the SentencePiece model lacks keeps its word-start mark
        return text.replace("\u2581", " ")


def check_vocabulary(pieces: list[str], origin: str) -> list[str]:
    """A vocabulary (pieces by id) this toolkit can use: distinct pieces, and
    the special ones at their ids (pad 0, unk 1, bos 2, eos 3)."""
    if len(set(pieces)) != len(pieces):
        twice = sorted({p for p in pieces if pieces.count(p) > 1})[:3]
        raise TokenizerError(f"{origin}: pieces given twice: {twice}")
    for name, i in SPECIAL_IDS.items():
        if len(pieces) <= i or pieces[i] != SPECIAL_PIECES[name]:
            got = pieces[i] if len(pieces) > i else None
            raise TokenizerError(
                f"{origin}: id {i} must be {SPECIAL_PIECES[name]} (got {got!r})"
            )
    return pieces


def read_vocabulary(path: str | Path, key: str) -> list[str]:
    """A JSON vocabulary file (piece -> id, as transformers' ``vocab.json``) as
    pieces in this toolkit's order: <pad> <unk> <s> </s> first (<s> and <pad>
    added where the file lacks them), then the others by their ids."""
    try:
        mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{key}: {path}: cannot read a vocabulary: {e}") from e
    if not isinstance(mapping, dict) or not all(
        isinstance(i, int) for i in mapping.values()
    ):
        raise TokenizerError(f"{key}: {path}: not a JSON object of piece -> id")
    if SPECIAL_PIECES["unk"] not in mapping or SPECIAL_PIECES["eos"] not in mapping:
        raise TokenizerError(f"{key}: {path}: needs the pieces <unk> and </s>")
    special = list(SPECIAL_PIECES.values())
    others = sorted((i, p) for p, i in mapping.items() if p not in special)
    return special + [p for _, p in others]


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
    The ids are the SentencePiece models' own, or, given a ``vocab`` (pieces by
    id, specials first: ``check_vocabulary``), the pieces' places in it: one
    vocabulary over both models, or ``vocab`` for the source and ``tgt_vocab``
    for the target (transformers' MarianMT models are tokenized so).
    """

    def __init__(
        self,
        src_proto: bytes,
        tgt_proto: bytes | None = None,
        origins: tuple[str, str] = ("source tokenizer", "target tokenizer"),
        vocab: list[str] | None = None,
        tgt_vocab: list[str] | None = None,
    ) -> None:
        """``origins`` name the two models in errors (their files, or a checkpoint)."""
        self.src_proto = src_proto
        self.tgt_proto = tgt_proto
        self.vocab, self.tgt_vocab = vocab, tgt_vocab
        if vocab is None:
            if tgt_vocab is not None:
                raise TokenizerError("a target vocabulary needs a source one")
            self.src = _processor(src_proto, origins[0])
            self.tgt = self.src
            if tgt_proto is not None:
                self.tgt = _processor(tgt_proto, origins[1])
            return
        check_vocabulary(vocab, f"{origins[0]} vocabulary")
        if tgt_vocab is not None:
            check_vocabulary(tgt_vocab, f"{origins[1]} vocabulary")
        src_sp = _load_processor(src_proto, origins[0])
        tgt_sp = src_sp
        if tgt_proto is not None:
            tgt_sp = _load_processor(tgt_proto, origins[1])
        self.src = MappedModel(src_sp, vocab)
        self.tgt = self.src
        if tgt_proto is not None or tgt_vocab is not None:
            self.tgt = MappedModel(tgt_sp, tgt_vocab or vocab)

    @property
    def joint(self) -> bool:
        """One SentencePiece model for both languages."""
        return self.tgt_proto is None

    @property
    def shared_vocabulary(self) -> bool:
        """Source and target ids mean the same pieces (tied embeddings need it)."""
        return self.joint if self.vocab is None else self.tgt_vocab is None

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

    def _vocab_bytes(self) -> dict[str, bytes]:
        """The vocabularies as JSON (piece -> id), by the name they are saved as."""
        out = {}
        for name, pieces in (("vocab", self.vocab), ("tgt_vocab", self.tgt_vocab)):
            if pieces is not None:
                mapping = {piece: i for i, piece in enumerate(pieces)}
                out[name] = json.dumps(mapping, ensure_ascii=False).encode("utf-8")
        return out

    def hash(self) -> str:
        import hashlib

        digest = hashlib.sha256(self.src_proto)
        digest.update(self.tgt_proto or b"")
        for data in self._vocab_bytes().values():  # none: the hash of old
            digest.update(data)
        return digest.hexdigest()[:16]

    # --- persistence ---

    def save(self, directory: str | Path) -> list[Path]:
        """Write the SentencePiece model(s) (and vocabularies) into ``directory``;
        the model files, source first."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.joint:
            files = {directory / "spm.model": self.src_proto}
        else:
            files = {
                directory / "spm.src.model": self.src_proto,
                directory / "spm.tgt.model": self.tgt_proto,
            }
        vocabs = {directory / f"{k}.json": v for k, v in self._vocab_bytes().items()}
        for path, data in {**files, **vocabs}.items():
            atomic_write_bytes(path, data)
        return list(files)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors (so that ``torch.load(weights_only=True)`` reads them back)."""

        def tensor(data: bytes) -> torch.Tensor:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)

        state = {"src": tensor(self.src_proto)}
        if self.tgt_proto is not None:
            state["tgt"] = tensor(self.tgt_proto)
        state.update({k: tensor(v) for k, v in self._vocab_bytes().items()})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Tokenizer:
        if not isinstance(state.get("src"), torch.Tensor) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise TokenizerError("no SentencePiece model under 'src' (and 'tgt')")
        data = {k: v.numpy().tobytes() for k, v in state.items()}
        vocabs = {}
        for name in ("vocab", "tgt_vocab"):
            if name in data:
                vocabs[name] = _pieces_by_id(json.loads(data[name]), name)
        return cls(data["src"], data.get("tgt"), **vocabs)

    @classmethod
    def from_files(cls, cfg: TokenizerConfig) -> Tokenizer:
        vocab = None
        if cfg.vocab is not None:
            vocab = read_vocabulary(cfg.vocab, "data.tokenizer.vocab")
        if cfg.joint:
            model = _read_model(cfg.model, "data.tokenizer.model")
            origins = (f"data.tokenizer.model: {cfg.model}",) * 2
            return cls(model, origins=origins, vocab=vocab)
        return cls(
            _read_model(cfg.src_model, "data.tokenizer.src_model"),
            _read_model(cfg.tgt_model, "data.tokenizer.tgt_model"),
            origins=(
                f"data.tokenizer.src_model: {cfg.src_model}",
                f"data.tokenizer.tgt_model: {cfg.tgt_model}",
            ),
            vocab=vocab,
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


def _pieces_by_id(mapping: dict[str, int], name: str) -> list[str]:
    """A stored vocabulary (piece -> id, ids 0..n-1) as pieces by id."""
    pieces = sorted(mapping, key=mapping.__getitem__)
    if [mapping[p] for p in pieces] != list(range(len(pieces))):
        raise TokenizerError(f"the stored {name}: ids are not 0..{len(pieces) - 1}")
    return pieces


def _read_model(path: str | None, key: str) -> bytes:
    if not path:
        raise TokenizerError(f"{key}: no SentencePiece model file given")
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TokenizerError(
            f"{key}: {path}: cannot read SentencePiece model: {e}"
        ) from e
