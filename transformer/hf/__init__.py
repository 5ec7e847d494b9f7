"""Hugging Face interop: transformers' MarianMT models in and out.

- ``marian``: the exact map between our Transformer's weights and MarianMT's.
- ``importing``: a MarianMT folder (or a Hub name) read as a checkpoint of ours,
  so that every command that loads a checkpoint takes one.
- ``exporting``: ``transformer-export --format hf``, a folder that
  ``MarianMTModel.from_pretrained`` and ``pipeline("translation")`` load, with
  its model card.

``transformers`` is imported only by the export (``pip install -e ".[hf]"``);
importing needs ``safetensors`` (a core dependency) and, for a Hub name,
``huggingface_hub``.
"""
