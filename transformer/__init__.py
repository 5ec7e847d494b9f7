"""A readable, fast encoder-decoder Transformer for neural machine translation."""

from transformer.config import Config, ModelConfig, load_config
from transformer.models import Transformer

__all__ = ["Config", "ModelConfig", "Transformer", "load_config"]
__version__ = "0.1.0"
