"""The model, training and decoding sections, and the whole experiment
(``Config``) with the checks across sections."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from transformer.config.base import PAD_ID, ConfigError, _check
from transformer.config.data import DataConfig


@dataclass
class ModelConfig:
    """The architecture: ``arch`` picks the model, the rest sizes it.

    Vocabulary sizes of 0 are filled in from the tokenizer before the model is built.
    ``rnn`` uses d_model (embeddings), rnn_hidden, encoder_layers, decoder_layers,
    dropout and the rnn_* / attention* keys; ``decoder_only`` the Transformer keys
    of its one stack (decoder_layers, d_model, n_heads, d_ff, ...).
    """

    # transformer: the paper's encoder-decoder; rnn: a bidirectional LSTM/GRU
    # encoder and an attentional decoder; decoder_only: one causal Transformer
    # over "source <eos> <bos> target" (GPT-style)
    arch: Literal["transformer", "rnn", "decoder_only"] = "transformer"
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
    # rnn only
    rnn_type: Literal["lstm", "gru"] = "lstm"
    rnn_hidden: int = 512  # decoder state; each encoder direction has half
    # none: the fixed-vector model (the decoder starts from the final encoder
    # state and sees nothing else); soft: a weighted sum of encoder states; hard:
    # one encoder state, sampled from the weights in training (Gumbel-softmax,
    # straight-through) and the argmax at inference
    attention: Literal["none", "soft", "hard"] = "soft"
    attention_score: Literal["additive", "dot", "general"] = "additive"
    gumbel_temperature: float = 1.0  # hard attention's Gumbel-softmax temperature

    def max_pieces(self) -> int:
        """Pieces a source (or target) sentence may hold: one position is kept
        for <eos> / <bos>; a decoder_only model reads both in one sequence."""
        if self.arch == "decoder_only":
            return self.max_positions // 2 - 1
        return self.max_positions - 1

    def compile_refusal(self) -> str | None:
        """Why ``torch.compile`` (training or decoding) is refused for this
        architecture; None where it is not."""
        if self.arch == "rnn":
            return (
                "its decoder is a Python loop over time steps: "
                "one graph per target length"
            )
        return None

    def unused(self, keys: list[str]) -> list[str]:
        """Which of ``keys`` this architecture does not read (``arch`` picks
        the model; a key of another one is ignored by it)."""
        attention_keys = {"n_heads", "d_ff", "attention_dropout", "activation"}
        only = {
            "rnn": {"rnn_type", "rnn_hidden", "attention", "attention_score"},
            "transformer": attention_keys | {"norm_first", "positional"},
            "two stacks": {"encoder_layers"},
        }
        uses = {
            "transformer": only["transformer"] | only["two stacks"],
            "decoder_only": only["transformer"],
            "rnn": only["rnn"] | only["two stacks"],
        }[self.arch]
        if self.arch == "rnn" and self.attention == "hard":
            uses = uses | {"gumbel_temperature"}
        if self.arch == "rnn" and self.attention == "none":
            uses = uses - {"attention_score"}
        every = set().union(*only.values(), {"gumbel_temperature"})
        return [key for key in keys if key in every and key not in uses]

    def validate(self, prefix: str = "model") -> None:
        for name in ("d_model", "n_heads", "d_ff", "max_positions", "rnn_hidden"):
            value = getattr(self, name)
            _check(value > 0, f"{prefix}.{name}", value, "must be positive")
        for name in ("encoder_layers", "decoder_layers"):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", value, "must be at least 1")
        _check(
            self.arch == "rnn" or self.d_model % self.n_heads == 0,
            f"{prefix}.d_model",
            self.d_model,
            f"must be divisible by {prefix}.n_heads={self.n_heads}",
        )
        _check(
            self.gumbel_temperature > 0,
            f"{prefix}.gumbel_temperature",
            self.gumbel_temperature,
            "must be positive",
        )
        _check(
            self.arch != "rnn" or self.rnn_hidden % 2 == 0,
            f"{prefix}.rnn_hidden",
            self.rnn_hidden,
            "must be even (each encoder direction has half)",
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
    # stop after this many minutes of updates (state.train_seconds: validation and
    # checkpoint writes not counted, every sitting of a resumed run counted);
    # 0 = no limit. The last update is followed by a validation, as at max_steps.
    max_minutes: float = 0.0
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
    # a fresh run (resume: never) into a folder holding another run's checkpoints
    # is refused unless true, which deletes that run's files first (--overwrite);
    # an action, not a setting: the run's saved config says false
    overwrite: bool = False
    # when resuming after a change to what the data position depends on (batching
    # keys, world size, the training corpus): refuse, or restart at the next epoch
    on_data_change: Literal["error", "next_epoch"] = "error"
    dist_timeout: float = 1800.0  # seconds a collective may wait (process group)
    # seconds other ranks wait for rank 0's one-off work (tokenizer, corpus cache,
    # validation decoding), on a separate group so that it never races dist_timeout
    prepare_timeout: float = 86400.0
    tensorboard: bool = True  # used when installed
    # moving average of the weights, updated after every update in float32:
    # ema = ema_decay * ema + (1 - ema_decay) * weights; 0 = off. Saved in every
    # checkpoint (decode it with --weights ema)
    ema_decay: float = 0.0
    # after n updates the decay is min(ema_decay, (1 + n) / (10 + n)), so that an
    # early average follows the weights instead of holding on to the random start
    # (0.999 alone keeps 37% of it after 1,000 updates); false: ema_decay throughout
    ema_decay_warmup: bool = True
    validate_ema: bool = False  # validate (and pick best.pt) with the EMA weights
    # fine-tuning: a new run starts from this checkpoint's weights and tokenizer,
    # with a fresh optimizer, schedule and data position (a run dir that already
    # holds last.pt resumes instead); its architecture must match model
    init_from: str | None = None
    init_weights: Literal["raw", "ema"] = "raw"  # which of init_from's weights

    def validate(self, prefix: str = "training") -> None:
        _check(
            not self.overwrite or self.resume == "never",
            f"{prefix}.overwrite",
            self.overwrite,
            f"deletes a run, so it needs {prefix}.resume=never (or pass --overwrite)",
        )
        _check(
            0.0 <= self.label_smoothing < 1.0,
            f"{prefix}.label_smoothing",
            self.label_smoothing,
            "must be in [0, 1)",
        )
        _check(self.lr > 0, f"{prefix}.lr", self.lr, "must be positive")
        for name in ("lr", "eps", "weight_decay"):  # inf would train NaN weights
            value = getattr(self, name)
            _check(math.isfinite(value), f"{prefix}.{name}", value, "must be finite")
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
        _check(
            self.max_minutes >= 0,
            f"{prefix}.max_minutes",
            self.max_minutes,
            "must not be negative",
        )
        for name in ("dist_timeout", "prepare_timeout", "log_seconds"):
            value = getattr(self, name)
            _check(value > 0, f"{prefix}.{name}", value, "must be positive")
        _check(
            0.0 <= self.ema_decay < 1.0,
            f"{prefix}.ema_decay",
            self.ema_decay,
            "must be in [0, 1)",
        )
        _check(
            not self.validate_ema or self.ema_decay > 0,
            f"{prefix}.validate_ema",
            self.validate_ema,
            f"needs {prefix}.ema_decay > 0 (the EMA is off)",
        )
        _check(
            self.init_from is None or bool(self.init_from.strip()),
            f"{prefix}.init_from",
            self.init_from,
            "must be a checkpoint path (or null)",
        )
        _check(
            self.init_weights == "raw" or self.init_from is not None,
            f"{prefix}.init_weights",
            self.init_weights,
            f"needs {prefix}.init_from",
        )
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
    # faster on AVX-512-bf16 CPUs (README: Decoding speed); scores stay float32
    precision: Literal["fp32", "bf16"] = "fp32"
    # torch.compile the cached decoding step (dynamic shapes, a few graphs per
    # model); on CPU the compile takes about a minute, see the README's benchmarks
    compile: bool = False

    def settle_nbest(
        self,
        asked: int | None,
        beam: int | None,
        names: tuple[str, str] = ("nbest={}", "beam_size={}"),
    ) -> None:
        """Make ``nbest`` (``asked`` for now, or stored) fit the search: beam search
        widens its beam to hold ``nbest`` hypotheses unless ``beam`` was given too
        and is smaller (an error); greedy search and sampling give one, and asking
        them for more is an error. ``names``: how errors write the two settings
        (``"--nbest {}"``, ``"--beam {}"`` on the command line)."""
        nbest, beam_of = names
        if asked is not None and asked < 1:
            raise ConfigError(f"{nbest.format(asked)}: must be >= 1")
        if self.strategy == "beam":
            if asked is not None and beam is not None and asked > beam:
                raise ConfigError(
                    f"{nbest.format(asked)} is more than {beam_of.format(beam)}: "
                    "a beam of K keeps at most K hypotheses"
                )
            self.beam_size = max(self.beam_size, self.nbest)
        elif asked is not None and asked > 1:
            raise ConfigError(
                f"{nbest.format(asked)}: several hypotheses need beam search "
                f"({beam_of.format(asked)} or more), not {self.strategy}"
            )
        else:  # a stored nbest means nothing to greedy search or sampling
            self.nbest = 1

    def validate(self, prefix: str = "decoding") -> None:
        for name in ("length_penalty", "max_len_a", "temperature", "top_p"):
            value = getattr(self, name)
            _check(math.isfinite(value), f"{prefix}.{name}", value, "must be finite")
        _check(
            -(2**63) <= self.seed < 2**63, f"{prefix}.seed", self.seed, "64-bit range"
        )
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
            self.max_len_b >= 1 or (self.max_len_a > 0 and self.max_len_b == 0),
            f"{prefix}.max_len_b",
            self.max_len_b,
            ">= 1 (or 0 with max_len_a > 0): short sources would get no output",
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
            m.arch != "decoder_only" or 2 * d.max_length + 2 <= m.max_positions,
            "data.max_length",
            d.max_length,
            f"a decoder_only model reads source and target in one sequence: "
            f"2 * data.max_length + 2 must be at most model.max_positions="
            f"{m.max_positions}",
        )
        _check(
            self.decoding.min_len < m.max_positions,
            "decoding.min_len",
            self.decoding.min_len,
            f"must be below model.max_positions={m.max_positions}: no output "
            "can be that long",
        )
        _check(
            t.valid_bleu or t.best_metric not in ("bleu", "chrf"),
            "training.best_metric",
            t.best_metric,
            "needs training.valid_bleu: true (or choose loss / accuracy)",
        )
        refusal = m.compile_refusal()
        for key, value in (
            ("training.compile", t.compile),
            ("decoding.compile", self.decoding.compile),
        ):
            _check(
                refusal is None or not value,
                key,
                value,
                f"is not supported for model.arch: {m.arch} ({refusal})",
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
