"""A distilled student against its teachers (``python scripts/benchmark.py
student``): the teacher ensemble's beam search, as it made the distilled training
set, against the student decoding the same sentences with the same threads:
greedy and beam in float32, bf16 (where the CPU has it) and int8 in this toolkit,
and greedy from its CTranslate2 int8 export in a process of its own (as a user
runs it, ``scripts/bench_ct2.py``); BLEU of each, and the size of each on disk.

    python scripts/benchmark.py student --split val \\
        --teachers models/multi30k_de_en_tiny_a.safetensors \\
            models/multi30k_de_en_tiny_b.safetensors --teacher-beam 5 \\
        --teacher-alpha 2.0 --student models/multi30k_de_en_student.safetensors

The default split is val: speed needs no test set, and test_2016_flickr stays
decoded once per results row (``scripts/results.py``).
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import torch
from bench_common import machine, timed

from transformer.allocator import reuse_freed_memory
from transformer.config import DecodingConfig


def add_parser(sub) -> None:
    p = sub.add_parser("student", help="a distilled student against its teachers")
    p.add_argument("--teachers", nargs="+", required=True, help="the ensemble")
    p.add_argument("--teacher-beam", type=int, default=5)
    p.add_argument("--teacher-alpha", type=float, default=2.0)
    p.add_argument("--student", required=True)
    p.add_argument("--student-beam", type=int, default=5)
    p.add_argument("--student-alpha", type=float, default=2.0)
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=0, help="first N sentences only")
    p.add_argument("--data-dir", help="override the student's data.dir")
    p.add_argument("--threads", type=int, default=2, help="0: torch's default")
    p.add_argument("--no-ctranslate2", action="store_true")


def size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def bench_student(args) -> dict:
    from bench_decode import ctranslate2_available, ctranslate2_process

    from transformer.data import read_pairs
    from transformer.inference import load_ensemble, load_model, set_precision
    from transformer.precision import native_bf16

    reuse_freed_memory(single_arena=False)  # as Translator.load, for the CLIs
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    student, cfg, tokenizer, _ = load_model(args.student, device)
    if args.data_dir:
        cfg.data.dir = args.data_dir
    pairs = list(read_pairs(cfg.data, args.split))[: args.limit or None]
    sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    lengths = {"max_len_a": cfg.decoding.max_len_a, "max_len_b": cfg.decoding.max_len_b}
    greedy = DecodingConfig(strategy="greedy", **lengths)
    beam = DecodingConfig(
        strategy="beam",
        beam_size=args.student_beam,
        length_penalty=args.student_alpha,
        **lengths,
    )
    rows: dict[str, dict] = {}

    teachers, _, teacher_tok, _ = load_ensemble(args.teachers, device)
    key = f"teachers_beam{args.teacher_beam}"
    rows[key] = timed(
        teachers,
        teacher_tok,
        sources,
        refs,
        DecodingConfig(
            strategy="beam",
            beam_size=args.teacher_beam,
            length_penalty=args.teacher_alpha,
            **lengths,
        ),
        device,
    )
    rows[key]["mib"] = sum(size_mib(Path(p)) for p in args.teachers)
    logging.info("%s: %.1f sentences/s", key, rows[key]["sentences_per_s"])
    del teachers

    student_mib = size_mib(Path(args.student))
    if ctranslate2_available(args):  # exported before any cast of the student
        from transformer.export import export_model

        with tempfile.TemporaryDirectory(prefix="bench-student-") as tmp:
            export = Path(tmp) / "int8"
            export_model(student, tokenizer, export, "int8")
            row = ctranslate2_process(export, sources, refs, greedy, Path(tmp))
            rows["student_ct2_int8_greedy"] = {**row, "mib": size_mib(export)}
            logging.info(
                "student_ct2_int8_greedy: %.1f sentences/s",
                rows["student_ct2_int8_greedy"]["sentences_per_s"],
            )
    precisions = ["fp32", "int8"] + (["bf16"] if native_bf16(device) else [])
    for precision in precisions:  # bf16 casts the loaded weights: last
        model = copy.deepcopy(student) if precision == "int8" else student
        set_precision(model, precision)
        for name, dcfg in (("greedy", greedy), (f"beam{args.student_beam}", beam)):
            key = f"student_{precision}_{name}"
            rows[key] = timed(model, tokenizer, sources, refs, dcfg, device)
            rows[key]["mib"] = student_mib
            logging.info("%s: %.1f sentences/s", key, rows[key]["sentences_per_s"])
    ensemble = rows[f"teachers_beam{args.teacher_beam}"]["seconds"]
    for row in rows.values():
        row["speedup_over_teachers"] = ensemble / row["seconds"]
    return {
        "benchmark": "student",
        "split": args.split,
        "sentences": len(sources),
        "threads": torch.get_num_threads(),
        "teachers": list(args.teachers),
        "teacher_search": {"beam": args.teacher_beam, "alpha": args.teacher_alpha},
        "student": args.student,
        "runs": rows,
        "machine": machine(),
    }
