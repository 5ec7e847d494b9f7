"""The ``model`` section: the fields every architecture shares (``ModelConfig``)
and one subclass per architecture holding its own.

``model.arch`` picks the class when a config is read, so an option of one
architecture cannot be set on another (an error names the architecture it
belongs to), and a new architecture adds its own class, with its own checks,
beside these without editing them. Configs written before the split (one flat
section with every architecture's keys) read unchanged: the keys of the chosen
architecture are the same, and a checkpoint's stored keys of the others are
dropped by ``transformer.config.migrate``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from transformer.config.base import PAD_ID, ConfigError, check

Arch = Literal["transformer", "rnn", "decoder_only"]


@dataclass
class ModelConfig:
    """What every architecture shares. Build one with ``model_config(**values)``
    or through ``load_config``; ``arch`` decides the subclass.

    Vocabulary sizes of 0 are filled in from the tokenizer before the model is built.
    """

    # transformer: the paper's encoder-decoder; rnn: a bidirectional LSTM/GRU
    # encoder and an attentional decoder; decoder_only: one causal Transformer
    # over "source <eos> <bos> target" (GPT-style)
    arch: Arch = "transformer"
    src_vocab_size: int = 0  # source pieces; 0 = the tokenizer's
    tgt_vocab_size: int = 0  # target pieces; 0 = the tokenizer's
    d_model: int = 512  # width of the embeddings and of every layer's output
    decoder_layers: int = 6  # layers of the decoder (the decoder_only stack)
    dropout: float = 0.1  # dropout on embeddings and sublayer outputs
    max_positions: int = 1024  # longest sequence (with <bos> / <eos>) it can read
    tie_src_tgt_embeddings: bool = True  # one embedding table (a joint vocabulary)
    # the output projection reuses the target embedding table
    tie_output_embeddings: bool = True
    pad_id: int = PAD_ID  # the id of <pad>, masked everywhere

    @staticmethod
    def variant(values: dict[str, Any], key: str = "model") -> type[ModelConfig]:
        """The class of ``values['arch']`` (default transformer); a key that only
        another architecture has is an error naming that architecture."""
        arch = values.get("arch", "transformer")
        if arch not in ARCHITECTURES:
            choices = ", ".join(map(repr, ARCHITECTURES))
            raise ConfigError(f"{key}.arch: must be one of {choices} (got {arch!r})")
        cls = ARCHITECTURES[arch]
        mine = {f.name for f in dataclasses.fields(cls)}
        foreign = [k for k in values if k not in mine and k in foreign_keys()]
        if foreign:
            raise ConfigError(
                "\n".join(
                    f"{key}.{k}: an option of model.arch {foreign_keys()[k]}, not of "
                    f"{arch}"
                    for k in foreign
                )
            )
        return cls

    @staticmethod
    def kinds() -> dict[tuple[str, str], type[ModelConfig]]:
        """(key, value) -> the class it picks: ``("arch", "rnn")``: RNNConfig."""
        return {("arch", arch): cls for arch, cls in ARCHITECTURES.items()}

    def max_pieces(self) -> int:
        """Pieces a source (or target) sentence may hold: one position is kept
        for <eos> / <bos>."""
        return self.max_positions - 1

    def compile_refusal(self) -> str | None:
        """Why ``torch.compile`` (training or decoding) is refused for this
        architecture; None where it is not."""
        return None

    def validate(self, prefix: str = "model") -> None:
        for name in ("d_model", "max_positions"):
            value = getattr(self, name)
            check(value > 0, f"{prefix}.{name}", value, "must be positive")
        check(
            self.decoder_layers >= 1,
            f"{prefix}.decoder_layers",
            self.decoder_layers,
            "must be at least 1",
        )
        check(
            0.0 <= self.dropout < 1.0,
            f"{prefix}.dropout",
            self.dropout,
            "must be in [0, 1)",
        )
        for name in ("src_vocab_size", "tgt_vocab_size"):
            value = getattr(self, name)
            check(value >= 0, f"{prefix}.{name}", value, "must not be negative")
        if self.src_vocab_size and self.tgt_vocab_size:
            check(
                not self.tie_src_tgt_embeddings
                or self.src_vocab_size == self.tgt_vocab_size,
                f"{prefix}.tie_src_tgt_embeddings",
                True,
                "needs equal source and target vocabularies "
                f"({self.src_vocab_size} != {self.tgt_vocab_size}); "
                "use a joint tokenizer or set it to false",
            )
            check(
                0 <= self.pad_id < min(self.src_vocab_size, self.tgt_vocab_size),
                f"{prefix}.pad_id",
                self.pad_id,
                "must be a valid token id",
            )


@dataclass
class _AttentionStack(ModelConfig):
    """The fields of the Transformer's layers, shared by both attention models."""

    n_heads: int = 8  # attention heads; d_model must be divisible by it
    d_ff: int = 2048  # width of the feed-forward sublayer
    attention_dropout: float = 0.0  # dropout on the attention weights
    activation: Literal["relu", "gelu", "silu"] = "relu"  # of the feed-forward
    norm_first: bool = False  # False: post-norm as in the paper; True: pre-norm
    # sinusoidal: the paper's fixed positions; learned: a trained table
    positional: Literal["sinusoidal", "learned"] = "sinusoidal"

    def validate(self, prefix: str = "model") -> None:
        super().validate(prefix)
        for name in ("n_heads", "d_ff"):
            value = getattr(self, name)
            check(value > 0, f"{prefix}.{name}", value, "must be positive")
        check(
            self.d_model % self.n_heads == 0,
            f"{prefix}.d_model",
            self.d_model,
            f"must be divisible by {prefix}.n_heads={self.n_heads}",
        )
        check(
            0.0 <= self.attention_dropout < 1.0,
            f"{prefix}.attention_dropout",
            self.attention_dropout,
            "must be in [0, 1)",
        )


@dataclass
class TransformerConfig(_AttentionStack):
    """``model.arch: transformer``: the paper's encoder-decoder."""

    arch: Literal["transformer"] = "transformer"
    encoder_layers: int = 6  # layers of the encoder
    # a fixed bias added to every output logit (a buffer, not trained, as in
    # transformers' MarianMT, whose models bring theirs); false: no bias
    final_logits_bias: bool = False

    def validate(self, prefix: str = "model") -> None:
        super().validate(prefix)
        check(
            self.encoder_layers >= 1,
            f"{prefix}.encoder_layers",
            self.encoder_layers,
            "must be at least 1",
        )


@dataclass
class DecoderOnlyConfig(_AttentionStack):
    """``model.arch: decoder_only``: one causal stack of ``decoder_layers`` over
    source and target."""

    arch: Literal["decoder_only"] = "decoder_only"

    def max_pieces(self) -> int:
        """Source and target share the positions: each may hold half."""
        return self.max_positions // 2 - 1


@dataclass
class RNNConfig(ModelConfig):
    """``model.arch: rnn``: a bidirectional LSTM/GRU encoder (``d_model``-wide
    embeddings) and an attentional decoder with input feeding."""

    arch: Literal["rnn"] = "rnn"
    encoder_layers: int = 6  # layers of the bidirectional encoder
    rnn_type: Literal["lstm", "gru"] = "lstm"  # the recurrent cell
    rnn_hidden: int = 512  # decoder state; each encoder direction has half
    # none: the fixed-vector model (the decoder starts from the final encoder
    # state and sees nothing else); soft: a weighted sum of encoder states; hard:
    # one encoder state, sampled from the weights in training (Gumbel-softmax,
    # straight-through) and the argmax at inference
    attention: Literal["none", "soft", "hard"] = "soft"
    # how a decoder state scores an encoder state: Bahdanau's additive, Luong's
    # dot product or general (bilinear)
    attention_score: Literal["additive", "dot", "general"] = "additive"
    gumbel_temperature: float = 1.0  # hard attention's Gumbel-softmax temperature

    def compile_refusal(self) -> str | None:
        return (
            "its decoder is a Python loop over time steps: one graph per target length"
        )

    def validate(self, prefix: str = "model") -> None:
        super().validate(prefix)
        check(
            self.encoder_layers >= 1,
            f"{prefix}.encoder_layers",
            self.encoder_layers,
            "must be at least 1",
        )
        check(
            self.rnn_hidden > 0 and self.rnn_hidden % 2 == 0,
            f"{prefix}.rnn_hidden",
            self.rnn_hidden,
            "must be positive and even (each encoder direction has half)",
        )
        check(
            self.gumbel_temperature > 0,
            f"{prefix}.gumbel_temperature",
            self.gumbel_temperature,
            "must be positive",
        )


ARCHITECTURES: dict[str, type[ModelConfig]] = {
    "transformer": TransformerConfig,
    "rnn": RNNConfig,
    "decoder_only": DecoderOnlyConfig,
}


def foreign_keys() -> dict[str, str]:
    """Each architecture-specific key -> the architectures that have it."""
    common = {f.name for f in dataclasses.fields(ModelConfig)}
    owners: dict[str, list[str]] = {}
    for arch, cls in ARCHITECTURES.items():
        for f in dataclasses.fields(cls):
            if f.name not in common:
                owners.setdefault(f.name, []).append(arch)
    return {key: " or ".join(archs) for key, archs in owners.items()}


def model_config(**values: Any) -> ModelConfig:
    """The model config of ``values['arch']`` (default transformer) from keyword
    values, unchecked (``validate()`` checks)."""
    return ModelConfig.variant(values)(**values)


def own_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """A stored ``model`` section without the keys its architecture does not have
    (configs saved before the split held every architecture's)."""
    cls = ModelConfig.variant({"arch": tree.get("arch", "transformer")})
    mine = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in tree.items() if k in mine or k not in foreign_keys()}
