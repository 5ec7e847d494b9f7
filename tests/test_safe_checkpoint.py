"""Checkpoints as safetensors files (``transformer.safe_checkpoint``): no pickle,
the same checkpoint back, damage and foreign files refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_model
from transformer.checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    save_weights_file,
)
from transformer.cli.train import average_main
from transformer.cli.translate import translate_main
from transformer.config import Config, DecodingConfig
from transformer.inference import load_model, translate
from transformer.safe_checkpoint import is_safetensors
from transformer.state_dicts import tied_names


@pytest.fixture
def checkpoint(tmp_path, tokenizer):
    """A training checkpoint (optimizer state included) of a small model with
    tied embeddings, a logits bias and an EMA."""
    model = tiny_model(
        src_vocab_size=tokenizer.src_vocab_size,
        tgt_vocab_size=tokenizer.tgt_vocab_size,
        final_logits_bias=True,
    )
    torch.nn.init.normal_(model.final_logits_bias)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.tensor([[5, 6, 3]]), torch.tensor([[2, 7]])).sum().backward()
    optimizer.step()
    path = tmp_path / "last.pt"
    atomic_save(
        {
            "format": 2,
            "model": model.state_dict(),
            "ema": model.state_dict(),
            "config": Config(model=model.cfg).to_dict(),
            "tokenizer": tokenizer.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": 7,
        },
        path,
    )
    return path


def test_a_weights_file_comes_back_as_written(checkpoint, tmp_path):
    out = tmp_path / "w.safetensors"
    assert average_main(["--inputs", str(checkpoint), "--output", str(out),
                         "--weights-only", "--half"]) == 0  # fmt: skip
    assert is_safetensors(out) and not is_safetensors(checkpoint)
    original = load_checkpoint(checkpoint)
    back = load_checkpoint(out)
    assert back["step"] == 7 and back["averaged_from"] == [str(checkpoint)]
    assert back["config"] == original["config"]
    assert back["model"].keys() == original["model"].keys()
    for name, value in original["model"].items():
        assert back["model"][name].dtype == torch.float16
        assert torch.equal(back["model"][name], value.half()), name
    # tied embeddings are stored once and come back as one tensor
    assert tied_names(back["model"]) == {"src_embed.weight": "tgt_embed.weight"}
    for key, value in original["tokenizer"].items():
        assert torch.equal(back["tokenizer"][key], value)
    # and it decodes as the .pt file of the same weights does
    half_pt = tmp_path / "w.pt"
    assert average_main(["--inputs", str(checkpoint), "--output", str(half_pt),
                         "--weights-only", "--half"]) == 0  # fmt: skip
    a, _, tok, _ = load_model(out)
    b = load_model(half_pt)[0]
    for name, value in b.state_dict().items():
        assert torch.equal(a.state_dict()[name], value), name
    cfg = DecodingConfig(strategy="greedy")
    cpu = torch.device("cpu")
    texts = ["das ist satz nummer 3", "mit vielen wörtern"]
    assert [t[0].tokens for t in translate(a, tok, texts, cfg, cpu)] == [
        t[0].tokens for t in translate(b, tok, texts, cfg, cpu)
    ]
    assert translate_main(["--checkpoint", str(out), "-s", texts[0]]) == 0


def test_a_training_checkpoint_is_refused(checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="'optimizer' entry holds nested"):
        save_weights_file(load_checkpoint(checkpoint), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_damaged_and_foreign_files_are_one_line(checkpoint, tmp_path, capsys):
    good = tmp_path / "w.safetensors"
    save_weights_file(
        {k: v for k, v in load_checkpoint(checkpoint).items() if k != "optimizer"},
        good,
    )
    data = bytearray(good.read_bytes())
    damaged = tmp_path / "damaged.safetensors"
    data[-100] ^= 0x10  # a bit of a weight
    damaged.write_bytes(bytes(data))
    assert translate_main(["--checkpoint", str(damaged), "-s", "a"]) == 2
    assert "damaged: its tensors do not match the SHA-256" in error_line(capsys)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    assert translate_main(["--checkpoint", str(cut), "-s", "a"]) == 2
    assert "not a readable safetensors file" in error_line(capsys)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    assert translate_main(["--checkpoint", str(foreign), "-s", "a"]) == 2
    assert "no checkpoint of this toolkit" in error_line(capsys)
    header = json.loads(good.read_bytes()[8 : 8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"]["format"] == "transformer-nmt checkpoint"


def test_a_moved_pt_name_points_at_the_safetensors_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"did you mean .*model\.safetensors"):
        load_checkpoint(tmp_path / "model.pt")
