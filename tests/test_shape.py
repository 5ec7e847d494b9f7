"""The code's shape: no import cycle, no decoding front end that loads the
training loop, no private name used across modules (``scripts/import_graph.py``),
and the loaded config left as it was read."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny
from transformer.training import Trainer

sys.path.insert(0, str(ROOT / "scripts"))
import import_graph  # noqa: E402


def test_the_import_graph_keeps_its_rules(capsys):
    assert import_graph.main([]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "cycles: 0; front ends reaching transformer.training: 0" in out


def test_the_rules_find_what_they_forbid(tmp_path, monkeypatch, capsys):
    """A copy of the package with a cycle, a front end importing training and a
    private import is refused, each named."""
    package = tmp_path / "transformer"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from transformer.b import _hidden\n")
    (package / "b.py").write_text("def f():\n    from transformer import a\n")
    (package / "training").mkdir()
    (package / "training" / "__init__.py").write_text("")
    (package / "plots.py").write_text("import transformer.training\n")
    monkeypatch.setattr(import_graph, "ROOT", tmp_path)
    assert import_graph.main([]) == 1
    out = capsys.readouterr().out
    assert "cycle: transformer.a <-> transformer.b" in out
    assert "transformer.plots reaches transformer.training" in out
    assert "private import: transformer.a imports transformer.b._hidden" in out


@pytest.mark.slow
def test_translating_does_not_import_the_training_loop():
    code = (
        "import sys, transformer.cli.translate, transformer.cli.evaluate, "
        "transformer.serve, transformer.export, transformer.inference; "
        "print(sorted(m for m in sys.modules if m.startswith('transformer.train')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_training_leaves_the_loaded_config_as_it_was(tmp_path, toy_tokenizer):
    cfg = tiny(tmp_path / "run", toy_tokenizer, "training.max_steps=2")
    cfg.data.cache_dir = None  # the default: <run_dir>/cache, derived by the run
    loaded = copy.deepcopy(cfg)
    trainer = Trainer(cfg, resume=False)
    trainer.train()
    assert cfg == loaded
    resolved = trainer.cfg  # derived values live in the run's resolved copy
    assert resolved.data.cache_dir == str(tmp_path / "run" / "cache")
    assert resolved.model.src_vocab_size == trainer.tokenizer.src_vocab_size > 0
    assert cfg.model.src_vocab_size == 0
