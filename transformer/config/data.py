"""The data section: corpora, their formats and filters, batching, tokenizer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from transformer.config.base import check


@dataclass
class TokenizerConfig:
    """SentencePiece settings: train one on the training data, or load given models."""

    model: str | None = None  # path to a trained model (joint); None = train one
    src_model: str | None = None  # separate source model, with joint: false
    tgt_model: str | None = None  # separate target model, with joint: false
    joint: bool = True  # one model for both languages; false: one per language
    # a JSON file of piece -> id (as transformers' vocab.json) giving the ids of
    # the model's pieces (of both models, with joint: false) in place of their own;
    # <pad> <unk> <s> </s> take ids 0-3, the others follow in the file's order
    vocab: str | None = None
    vocab_size: int = 8000  # pieces of a trained model, at most (each, if not joint)
    model_type: Literal["unigram", "bpe"] = "unigram"  # SentencePiece algorithm
    character_coverage: float = 1.0  # share of characters the model covers
    # pairs drawn at random from the training data (read in a stream) to train on
    sample_sentences: int = 1_000_000
    # subword regularization: each training pair's segmentation sampled anew every
    # epoch (unigram: Kudo 2018's smoothing alpha; bpe: BPE-dropout's merge-drop
    # rate); 0 = off. Validation and decoding use the best segmentation
    sampling_alpha: float = 0.0
    sampling_nbest: int = -1  # unigram: sample from the n best (-1: from all)
    # which side's segmentations are sampled: both, source or target
    sampling_sides: Literal["both", "source", "target"] = "both"

    def validate(self, prefix: str = "data.tokenizer") -> None:
        check(
            self.vocab_size >= 8,
            f"{prefix}.vocab_size",
            self.vocab_size,
            "must be at least 8",
        )
        check(
            self.sample_sentences >= 1,
            f"{prefix}.sample_sentences",
            self.sample_sentences,
            "must be positive",
        )
        check(
            self.sampling_alpha >= 0
            and (self.model_type != "bpe" or self.sampling_alpha < 1),
            f"{prefix}.sampling_alpha",
            self.sampling_alpha,
            "must be >= 0 (and below 1 for bpe: a merge-drop rate)",
        )
        check(
            self.sampling_nbest == -1 or self.sampling_nbest >= 1,
            f"{prefix}.sampling_nbest",
            self.sampling_nbest,
            "must be -1 (all) or at least 1",
        )
        check(
            0.0 < self.character_coverage <= 1.0,
            f"{prefix}.character_coverage",
            self.character_coverage,
            "must be in (0, 1]",
        )
        check(
            self.vocab is None or bool(self.model or self.src_model),
            f"{prefix}.vocab",
            self.vocab,
            "gives the ids of given SentencePiece models: set model (or src_model "
            "and tgt_model) too",
        )
        if self.joint:
            check(
                self.src_model is None and self.tgt_model is None,
                f"{prefix}.src_model",
                self.src_model or self.tgt_model,
                "separate models need joint: false (use 'model' for a joint one)",
            )
        else:
            check(
                self.model is None,
                f"{prefix}.model",
                self.model,
                "a joint model needs joint: true (use src_model/tgt_model)",
            )


Format = Literal["text", "tsv", "jsonl", "hub", "copy", "reverse"]
Synthetic = Literal["distilled", "back_translated"]


@dataclass
class CorpusConfig:
    """One training corpus of ``data.train``; a field left unset takes data's."""

    dir: str | None = None  # default: data.dir
    format: Format | None = None  # default: data.format
    split: str | None = None  # default: data.train_split
    hub_name: str | None = None  # default: data.hub_name
    hub_config: str | None = None  # default: data.hub_config
    src_field: str | None = None  # default: data.src_field
    tgt_field: str | None = None  # default: data.tgt_field
    # times per epoch: 4 = every pair four times, 0.5 = a random half each epoch
    weight: float = 1.0
    # with data.pairs: the one direction this corpus is read in (default: every
    # direction of data.pairs its files hold)
    src_lang: str | None = None
    tgt_lang: str | None = None  # the target language of that direction
    # distilled: targets translated by a teacher; back_translated: sources
    # translated back from real targets (default: data.synthetic)
    synthetic: Synthetic | None = None
    bt_tag: bool | None = None  # default: data.bt_tag

    def validate(self, prefix: str) -> None:
        check(self.weight > 0, f"{prefix}.weight", self.weight, "must be positive")
        check(
            (self.src_lang is None) == (self.tgt_lang is None),
            f"{prefix}.src_lang",
            self.src_lang,
            "src_lang and tgt_lang go together",
        )


@dataclass
class DataConfig:
    """Where the parallel corpus comes from and how it is filtered and batched."""

    src_lang: str = "de"  # source language code: file suffix, default field name
    tgt_lang: str = "en"  # target language code
    # 'text': {dir}/{split}.{lang}[.gz]; 'tsv': {dir}/{split}.tsv[.gz] (src<TAB>tgt);
    # 'jsonl': {dir}/{split}.jsonl[.gz]; 'hub': a Hugging Face dataset by name;
    # 'copy' / 'reverse': synthetic toy tasks that need no files.
    format: Format = "text"
    dir: str | None = None  # folder of the corpus files (and of local hub files)
    # when data.dir does not exist: download these files (name: sha256) from
    # source_url into download_dir (default ~/.cache/transformer_nmt/corpora/...)
    source_url: str | None = None
    source_files: dict[str, str] = field(default_factory=dict)  # see source_url
    download_dir: str | None = None  # see source_url
    hub_name: str | None = None  # Hugging Face dataset name (or json, csv, parquet)
    hub_config: str | None = None  # the dataset's configuration, e.g. de-en
    src_field: str | None = None  # JSONL/hub: column of the source, or translation.X
    tgt_field: str | None = None  # JSONL/hub: column of the target
    train_split: str = "train"  # split name of the training data
    valid_split: str = "val"  # validated on during training
    test_split: str | None = "test"  # transformer-eval's default split
    # several training corpora, each with its own files and weight (default: the
    # one corpus above); validation and test splits come from the fields above
    train: list[CorpusConfig] = field(default_factory=list)
    # a synthetic corpus: distilled (a teacher's translations of the sources) or
    # back_translated (sources translated back from real targets); null: real
    synthetic: Synthetic | None = None
    # a back-translated corpus's sources start with the reserved piece <BT>
    # (tagged back-translation, Caswell et al. 2019)
    bt_tag: bool = True
    # one model for several directions, "src-tgt" each (e.g. [de-en, en-de]):
    # every corpus is read in each of them (src_lang / tgt_lang are then unused)
    # and a tag asks for the target language; empty: the one direction above
    pairs: list[str] = field(default_factory=list)
    # where the target-language tag goes: target (the decoder's first input, as
    # fairseq's decoder-langtok and NLLB) or source (the source's first token,
    # Johnson et al. 2017); transformer/data/languages.py says why target
    tag: Literal["source", "target"] = "target"
    # directions are drawn in proportion to size^(1/T) on top of the corpus
    # weights: 1 = by size, 5 = the usual multilingual setting, large = uniform
    sampling_temperature: float = 1.0
    workers: int = 1  # DataLoader processes collating batches; 0 = in the loop
    max_length: int = 100  # pieces per side, filtered beyond
    max_length_ratio: float = 3.0  # longer/shorter piece count, filtered beyond
    max_tokens: int = 4096  # token budget per batch, padding included
    valid_max_tokens: int = 8192  # token budget per validation batch
    max_sentences: int = 0  # cap on sentences per batch; 0 = none
    cache_dir: str | None = None  # corpus stores; default: <run_dir>/cache
    toy_vocab: int = 20  # copy/reverse: distinct letters (at most 26)
    toy_min_len: int = 3  # copy/reverse: fewest letters a sentence
    toy_max_len: int = 12  # copy/reverse: most letters a sentence
    toy_train_size: int = 4000  # copy/reverse: training pairs
    toy_valid_size: int = 200  # copy/reverse: pairs of every other split
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    @property
    def toy(self) -> bool:
        """A synthetic toy task (copy, reverse), generated, not read."""
        return self.format in ("copy", "reverse")

    @property
    def multilingual(self) -> bool:
        return bool(self.pairs)

    def directions(self) -> list[tuple[str, str]]:
        """(source, target) language of each direction the model is trained on."""
        if not self.pairs:
            return [(self.src_lang, self.tgt_lang)]
        return [tuple(pair.split("-", 1)) for pair in self.pairs]  # type: ignore[misc]

    def languages(self) -> list[str]:
        """Every language the model reads or writes, in order of appearance."""
        return list(dict.fromkeys(lang for d in self.directions() for lang in d))

    def direction(self, src: str, tgt: str) -> DataConfig:
        """These settings for the direction ``src`` -> ``tgt``."""
        return dataclasses.replace(self, src_lang=src, tgt_lang=tgt, train=[])

    def tagged(self) -> bool:
        """Do these settings' sources start with ``<BT>``?"""
        return self.synthetic == "back_translated" and self.bt_tag

    def reserved(self) -> list[str]:
        """Reserved pieces besides the language tags that the tokenizer needs:
        ``<BT>`` when a training corpus is tagged back-translation."""
        return ["<BT>"] if any(c.tagged() for c, _, _ in self.train_corpora()) else []

    def train_corpora(self) -> list[tuple[DataConfig, str, float]]:
        """(settings, split, weight) of each training corpus, and with ``pairs``
        of each corpus in each of its directions (``settings.src_lang`` and
        ``tgt_lang`` say which)."""
        entries = self.train or [CorpusConfig()]
        out = []
        for corpus in entries:
            values = {
                k: v
                for k, v in vars(corpus).items()
                if v is not None and k not in ("split", "weight")
            }
            settings = dataclasses.replace(self, **values, train=[])
            split = corpus.split or self.train_split
            if not self.pairs or corpus.src_lang is not None:
                out.append((settings, split, corpus.weight))
                continue
            for src, tgt in self.directions():
                out.append((settings.direction(src, tgt), split, corpus.weight))
        return out

    def validate(self, prefix: str = "data") -> None:
        if self.format == "hub":
            check(bool(self.hub_name), f"{prefix}.hub_name", self.hub_name, "needed")
        check(
            self.max_length >= 1,
            f"{prefix}.max_length",
            self.max_length,
            "must be >= 1",
        )
        check(
            self.max_length_ratio >= 1.0,
            f"{prefix}.max_length_ratio",
            self.max_length_ratio,
            "must be >= 1",
        )
        for name in ("max_tokens", "valid_max_tokens"):
            value = getattr(self, name)
            check(value >= 1, f"{prefix}.{name}", value, "must be positive")
        check(
            not self.source_files or bool(self.source_url),
            f"{prefix}.source_url",
            self.source_url,
            "needed to download data.source_files",
        )
        for name, digest in self.source_files.items():
            check(  # written into data.download_dir: never outside it
                name not in ("", ".", "..") and "/" not in name and "\\" not in name,
                f"{prefix}.source_files",
                name,
                "a file name, without a folder",
            )
            check(
                len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
                f"{prefix}.source_files.{name}",
                digest,
                "must be a sha256 sum (64 lowercase hex digits)",
            )
        for name in ("max_sentences", "workers"):
            value = getattr(self, name)
            check(value >= 0, f"{prefix}.{name}", value, "must not be negative")
        for i, corpus in enumerate(self.train):
            corpus.validate(f"{prefix}.train[{i}]")
            if (corpus.format or self.format) == "hub":
                check(
                    bool(corpus.hub_name or self.hub_name),
                    f"{prefix}.train[{i}].hub_name",
                    None,
                    "needed for format hub",
                )
        if self.toy:
            check(self.toy_vocab >= 2, f"{prefix}.toy_vocab", self.toy_vocab, ">= 2")
            check(
                1 <= self.toy_min_len <= self.toy_max_len,
                f"{prefix}.toy_min_len",
                self.toy_min_len,
                "must be in [1, toy_max_len]",
            )
        self.tokenizer.validate(f"{prefix}.tokenizer")
        self._validate_pairs(prefix)

    def _validate_pairs(self, prefix: str) -> None:
        check(
            self.sampling_temperature > 0,
            f"{prefix}.sampling_temperature",
            self.sampling_temperature,
            "must be positive",
        )
        for pair in self.pairs:
            langs = pair.split("-")
            check(
                len(langs) == 2 and all(langs) and langs[0] != langs[1],
                f"{prefix}.pairs",
                pair,
                "each is 'src-tgt', two different language codes (e.g. de-en)",
            )
            check(
                all(c.isalnum() or c == "_" for c in pair.replace("-", "")),
                f"{prefix}.pairs",
                pair,
                "language codes are letters, digits and _",
            )
        check(
            len(set(self.pairs)) == len(self.pairs),
            f"{prefix}.pairs",
            self.pairs,
            "a direction is given twice",
        )
        if not self.pairs:
            return
        for i, corpus in enumerate(self.train):
            if corpus.src_lang is not None:
                pair = f"{corpus.src_lang}-{corpus.tgt_lang}"
                check(
                    pair in self.pairs,
                    f"{prefix}.train[{i}].src_lang",
                    pair,
                    f"not one of data.pairs ({', '.join(self.pairs)})",
                )
                continue
            fmt = corpus.format or self.format
            check(
                fmt != "tsv" and not self.toy,
                f"{prefix}.pairs",
                fmt,
                "a corpus read in every direction needs its files or fields "
                "named by language (format text, jsonl or hub); give a tsv "
                "corpus its src_lang and tgt_lang in data.train",
            )
            check(
                not (corpus.src_field or corpus.tgt_field)
                and not (self.src_field or self.tgt_field),
                f"{prefix}.src_field",
                corpus.src_field or self.src_field,
                "one field for every direction: leave the fields to the "
                "languages (translation.<lang>)",
            )
