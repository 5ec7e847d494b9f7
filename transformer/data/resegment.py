"""Subword regularization (Kudo 2018): each training pair's segmentation sampled
anew every epoch, from the same SentencePiece model (a unigram model samples a
segmentation by its probability, smoothed by ``alpha``, from its ``nbest`` best;
a BPE model drops merges with probability ``alpha``: BPE-dropout).

The corpus store keeps the best segmentation; a batch's pairs are detokenized back
to (normalized) text and sampled again in the DataLoader worker that collates the
batch, so memory stays flat with the corpus size and the training step does not
wait. Each pair's sample is seeded by (``training.seed``, epoch, pair, side):
segmentations differ from epoch to epoch, are the same whatever the batch or the
worker, and an interrupted run resumes bit-identical. The batches are still packed
by the best segmentation's lengths (a sampled one is usually a few pieces longer,
so a batch may hold a little more than ``data.max_tokens``); a sample longer than
``data.max_length`` falls back to the best segmentation. Validation and
decoding always use the best segmentation.
"""

from __future__ import annotations

from typing import Any

import sentencepiece as spm

from transformer.tokenizer import Tokenizer

SIDES = {"both": ("src", "tgt"), "source": ("src",), "target": ("tgt",)}


class Resegmenter:
    """Samples segmentations of stored pairs (``data.tokenizer.sampling_*``).

    Args:
        tokenizer: the run's SentencePiece model(s); only their bytes are kept, so
            that the object pickles cheaply to the workers.
        alpha, nbest: SentencePiece's sampling settings.
        sides: ``both``, ``source`` or ``target``.
        max_length: the longest sample kept (``data.max_length``).
        seed: ``training.seed``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        alpha: float,
        nbest: int,
        sides: str,
        max_length: int,
        seed: int,
    ) -> None:
        self.protos = {"src": tokenizer.src_proto, "tgt": tokenizer.tgt_proto}
        self.alpha, self.nbest, self.sides = alpha, nbest, SIDES[sides]
        self.max_length, self.seed = max_length, seed
        self._models: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_models": {}}  # rebuilt where unpickled

    def _model(self, side: str) -> spm.SentencePieceProcessor:
        if side not in self._models:
            proto = self.protos[side] or self.protos["src"]  # joint: one model
            self._models[side] = spm.SentencePieceProcessor(model_proto=proto)
        return self._models[side]

    def seed_of(self, epoch: int, pair: int, side: str) -> int:
        """The seed of one pair's sample on one side (a 32-bit mix)."""
        mixed = (self.seed * 1_000_003 + epoch) * 1_000_033 + 2 * pair
        return (mixed + (side == "tgt")) % 2**32

    def __call__(
        self, side: str, pieces: list[list[int]], pairs: list[int], epoch: int
    ) -> list[list[int]]:
        """A sampled segmentation of each row of ``pieces`` (the best one, as
        stored) of pairs ``pairs`` in ``epoch``; rows of a side that is not
        sampled come back as they are."""
        if side not in self.sides:
            return pieces
        model = self._model(side)
        out = []
        for ids, pair in zip(pieces, pairs, strict=True):
            text = model.decode(ids)
            spm.set_random_generator_seed(self.seed_of(epoch, pair, side))
            sample = model.encode(
                text, enable_sampling=True, alpha=self.alpha, nbest_size=self.nbest
            )
            out.append(sample if 0 < len(sample) <= self.max_length else ids)
        return out
