"""Token batches: length bucketing over the whole corpus, a batch order that is a
pure function of (seed, epoch), exact resume at any batch, one shard per rank,
several corpora mixed by weight, and collation in DataLoader worker processes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from transformer.config import BOS_ID, EOS_ID, PAD_ID
from transformer.data.languages import Direction
from transformer.data.readers import DataError
from transformer.data.resegment import Resegmenter
from transformer.data.store import CorpusStore
from transformer.data.workers import (
    WorkerFailure,
    quiet_worker,
    stop_workers,
    worker_died,
)


@dataclass
class Batch:
    """Source (B, S) with <eos>; decoder input (B, T) <bos> y; target (B, T) y <eos>."""

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    n_tokens: int  # real target tokens (the loss normaliser)
    n_src_tokens: int

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.src.to(device, non_blocking=True),
            self.tgt_in.to(device, non_blocking=True),
            self.tgt_out.to(device, non_blocking=True),
            self.n_tokens,
            self.n_src_tokens,
        )

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        return Batch(
            self.src.pin_memory(),
            self.tgt_in.pin_memory(),
            self.tgt_out.pin_memory(),
            self.n_tokens,
            self.n_src_tokens,
        )


def pad_sources(seqs: list[list[int]]) -> Tensor:
    """Pieces -> (B, S) with <eos> appended and pad on the right."""
    width = max(len(s) for s in seqs) + 1
    out = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s) + 1] = torch.tensor([*s, EOS_ID])
    return out


def collate(src: list[list[int]], tgt: list[list[int]], bos: int = BOS_ID) -> Batch:
    """Pieces -> a ``Batch``; ``bos``: the decoder's first input."""
    width = max(len(t) for t in tgt) + 1
    tgt_in = torch.full((len(tgt), width), PAD_ID, dtype=torch.long)
    tgt_out = torch.full((len(tgt), width), PAD_ID, dtype=torch.long)
    for i, t in enumerate(tgt):
        tgt_in[i, : len(t) + 1] = torch.tensor([bos, *t])
        tgt_out[i, : len(t) + 1] = torch.tensor([*t, EOS_ID])
    n_tokens = sum(len(t) + 1 for t in tgt)
    n_src = sum(len(s) + 1 for s in src)
    return Batch(pad_sources(src), tgt_in, tgt_out, n_tokens, n_src)


def _append(pieces: np.ndarray, lengths: np.ndarray, token: int) -> np.ndarray:
    """(B, W) padded pieces -> (B, W + 1) with ``token`` after each sentence."""
    out = np.concatenate([pieces, np.full((len(pieces), 1), PAD_ID)], 1)
    out[np.arange(len(pieces)), lengths] = token
    return out


def collate_arrays(
    src: np.ndarray, tgt: np.ndarray, src_len, tgt_len, bos=BOS_ID
) -> Batch:
    """Padded piece arrays (pad = PAD_ID) and their lengths -> a ``Batch``;
    ``bos``: the decoder's first input, one for all rows or one per row."""
    tgt_out = _append(tgt, tgt_len, EOS_ID)
    first = np.broadcast_to(np.asarray(bos), (len(tgt),))[:, None]
    tgt_in = np.concatenate([first, tgt_out[:, :-1]], 1)
    tgt_in[tgt_in == EOS_ID] = PAD_ID  # the shifted input stops before <eos>
    return Batch(
        torch.from_numpy(_append(src, src_len, EOS_ID)),
        torch.from_numpy(tgt_in),
        torch.from_numpy(tgt_out),
        int(tgt_len.sum()) + len(tgt_len),
        int(src_len.sum()) + len(src_len),
    )


# --- packing ---


def pack(widths: np.ndarray, max_tokens: int, max_sentences: int = 0) -> np.ndarray:
    """Greedy packing of sentences sorted by ``widths`` (ascending): a sentence
    joins the open batch while ``sentences * width <= max_tokens`` (and at most
    ``max_sentences``), else it opens a new one; a lone over-wide sentence gets a
    batch of its own. Returns the batch boundaries (0, ..., len(widths)).

    The walk is over the distinct widths, not the sentences, so it costs a few
    hundred Python steps for any corpus size.
    """
    values, counts = np.unique(widths, return_counts=True)
    bounds: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
    pos = open_n = 0  # sentences placed; sentences in the open batch
    for width, m in zip(values.tolist(), counts.tolist(), strict=True):
        cap = max(max_tokens // width, 1)
        if max_sentences:
            cap = min(cap, max_sentences)
        if open_n >= cap:  # the open batch cannot take a sentence this wide
            bounds.append(np.array([pos]))
            open_n = 0
        take = min(m, cap - open_n)
        pos, open_n, m = pos + take, open_n + take, m - take
        if m:
            # close the full open batch; the rest fills batches of ``cap``, the
            # last of which stays open for wider sentences
            full = (m - 1) // cap
            bounds.append(pos + cap * np.arange(full + 1, dtype=np.int64))
            pos, open_n = pos + m, m - full * cap
    if open_n:
        bounds.append(np.array([pos]))
    return np.concatenate(bounds)


@dataclass
class EpochBatches:
    """One epoch's batches of one rank: ``len()`` batches, ``[k]`` the pair ids
    of batch k, in O(1) for any k (exact resume)."""

    order: np.ndarray  # pair ids sorted by length
    bounds: np.ndarray  # (n_all + 1,) batch boundaries into ``order``
    chosen: np.ndarray  # this rank's batches, in epoch order

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, k: int) -> np.ndarray:
        b = self.chosen[k]
        return self.order[self.bounds[b] : self.bounds[b + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[k] for k in range(len(self)))


def token_batches(
    src_lengths: Sequence[int] | np.ndarray,
    tgt_lengths: Sequence[int] | np.ndarray,
    max_tokens: int,
    max_sentences: int = 0,
    seed: int | None = None,
    rank: int = 0,
    world: int = 1,
    ids: np.ndarray | None = None,
) -> EpochBatches:
    """Group sentences into batches within a token budget (padding included).

    Sentences are sorted by the longer side, then the source, ties broken at random
    from ``seed`` (None: by position), and packed by ``pack``; the batches are then
    shuffled from ``seed`` (None: kept in order). With ``world`` ranks every rank
    gets every ``world``-th batch of the first ``len - len % world``.

    Args:
        src_lengths, tgt_lengths: per sentence, <eos> / <bos> included.
        ids: the pair ids to batch (default: all); repeats allowed (oversampling).
    """
    src = np.asarray(src_lengths, dtype=np.int64)
    tgt = np.asarray(tgt_lengths, dtype=np.int64)
    ids = np.arange(len(src), dtype=np.int64) if ids is None else ids
    width = np.maximum(src[ids], tgt[ids])
    rng = np.random.default_rng(seed)
    if seed is None:
        tiebreak = np.arange(len(ids), dtype=np.uint64)
    else:
        tiebreak = rng.integers(0, 2**32, len(ids), dtype=np.uint64)
    # one uint64 key: width (16 bits), source length (16 bits), tie-break (32 bits)
    key = (width.astype(np.uint64) << np.uint64(48)) | (
        src[ids].astype(np.uint64) << np.uint64(32)
    )
    key |= tiebreak & np.uint64(2**32 - 1)
    del tiebreak
    position = np.argsort(key, kind="stable")
    del key
    order = ids[position]
    bounds = pack(width[position], max_tokens, max_sentences)
    n = len(bounds) - 1
    chosen = rng.permutation(n) if seed is not None else np.arange(n)
    if world > 1:
        chosen = chosen[rank : n - n % world : world]
    return EpochBatches(order, bounds, chosen)


def padding_efficiency(
    batches: EpochBatches, src_lengths: np.ndarray, tgt_lengths: np.ndarray
) -> float:
    """Real tokens / padded tokens over both sides of all batches."""
    src = np.asarray(src_lengths)[batches.order]
    tgt = np.asarray(tgt_lengths)[batches.order]
    starts = batches.bounds[:-1]
    sizes = np.diff(batches.bounds)
    padded = sizes * (
        np.maximum.reduceat(src, starts) + np.maximum.reduceat(tgt, starts)
    )
    return float((src.sum() + tgt.sum()) / padded.sum())


# --- the training batches ---


def _plus_one(lengths: np.ndarray) -> np.ndarray:
    wide = np.uint16 if lengths.dtype.itemsize < 2 else np.int64
    return lengths.astype(wide) + 1


class TrainBatches:
    """This rank's training batches over one or several corpus stores.

    An epoch takes every pair of a corpus ``floor(weight)`` times plus a random
    ``frac(weight)`` share of it (from ``seed`` and the epoch), batches the union
    by length and shuffles the batches; everything is a pure function of (seed,
    epoch), so a run resumes at any batch. Only this rank's batches are gathered
    from the stores, in ``workers`` DataLoader processes (0: in this process).

    Args:
        stores: the training corpora; ``weights`` their oversampling factors.
    """

    def __init__(
        self,
        stores: list[CorpusStore],
        weights: list[float],
        max_tokens: int,
        max_sentences: int = 0,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
        pin_memory: bool = False,
        directions: list[Direction] | None = None,
        resegment: Resegmenter | None = None,
    ) -> None:
        self.stores, self.weights = stores, weights
        self.max_tokens, self.max_sentences = max_tokens, max_sentences
        self.seed, self.rank, self.world = seed, rank, world
        self.workers, self.pin_memory = workers, pin_memory
        # per store, the tokens of its direction: a source prefix (a language
        # tag) and the decoder's first input
        self.directions = directions or [Direction("", "") for _ in stores]
        self.resegment = resegment  # subword regularization, or None
        self.offsets = np.cumsum([0] + [len(s) for s in stores])
        # lengths with <eos> / <bos> (and a source prefix), all corpora back to
        # back: (pairs,); widened first, as a uint8 length of 255 + 1 would wrap
        self.src_len = np.concatenate(
            [
                _plus_one(s.lengths("src")) + len(way.prefix)
                for s, way in zip(stores, self.directions, strict=True)
            ]
        )
        self.tgt_len = np.concatenate([_plus_one(s.lengths("tgt")) for s in stores])
        self._last: tuple[int, EpochBatches] | None = None

    @property
    def n_pairs(self) -> int:
        return int(self.offsets[-1])

    def fingerprint(self) -> str:
        """Equal iff the stores (files, tokenizer, filters) and weights are."""
        parts = [
            f"{s.key}x{w:g}" + _tokens_of(way)
            for s, w, way in zip(
                self.stores, self.weights, self.directions, strict=True
            )
        ]
        sampled = self.resegment
        if sampled is not None:  # what the samples depend on
            parts.append(
                f"~{sampled.alpha:g}/{sampled.nbest}/{','.join(sampled.sides)}"
            )
        return "+".join(parts)

    def epoch_ids(self, epoch: int) -> np.ndarray | None:
        """The pair ids of an epoch (None: every pair once)."""
        if all(w == 1 for w in self.weights):
            return None
        rng = np.random.default_rng([self.seed, epoch, 1])
        parts = []
        for store, weight, start in zip(
            self.stores, self.weights, self.offsets, strict=False
        ):
            n = len(store)
            whole, frac = divmod(weight, 1.0)
            parts += [np.arange(start, start + n)] * int(whole)
            extra = round(frac * n)
            if extra:
                parts.append(start + np.sort(rng.choice(n, extra, replace=False)))
        return np.concatenate(parts)

    def batches(self, epoch: int) -> EpochBatches:
        """This rank's batches of ``epoch`` (the last epoch's are kept: sorting a
        large corpus takes a moment, and forked workers inherit them)."""
        if self._last is not None and self._last[0] == epoch:
            return self._last[1]
        batches = token_batches(
            self.src_len,
            self.tgt_len,
            self.max_tokens,
            self.max_sentences,
            seed=self.seed * 100_003 + epoch,
            rank=self.rank,
            world=self.world,
            ids=self.epoch_ids(epoch),
        )
        self._last = (epoch, batches)
        return batches

    def collate(self, ids: np.ndarray, epoch: int | None = None) -> Batch:
        """Gather pairs ``ids`` (global ids) from their stores into a batch;
        with subword regularization, segmented as sampled for ``epoch``."""
        if self.resegment is not None and epoch is not None:
            return self._collate_sampled(ids, epoch)
        corpus = np.searchsorted(self.offsets, ids, side="right") - 1
        src_len, tgt_len = self.src_len[ids] - 1, self.tgt_len[ids] - 1
        src = np.full((len(ids), int(src_len.max())), PAD_ID, dtype=np.int64)
        tgt = np.full((len(ids), int(tgt_len.max())), PAD_ID, dtype=np.int64)
        bos = np.full(len(ids), BOS_ID, dtype=np.int64)
        for c in np.unique(corpus).tolist():
            rows = np.flatnonzero(corpus == c)
            local = ids[rows] - self.offsets[c]
            store, way = self.stores[c], self.directions[c]
            s, t = (
                store.padded("src", local, PAD_ID),
                store.padded("tgt", local, PAD_ID),
            )
            start = len(way.prefix)
            src[rows, :start] = way.prefix
            src[rows, start : start + s.shape[1]] = s
            tgt[rows, : t.shape[1]] = t
            bos[rows] = way.bos
        return collate_arrays(src, tgt, src_len, tgt_len, bos)

    def _collate_sampled(self, ids: np.ndarray, epoch: int) -> Batch:
        """``collate`` with each pair's segmentation sampled (``resegment``)."""
        corpus = np.searchsorted(self.offsets, ids, side="right") - 1
        src: list[list[int]] = [[] for _ in ids]
        tgt: list[list[int]] = [[] for _ in ids]
        bos = np.full(len(ids), BOS_ID, dtype=np.int64)
        for c in np.unique(corpus).tolist():
            rows = np.flatnonzero(corpus == c)
            local = ids[rows] - self.offsets[c]
            store, way = self.stores[c], self.directions[c]
            pairs = ids[rows].tolist()
            for side, out in (("src", src), ("tgt", tgt)):
                padded = store.padded(side, local, -1)
                pieces = [row[row >= 0].tolist() for row in padded]
                pieces = self.resegment(side, pieces, pairs, epoch)
                for r, p in zip(rows.tolist(), pieces, strict=True):
                    out[r] = [*way.prefix, *p] if side == "src" else p
            bos[rows] = way.bos
        src_len = np.array([len(x) for x in src])
        tgt_len = np.array([len(x) for x in tgt])
        return collate_arrays(
            _padded(src, src_len), _padded(tgt, tgt_len), src_len, tgt_len, bos
        )

    def positions(
        self, epoch: int, start: int, max_epochs: int = 0
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, batch number, pair ids) from (``epoch``, ``start``) on, through
        ``max_epochs`` epochs (0: without end)."""
        while not max_epochs or epoch < max_epochs:
            batches = self.batches(epoch)
            if not len(batches):
                raise DataError(
                    f"the training data yields no batches for rank {self.rank} "
                    f"({self.n_pairs} pairs, {self.world} rank(s), data.max_tokens "
                    f"{self.max_tokens})"
                )
            for k in range(start, len(batches)):
                yield epoch, k, batches[k]
            epoch, start = epoch + 1, 0

    def stream(
        self, epoch: int, start: int = 0, max_epochs: int = 0
    ) -> Iterator[tuple[int, int, Batch]]:
        """(epoch, batch number, batch) from (``epoch``, ``start``) on, collated in
        ``workers`` processes that live as long as the stream."""
        if not self.workers:
            for e, k, ids in self.positions(epoch, start, max_epochs):
                yield e, k, self.collate(ids, e)
            return
        next(iter(self.positions(epoch, 0, max_epochs)), None)  # errors here, not
        loader = DataLoader(  # wrapped in a worker's traceback
            _Stream(self, epoch, start, max_epochs),
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4,
            # its own generator: seeding the workers must not draw from the global
            # RNG, whose stream (dropout) an exact resume depends on
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=quiet_worker,
        )
        batches = iter(loader)
        try:
            while True:
                try:
                    item = next(batches)
                except StopIteration:
                    return
                except RuntimeError as e:  # a worker killed (by the OOM killer)
                    died = worker_died(e)
                    if died is None:
                        raise
                    raise died from None
                if isinstance(item, WorkerFailure):
                    raise item.error(self.rank if self.world > 1 else None)
                yield item
        finally:
            stop_workers(batches)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of one epoch from batch number ``start`` on."""
        for _, _, batch in self.stream(epoch, start, max_epochs=epoch + 1):
            yield batch

    def efficiency(self, epoch: int = 0) -> float:
        return padding_efficiency(self.batches(epoch), self.src_len, self.tgt_len)


def _padded(rows: list[list[int]], lengths: np.ndarray) -> np.ndarray:
    """Rows of pieces -> (B, longest), PAD_ID after each."""
    out = np.full((len(rows), int(lengths.max(initial=0))), PAD_ID, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _tokens_of(way: Direction) -> str:
    """What a direction adds to a batch, for the fingerprint (nothing for a
    bilingual corpus, whose fingerprint stays as it was)."""
    if not way.prefix and way.bos == BOS_ID:
        return ""
    return f"@{'.'.join(map(str, way.prefix))}/{way.bos}"


class _Stream(IterableDataset):
    """The batches of ``TrainBatches.positions``; worker w of W collates the
    w-th, (w + W)-th, ... of them, which the DataLoader returns round-robin, so
    the order is the single-process order."""

    def __init__(
        self, data: TrainBatches, epoch: int, start: int, max_epochs: int
    ) -> None:
        self.data, self.epoch, self.start = data, epoch, start
        self.max_epochs = max_epochs

    def __iter__(self) -> Iterator[tuple[int, int, Batch] | WorkerFailure]:
        info = get_worker_info()
        first, step = (0, 1) if info is None else (info.id, info.num_workers)
        positions = self.data.positions(self.epoch, self.start, self.max_epochs)
        e, k = self.epoch, self.start
        try:
            for n, (e, k, ids) in enumerate(positions):
                if n % step == first:
                    yield e, k, self.data.collate(ids, e)
        except Exception as error:  # sent as an item: see WorkerFailure
            yield WorkerFailure.of(error, first, e, k)
