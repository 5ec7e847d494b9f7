"""Typed experiment configuration: YAML in, validated nested dataclasses out.

One YAML file holds a whole experiment in four sections (``data``, ``model``,
``training``, ``decoding``). ``load_config`` rejects unknown keys (suggesting the
nearest valid one), wrong types and out-of-range values, each with its dotted key.
"""

from transformer.config.base import BOS_ID, EOS_ID, PAD_ID, UNK_ID, ConfigError
from transformer.config.coerce import REMOVED_KEYS, build_dataclass
from transformer.config.data import CorpusConfig, DataConfig, TokenizerConfig
from transformer.config.decoding import DecodingConfig
from transformer.config.loading import (
    config_from_dict,
    load_config,
    migrate,
    parse_overrides,
    read_yaml,
    save_config,
)
from transformer.config.model import (
    ARCHITECTURES,
    DecoderOnlyConfig,
    ModelConfig,
    RNNConfig,
    TransformerConfig,
    model_config,
)
from transformer.config.sections import Config, TrainingConfig

__all__ = [
    "ARCHITECTURES",
    "DecoderOnlyConfig",
    "RNNConfig",
    "TransformerConfig",
    "model_config",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "REMOVED_KEYS",
    "UNK_ID",
    "Config",
    "ConfigError",
    "CorpusConfig",
    "DataConfig",
    "DecodingConfig",
    "ModelConfig",
    "TokenizerConfig",
    "TrainingConfig",
    "build_dataclass",
    "config_from_dict",
    "load_config",
    "migrate",
    "parse_overrides",
    "read_yaml",
    "save_config",
]
