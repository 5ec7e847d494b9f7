"""The command-line front ends, one module per command (``pyproject.toml`` names
each entry point): ``train`` (transformer-train, -preprocess, -average),
``evaluate`` (transformer-eval), ``translate`` (transformer-translate), ``score``
(transformer-score), with the decoding options they share in ``options`` and the
error handling of every command in ``common``. Export and serving have their own
packages."""
