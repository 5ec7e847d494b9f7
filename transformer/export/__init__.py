"""Export to CTranslate2, and translation with an exported model.

``transformer-export --checkpoint C --output DIR [--quantization int8]`` writes a
CTranslate2 model directory (``model.bin``, ``config.json``, the vocabularies), the
checkpoint's SentencePiece model(s) and ``export.json``, which says how the export is
meant to be used (``writer``). ``ExportedModel`` / ``translate_with_ctranslate2``
translate raw sentences with it, with this toolkit's search settings (``runtime``).
``ctranslate2`` is imported only when used: ``pip install -e ".[export]"``.
``--format hf`` writes a transformers MarianMT folder instead
(``transformer.hf.exporting``; ``pip install -e ".[hf]"``).
"""

from transformer.export.common import (
    EXPORT_INFO,
    INSTALL_HINT,
    ExportError,
    import_ctranslate2,
)
from transformer.export.runtime import ExportedModel, translate_with_ctranslate2
from transformer.export.writer import (
    build_spec,
    export_checkpoint,
    export_model,
    main,
    quantizations,
)

__all__ = [
    "EXPORT_INFO",
    "INSTALL_HINT",
    "ExportError",
    "ExportedModel",
    "build_spec",
    "export_checkpoint",
    "export_model",
    "import_ctranslate2",
    "main",
    "quantizations",
    "translate_with_ctranslate2",
]
