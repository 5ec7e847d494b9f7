"""The training section, and the whole experiment (``Config``) with the checks
across sections."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from transformer.config.base import check
from transformer.config.data import DataConfig
from transformer.config.decoding import DecodingConfig
from transformer.config.model import ModelConfig, TransformerConfig


@dataclass
class TrainingConfig:
    """The optimisation loop, validation, checkpoints and hardware."""

    run_dir: str = "checkpoints/run"  # checkpoints, logs, the resolved config
    seed: int = 1234  # weights, data order, dropout, toy data, tokenizer sample
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # autocast dtype; auto: bf16 on CUDA and on CPUs with native bf16, else fp32
    # (bf16 kept float32's validation BLEU over 3,000 updates: benchmarks page)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the forward pass and the loss
    threads: int = 0  # CPU threads; 0 = all cores
    optimizer: Literal["adam", "adamw"] = "adam"  # adamw: decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.98)  # Adam's moment decay rates
    eps: float = 1e-9  # Adam's epsilon
    weight_decay: float = 0.0  # L2 penalty (adam) or decoupled decay (adamw)
    # noam: the paper's d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), rescaled
    # so that it peaks at lr (at step warmup_steps); inverse_sqrt: linear warm-up to
    # lr, then lr * sqrt(warmup / step) (the same curve); constant: lr throughout
    schedule: Literal["noam", "inverse_sqrt", "constant"] = "noam"
    lr: float = 7e-4  # the peak learning rate, for every schedule
    warmup_steps: int = 4000  # updates until the rate peaks at lr
    cooldown_steps: int = 0  # last updates before max_steps: rate falls linearly to 0
    label_smoothing: float = 0.1  # probability mass spread over the vocabulary
    # target positions whose logits the loss reduces at a time: its float32
    # temporaries are loss_chunk_rows x vocabulary, never batch x vocabulary
    loss_chunk_rows: int = 4096
    clip_grad_norm: float = 0.0  # largest gradient norm; 0 = no clipping
    accumulate: int = 1  # batches per update
    max_steps: int = 100_000  # updates, then a last validation and stop
    max_epochs: int = 0  # epochs before stopping; 0 = no limit
    # stop after this many minutes of updates (state.train_seconds: validation and
    # checkpoint writes not counted, every sitting of a resumed run counted);
    # 0 = no limit. The last update is followed by a validation, as at max_steps.
    max_minutes: float = 0.0
    log_every: int = 50  # steps between metrics.jsonl rows
    log_seconds: float = 30.0  # seconds between progress lines when not on a terminal
    validate_every: int = 1000  # updates between validations (and checkpoints)
    save_every: int = 0  # step checkpoints; 0 = only at validation
    keep_last: int = 5  # step checkpoints kept
    # which validation score picks best.pt (and counts for patience)
    best_metric: Literal["bleu", "chrf", "loss", "accuracy"] = "bleu"
    # with data.pairs: the direction ("de-en") whose best_metric picks best.pt
    # (null: the mean over directions)
    best_direction: str | None = None
    patience: int = 0  # validations without improvement before stopping; 0 = never
    valid_bleu: bool = True  # greedy-decode the validation set for BLEU / chrF
    max_nonfinite: int = 5  # consecutive skipped (non-finite) updates before stopping
    resume: Literal["auto", "never"] = "auto"  # auto: continue from run_dir/last.pt
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
    # fine-tuning: a new run starts from this checkpoint's weights and tokenizer
    # (or a transformers MarianMT folder's, or a Hub name's), with a fresh
    # optimizer, schedule and data position (a run dir that already holds last.pt
    # resumes instead); its architecture must match model
    init_from: str | None = None
    init_weights: Literal["raw", "ema"] = "raw"  # which of init_from's weights

    def validate(self, prefix: str = "training") -> None:
        check(
            not self.overwrite or self.resume == "never",
            f"{prefix}.overwrite",
            self.overwrite,
            f"deletes a run, so it needs {prefix}.resume=never (or pass --overwrite)",
        )
        check(
            0.0 <= self.label_smoothing < 1.0,
            f"{prefix}.label_smoothing",
            self.label_smoothing,
            "must be in [0, 1)",
        )
        check(self.lr > 0, f"{prefix}.lr", self.lr, "must be positive")
        for name in ("lr", "eps", "weight_decay"):  # inf would train NaN weights
            value = getattr(self, name)
            check(math.isfinite(value), f"{prefix}.{name}", value, "must be finite")
        for name in (
            "accumulate",
            "loss_chunk_rows",
            "max_steps",
            "log_every",
            "validate_every",
            "max_nonfinite",
        ):
            value = getattr(self, name)
            check(value >= 1, f"{prefix}.{name}", value, "must be at least 1")
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
            check(value >= 0, f"{prefix}.{name}", value, "must not be negative")
        check(
            self.schedule != "noam" or self.warmup_steps > 0,
            f"{prefix}.warmup_steps",
            self.warmup_steps,
            "the noam schedule needs warmup_steps > 0",
        )
        check(
            self.cooldown_steps <= self.max_steps,
            f"{prefix}.cooldown_steps",
            self.cooldown_steps,
            f"must not exceed training.max_steps ({self.max_steps})",
        )
        check(
            all(0.0 <= b < 1.0 for b in self.betas),
            f"{prefix}.betas",
            self.betas,
            "must be in [0, 1)",
        )
        check(
            self.max_minutes >= 0,
            f"{prefix}.max_minutes",
            self.max_minutes,
            "must not be negative",
        )
        for name in ("dist_timeout", "prepare_timeout", "log_seconds"):
            value = getattr(self, name)
            check(value > 0, f"{prefix}.{name}", value, "must be positive")
        check(
            0.0 <= self.ema_decay < 1.0,
            f"{prefix}.ema_decay",
            self.ema_decay,
            "must be in [0, 1)",
        )
        check(
            not self.validate_ema or self.ema_decay > 0,
            f"{prefix}.validate_ema",
            self.validate_ema,
            f"needs {prefix}.ema_decay > 0 (the EMA is off)",
        )
        check(
            self.init_from is None or bool(self.init_from.strip()),
            f"{prefix}.init_from",
            self.init_from,
            "must be a checkpoint path (or null)",
        )
        check(
            self.init_weights == "raw" or self.init_from is not None,
            f"{prefix}.init_weights",
            self.init_weights,
            f"needs {prefix}.init_from",
        )
        check(
            self.device == "auto"
            or self.device == "cpu"
            or self.device.startswith("cuda"),
            f"{prefix}.device",
            self.device,
            "must be auto, cpu, cuda or cuda:N",
        )


@dataclass
class Config:
    """A whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=TransformerConfig)
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
        check(
            d.max_length < m.max_positions,
            "data.max_length",
            d.max_length,
            f"must be below model.max_positions={m.max_positions} "
            "(a sequence also holds <bos> or <eos>)",
        )
        check(
            m.arch != "decoder_only" or 2 * d.max_length + 2 <= m.max_positions,
            "data.max_length",
            d.max_length,
            f"a decoder_only model reads source and target in one sequence: "
            f"2 * data.max_length + 2 must be at most model.max_positions="
            f"{m.max_positions}",
        )
        check(
            self.decoding.min_len < m.max_positions,
            "decoding.min_len",
            self.decoding.min_len,
            f"must be below model.max_positions={m.max_positions}: no output "
            "can be that long",
        )
        check(
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
            check(
                refusal is None or not value,
                key,
                value,
                f"is not supported for model.arch: {m.arch} ({refusal})",
            )
        check(
            t.best_direction is None or t.best_direction in d.pairs,
            "training.best_direction",
            t.best_direction,
            f"must be one of data.pairs ({', '.join(d.pairs) or 'none given'})",
        )
        check(
            not d.pairs or d.tokenizer.joint,
            "data.pairs",
            d.pairs,
            "several directions need one joint tokenizer (data.tokenizer.joint: "
            "true) that holds every language and its tag",
        )
        check(
            d.tokenizer.joint or d.tokenizer.vocab or not m.tie_src_tgt_embeddings,
            "model.tie_src_tgt_embeddings",
            True,
            "needs a joint tokenizer (data.tokenizer.joint: true, or one "
            "data.tokenizer.vocab); set it to false for separate vocabularies",
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
