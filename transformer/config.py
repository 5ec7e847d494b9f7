"""Typed experiment configuration: YAML in, validated nested dataclasses out.

One YAML file holds a whole experiment in four sections (``data``, ``model``,
``training``, ``decoding``). ``load_config`` rejects unknown keys (suggesting the
nearest valid one), wrong types and out-of-range values, each with its dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-4`` is a number (YAML 1.2), not a string.

    PyYAML follows YAML 1.1, whose floats need a dot (``1.0e-4``); users write
    ``lr: 1e-4`` and expect a number.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """Parse YAML as configs and overrides are read (``1e-4`` is a float)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why} (got {value!r})")


@dataclass
class ModelConfig:
    """Architecture of the encoder-decoder Transformer.

    Vocabulary sizes of 0 are filled in from the tokenizer before the model is built.
    """

    src_vocab_size: int = 0
    tgt_vocab_size: int = 0
    d_model: int = 512
    n_heads: int = 8
    encoder_layers: int = 6
    decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation: Literal["relu", "gelu", "silu"] = "relu"
    norm_first: bool = False  # False: post-norm as in the paper; True: pre-norm
    positional: Literal["sinusoidal", "learned"] = "sinusoidal"
    max_positions: int = 1024
    tie_src_tgt_embeddings: bool = True  # needs a shared (joint) vocabulary
    tie_output_embeddings: bool = True
    pad_id: int = PAD_ID

    def validate(self, prefix: str = "model") -> None:
        for name in ("d_model", "n_heads", "d_ff", "max_positions"):
            value = getattr(self, name)
            _check(value > 0, f"{prefix}.{name}", value, "must be positive")
        for name in ("encoder_layers", "decoder_layers"):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", value, "must be at least 1")
        _check(
            self.d_model % self.n_heads == 0,
            f"{prefix}.d_model",
            self.d_model,
            f"must be divisible by {prefix}.n_heads={self.n_heads}",
        )
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"{prefix}.{name}", value, "must be in [0, 1)")
        for name in ("src_vocab_size", "tgt_vocab_size"):
            value = getattr(self, name)
            _check(value >= 0, f"{prefix}.{name}", value, "must not be negative")
        if self.src_vocab_size and self.tgt_vocab_size:
            _check(
                not self.tie_src_tgt_embeddings
                or self.src_vocab_size == self.tgt_vocab_size,
                f"{prefix}.tie_src_tgt_embeddings",
                True,
                "needs equal source and target vocabularies "
                f"({self.src_vocab_size} != {self.tgt_vocab_size}); "
                "use a joint tokenizer or set it to false",
            )
            _check(
                0 <= self.pad_id < min(self.src_vocab_size, self.tgt_vocab_size),
                f"{prefix}.pad_id",
                self.pad_id,
                "must be a valid token id",
            )


@dataclass
class TokenizerConfig:
    """SentencePiece settings: train one on the training data, or load given models."""

    model: str | None = None  # path to a trained model (joint); None = train one
    src_model: str | None = None  # separate source model, with joint: false
    tgt_model: str | None = None
    joint: bool = True
    vocab_size: int = 8000
    model_type: Literal["unigram", "bpe"] = "unigram"
    character_coverage: float = 1.0
    # pairs drawn at random from the training data (read in a stream) to train on
    sample_sentences: int = 1_000_000

    def validate(self, prefix: str = "data.tokenizer") -> None:
        _check(
            self.vocab_size >= 8,
            f"{prefix}.vocab_size",
            self.vocab_size,
            "must be at least 8",
        )
        _check(
            self.sample_sentences >= 1,
            f"{prefix}.sample_sentences",
            self.sample_sentences,
            "must be positive",
        )
        _check(
            0.0 < self.character_coverage <= 1.0,
            f"{prefix}.character_coverage",
            self.character_coverage,
            "must be in (0, 1]",
        )
        if self.joint:
            _check(
                self.src_model is None and self.tgt_model is None,
                f"{prefix}.src_model",
                self.src_model or self.tgt_model,
                "separate models need joint: false (use 'model' for a joint one)",
            )
        else:
            _check(
                self.model is None,
                f"{prefix}.model",
                self.model,
                "a joint model needs joint: true (use src_model/tgt_model)",
            )


Format = Literal["text", "tsv", "jsonl", "hub", "copy", "reverse"]


@dataclass
class CorpusConfig:
    """One training corpus of ``data.train``; a field left unset takes data's."""

    dir: str | None = None
    format: Format | None = None
    split: str | None = None  # default: data.train_split
    hub_name: str | None = None
    hub_config: str | None = None
    src_field: str | None = None
    tgt_field: str | None = None
    # times per epoch: 4 = every pair four times, 0.5 = a random half each epoch
    weight: float = 1.0

    def validate(self, prefix: str) -> None:
        _check(self.weight > 0, f"{prefix}.weight", self.weight, "must be positive")


@dataclass
class DataConfig:
    """Where the parallel corpus comes from and how it is filtered and batched."""

    src_lang: str = "de"
    tgt_lang: str = "en"
    # 'text': {dir}/{split}.{lang}[.gz]; 'tsv': {dir}/{split}.tsv[.gz] (src<TAB>tgt);
    # 'jsonl': {dir}/{split}.jsonl[.gz]; 'hub': a Hugging Face dataset by name;
    # 'copy' / 'reverse': synthetic toy tasks that need no files.
    format: Format = "text"
    dir: str | None = None
    # when data.dir does not exist: download these files (name: sha256) from
    # source_url into download_dir (default ~/.cache/transformer_nmt/corpora/...)
    source_url: str | None = None
    source_files: dict[str, str] = field(default_factory=dict)
    download_dir: str | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    src_field: str | None = None  # JSONL/hub: column of the source, or translation.X
    tgt_field: str | None = None
    train_split: str = "train"
    valid_split: str = "val"
    test_split: str | None = "test"
    # several training corpora, each with its own files and weight (default: the
    # one corpus above); validation and test splits come from the fields above
    train: list[CorpusConfig] = field(default_factory=list)
    workers: int = 1  # DataLoader processes collating batches; 0 = in the loop
    max_length: int = 100  # pieces per side, filtered beyond
    max_length_ratio: float = 3.0  # longer/shorter piece count, filtered beyond
    max_tokens: int = 4096  # token budget per batch, padding included
    valid_max_tokens: int = 8192
    max_sentences: int = 0  # cap on sentences per batch; 0 = none
    cache_dir: str | None = None  # corpus stores; default: <run_dir>/cache
    # synthetic tasks
    toy_vocab: int = 20
    toy_min_len: int = 3
    toy_max_len: int = 12
    toy_train_size: int = 4000
    toy_valid_size: int = 200
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    @property
    def synthetic(self) -> bool:
        return self.format in ("copy", "reverse")

    def train_corpora(self) -> list[tuple[DataConfig, str, float]]:
        """(settings, split, weight) of each training corpus."""
        if not self.train:
            return [(self, self.train_split, 1.0)]
        out = []
        for corpus in self.train:
            values = {
                k: v
                for k, v in vars(corpus).items()
                if v is not None and k not in ("split", "weight")
            }
            settings = dataclasses.replace(self, **values, train=[])
            out.append((settings, corpus.split or self.train_split, corpus.weight))
        return out

    def validate(self, prefix: str = "data") -> None:
        if self.format == "hub":
            _check(bool(self.hub_name), f"{prefix}.hub_name", self.hub_name, "needed")
        _check(
            self.max_length >= 1,
            f"{prefix}.max_length",
            self.max_length,
            "must be >= 1",
        )
        _check(
            self.max_length_ratio >= 1.0,
            f"{prefix}.max_length_ratio",
            self.max_length_ratio,
            "must be >= 1",
        )
        for name in ("max_tokens", "valid_max_tokens"):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", value, "must be positive")
        _check(
            not self.source_files or bool(self.source_url),
            f"{prefix}.source_url",
            self.source_url,
            "needed to download data.source_files",
        )
        for name, digest in self.source_files.items():
            _check(
                len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
                f"{prefix}.source_files.{name}",
                digest,
                "must be a sha256 sum (64 lowercase hex digits)",
            )
        for name in ("max_sentences", "workers"):
            value = getattr(self, name)
            _check(value >= 0, f"{prefix}.{name}", value, "must not be negative")
        for i, corpus in enumerate(self.train):
            corpus.validate(f"{prefix}.train[{i}]")
            if (corpus.format or self.format) == "hub":
                _check(
                    bool(corpus.hub_name or self.hub_name),
                    f"{prefix}.train[{i}].hub_name",
                    None,
                    "needed for format hub",
                )
        if self.synthetic:
            _check(self.toy_vocab >= 2, f"{prefix}.toy_vocab", self.toy_vocab, ">= 2")
            _check(
                1 <= self.toy_min_len <= self.toy_max_len,
                f"{prefix}.toy_min_len",
                self.toy_min_len,
                "must be in [1, toy_max_len]",
            )
        self.tokenizer.validate(f"{prefix}.tokenizer")


@dataclass
class TrainingConfig:
    """The optimisation loop, validation, checkpoints and hardware."""

    run_dir: str = "checkpoints/run"
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype
    compile: bool = False
    threads: int = 0  # CPU threads; 0 = all cores
    optimizer: Literal["adam", "adamw"] = "adam"
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    # noam: the paper's d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), rescaled
    # so that it peaks at lr (at step warmup_steps); inverse_sqrt: linear warm-up to
    # lr, then lr * sqrt(warmup / step) (the same curve); constant: lr throughout
    schedule: Literal["noam", "inverse_sqrt", "constant"] = "noam"
    lr: float = 7e-4  # the peak learning rate, for every schedule
    warmup_steps: int = 4000
    cooldown_steps: int = 0  # last updates before max_steps: rate falls linearly to 0
    label_smoothing: float = 0.1
    # target positions whose logits the loss reduces at a time: its float32
    # temporaries are loss_chunk_rows x vocabulary, never batch x vocabulary
    loss_chunk_rows: int = 4096
    clip_grad_norm: float = 0.0  # 0 = no clipping
    accumulate: int = 1  # batches per update
    max_steps: int = 100_000
    max_epochs: int = 0  # 0 = no limit
    log_every: int = 50  # steps between metrics.jsonl rows
    log_seconds: float = 30.0  # seconds between progress lines when not on a terminal
    validate_every: int = 1000
    save_every: int = 0  # step checkpoints; 0 = only at validation
    keep_last: int = 5  # step checkpoints kept
    best_metric: Literal["bleu", "chrf", "loss", "accuracy"] = "bleu"
    patience: int = 0  # validations without improvement before stopping; 0 = never
    valid_bleu: bool = True  # greedy-decode the validation set for BLEU / chrF
    max_nonfinite: int = 5  # consecutive skipped (non-finite) updates before stopping
    resume: Literal["auto", "never"] = "auto"
    # when resuming after a change to what the data position depends on (batching
    # keys, world size, the training corpus): refuse, or restart at the next epoch
    on_data_change: Literal["error", "next_epoch"] = "error"
    dist_timeout: float = 1800.0  # seconds a collective may wait (process group)
    # seconds other ranks wait for rank 0's one-off work (tokenizer, corpus cache,
    # validation decoding), on a separate group so that it never races dist_timeout
    prepare_timeout: float = 86400.0
    tensorboard: bool = True  # used when installed

    def validate(self, prefix: str = "training") -> None:
        _check(
            0.0 <= self.label_smoothing < 1.0,
            f"{prefix}.label_smoothing",
            self.label_smoothing,
            "must be in [0, 1)",
        )
        _check(self.lr > 0, f"{prefix}.lr", self.lr, "must be positive")
        for name in (
            "accumulate",
            "loss_chunk_rows",
            "max_steps",
            "log_every",
            "validate_every",
            "max_nonfinite",
        ):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", value, "must be at least 1")
        for name in (
            "warmup_steps",
            "cooldown_steps",
            "max_epochs",
            "save_every",
            "keep_last",
            "patience",
            "threads",
        ):
            value = getattr(self, name)
            _check(value >= 0, f"{prefix}.{name}", value, "must not be negative")
        _check(
            self.schedule != "noam" or self.warmup_steps > 0,
            f"{prefix}.warmup_steps",
            self.warmup_steps,
            "the noam schedule needs warmup_steps > 0",
        )
        _check(
            self.cooldown_steps <= self.max_steps,
            f"{prefix}.cooldown_steps",
            self.cooldown_steps,
            f"must not exceed training.max_steps ({self.max_steps})",
        )
        _check(
            all(0.0 <= b < 1.0 for b in self.betas),
            f"{prefix}.betas",
            self.betas,
            "must be in [0, 1)",
        )
        for name in ("dist_timeout", "prepare_timeout", "log_seconds"):
            value = getattr(self, name)
            _check(value > 0, f"{prefix}.{name}", value, "must be positive")
        _check(
            self.device == "auto"
            or self.device == "cpu"
            or self.device.startswith("cuda"),
            f"{prefix}.device",
            self.device,
            "must be auto, cpu, cuda or cuda:N",
        )


@dataclass
class DecodingConfig:
    """Search settings shared by validation, evaluation and translation."""

    strategy: Literal["greedy", "beam", "sample"] = "beam"
    beam_size: int = 5
    length_penalty: float = 0.6  # GNMT alpha; 0 = raw log-probability
    nbest: int = 1
    max_len_a: float = 1.5  # max output length = a * source length + b
    max_len_b: int = 10
    min_len: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    max_tokens: int = 8192  # source tokens per decoding batch
    seed: int = 0  # for sampling
    # weights and activations of transformer-eval / -translate; bf16 decodes 1.15-1.5x
    # faster on AVX-512-bf16 CPUs (benchmarks/decode.json); scores stay float32
    precision: Literal["fp32", "bf16"] = "fp32"
    # torch.compile the cached decoding step (dynamic shapes, a few graphs per
    # model); on CPU the compile takes about a minute, see the README's benchmarks
    compile: bool = False

    def validate(self, prefix: str = "decoding") -> None:
        _check(self.beam_size >= 1, f"{prefix}.beam_size", self.beam_size, ">= 1")
        _check(self.nbest >= 1, f"{prefix}.nbest", self.nbest, "must be >= 1")
        _check(
            self.strategy != "beam" or self.nbest <= self.beam_size,
            f"{prefix}.nbest",
            self.nbest,
            f"must not exceed beam_size={self.beam_size}",
        )
        _check(self.max_len_a >= 0, f"{prefix}.max_len_a", self.max_len_a, ">= 0")
        _check(
            self.max_len_b >= 1 or self.max_len_a > 0,
            f"{prefix}.max_len_b",
            self.max_len_b,
            "max length would be zero",
        )
        _check(self.min_len >= 0, f"{prefix}.min_len", self.min_len, ">= 0")
        _check(self.temperature > 0, f"{prefix}.temperature", self.temperature, "> 0")
        _check(self.top_k >= 0, f"{prefix}.top_k", self.top_k, "must be >= 0")
        _check(0 < self.top_p <= 1.0, f"{prefix}.top_p", self.top_p, "in (0, 1]")
        _check(self.max_tokens >= 1, f"{prefix}.max_tokens", self.max_tokens, ">= 1")


@dataclass
class Config:
    """A whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)

    def validate(self) -> None:
        self.data.validate()
        self.model.validate()
        self.training.validate()
        self.decoding.validate()
        self._check_across_sections()

    def _check_across_sections(self) -> None:
        """Settings that are fine alone but fail together, found at load time."""
        d, m, t = self.data, self.model, self.training
        _check(
            d.max_length < m.max_positions,
            "data.max_length",
            d.max_length,
            f"must be below model.max_positions={m.max_positions} "
            "(a sequence also holds <bos> or <eos>)",
        )
        _check(
            t.valid_bleu or t.best_metric not in ("bleu", "chrf"),
            "training.best_metric",
            t.best_metric,
            "needs training.valid_bleu: true (or choose loss / accuracy)",
        )
        _check(
            d.tokenizer.joint or not m.tie_src_tgt_embeddings,
            "model.tie_src_tgt_embeddings",
            True,
            "needs a joint tokenizer (data.tokenizer.joint: true); "
            "set it to false for separate vocabularies",
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}: must be one of {', '.join(map(repr, choices))} (got {value!r})"
            )
        return value
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (got {value!r})")
        return {
            _coerce(key_type, k, f"{key}"): _coerce(value_type, v, f"{key}.{k}")
            for k, v in value.items()
        }
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list (got {value!r})")
        return [_coerce(arg, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(
                f"{key}: expected a list of {len(args)} values (got {value!r})"
            )
        return tuple(
            _coerce(a, v, f"{key}[{i}]")
            for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (got {value!r})")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 25e3 written for 25000
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer (got {value!r})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number (got {value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string (got {value!r})")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


# keys that existed once: the error says what took their place
REMOVED_KEYS = {
    "data.streaming": "removed: the corpus store reads a corpus of any size in a "
    "stream (delete this key)",
    "data.stream_buffer": "removed: the corpus store reads a corpus of any size in "
    "a stream (delete this key)",
    "data.tokenizer.input_sentence_size": "renamed data.tokenizer.sample_sentences",
}


def migrate(tree: dict[str, Any]) -> dict[str, Any]:
    """A stored config of an older version with today's keys (for checkpoints)."""
    tree = _deep_copy(tree)
    data = tree.get("data") or {}
    data.pop("streaming", None)
    data.pop("stream_buffer", None)
    tokenizer = data.get("tokenizer") or {}
    if "input_sentence_size" in tokenizer:
        size = tokenizer.pop("input_sentence_size")
        tokenizer.setdefault("sample_sentences", size or 1_000_000)
    return tree


def _suggest(key: str, names: list[str]) -> str | None:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if close:
        return close[0]
    words = set(key.split("_"))  # match on words too: 'lr_warmup' ~ 'warmup_steps'
    return next((n for n in names if words & set(n.split("_"))), None)


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = []
    for key in values:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if dotted in REMOVED_KEYS:
                unknown.append(f"{dotted}: {REMOVED_KEYS[dotted]}")
                continue
            close = _suggest(str(key), names)
            where = f"{prefix}.{close}" if prefix and close else close
            unknown.append(
                f"{dotted}: unknown key" + (f"; did you mean {where}?" if close else "")
            )
    if unknown:
        raise ConfigError("\n".join(unknown))
    kwargs = {
        key: _coerce(hints[key], value, f"{prefix}.{key}" if prefix else str(key))
        for key, value in values.items()
    }
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` arguments; values are read as YAML."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = read_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        parsed.append((key.strip(), value))
    return parsed


def config_from_dict(
    tree: dict[str, Any], overrides: list[str] = (), across_sections: bool = True
) -> Config:
    """Build and validate a ``Config`` from a nested dict plus overrides.

    ``across_sections=False`` skips the checks between sections, for the stored
    config of a trained model, which stays usable when such a check is added.
    """
    tree = _deep_copy(tree or {})
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    if across_sections:
        cfg.validate()
    else:
        for section in (cfg.data, cfg.model, cfg.training, cfg.decoding):
            section.validate()
    return cfg


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML experiment file, apply ``key.sub=value`` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from e
    try:
        tree = read_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return config_from_dict(tree or {}, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(
        yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True),
        encoding="utf-8",
    )
