"""Sequence-level distillation end to end on a toy task: a teacher translates the
training sources with transformer-translate-corpus, a student trains on that
output alone (``synthetic: distilled``), and the student then reproduces the
teacher's translations of sentences neither saw, not the corpus's references."""

from __future__ import annotations

import pytest

from tests.conftest import tiny, write
from transformer.cli.corpus import main as translate_corpus
from transformer.config import DataConfig
from transformer.data import read_pairs
from transformer.inference import Translator
from transformer.training import Trainer

pytestmark = pytest.mark.slow

# short sentences of few letters and a wider model, learnt in a few hundred
# updates; float32 on every CPU (auto would pick bf16 on some), so runs agree
TOY = ["data.toy_vocab=8", "data.toy_max_len=6", "data.toy_train_size=300"]
EASY = [*TOY, "model.d_model=64", "model.d_ff=128", "model.dropout=0.0"]
EASY += ["training.max_steps=400", "training.lr=0.005", "training.precision=fp32"]


def outputs(checkpoint, sources: list[str]) -> list[str]:
    translator = Translator.load([checkpoint], "cpu")
    dcfg = translator.decoding({"strategy": "greedy"})
    return [hyps[0].text for hyps in translator.translate(sources, dcfg)]


def test_a_student_reproduces_its_teachers_outputs(tmp_path, toy_tokenizer, capsys):
    # the teacher copies its source; the corpus's own references reverse it, so
    # a student that copies learned from the teacher's output, not the corpus
    teacher_run = tmp_path / "teacher"
    teacher = tiny(teacher_run, toy_tokenizer, "data.format=copy", *EASY)
    Trainer(teacher).train()
    teacher_ckpt = teacher_run / "last.pt"

    train = list(
        read_pairs(
            DataConfig(
                format="reverse", toy_vocab=8, toy_max_len=6, toy_train_size=300
            ),
            "train",
        )
    )
    held_out = [
        s
        for s, _ in read_pairs(
            DataConfig(format="reverse", toy_vocab=8, toy_max_len=6, toy_valid_size=60),
            "val",
        )
    ]
    references = [" ".join(reversed(s.split())) for s in held_out]
    distilled = tmp_path / "distilled"
    distilled.mkdir()
    write(distilled / "train.de", [s for s, _ in train])
    assert (
        translate_corpus(
            [
                "--checkpoint",
                str(teacher_ckpt),
                "--greedy",
                "--input",
                str(distilled / "train.de"),
                "--output",
                str(distilled / "train.en"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    lines = (distilled / "train.en").read_text().splitlines()
    assert len(lines) == len(train)
    # validation: the teacher's output too (a student is chosen against it here)
    write(distilled / "val.de", held_out[:20])
    write(distilled / "val.en", outputs(teacher_ckpt, held_out[:20]))

    student_run = tmp_path / "student"
    student = tiny(
        student_run,
        toy_tokenizer,
        "data.format=text",
        f"data.dir={distilled}",
        f"data.train=[{{dir: {distilled}, synthetic: distilled}}]",
        *EASY,
        "training.max_steps=1000",
        "training.seed=7",
    )
    Trainer(student).train()

    taught = outputs(teacher_ckpt, held_out)
    learned = outputs(student_run / "last.pt", held_out)
    same = sum(t == s for t, s in zip(taught, learned, strict=True))
    reversing = sum(r == s for r, s in zip(references, learned, strict=True))
    assert same >= 0.65 * len(held_out), (same, len(held_out))
    assert reversing < 0.2 * len(held_out), reversing
