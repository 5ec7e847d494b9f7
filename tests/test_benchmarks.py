"""The benchmark scripts' own arithmetic (the timed runs themselves are not tests)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench_quality import crossing, with_other_targets  # noqa: E402


def test_time_to_quality_is_the_first_crossing_in_update_and_wall_minutes():
    t0 = 1000.0
    rows = [
        {"type": "train", "step": 1, "time": t0 + 2.0, "train_seconds": 2.0},
        {"type": "valid", "step": 100, "time": t0 + 130.0, "bleu": 20.0,
         "train_seconds": 120.0},
        {"type": "valid", "step": 200, "time": t0 + 270.0, "bleu": 27.5,
         "train_seconds": 240.0},
        {"type": "valid", "step": 300, "time": t0 + 400.0, "bleu": 29.0,
         "train_seconds": 360.0},
    ]  # fmt: skip
    got = crossing(rows, 27.0)
    assert got == {
        "step": 200,
        "bleu": 27.5,
        "update_minutes": 4.0,
        "wall_minutes": 4.5,  # from the first update, validations included
    }
    assert crossing(rows, 30.0) is None


def test_each_training_window_is_set_against_the_product_timed_after_it():
    from bench_train import fraction_by_window, measured_windows

    # the first window (warm-up) left out; each other paired with the burst after it
    rates, bursts = measured_windows(
        [100.0, 1000.0, 2000.0, 4000.0], [9.0, 2.0, 4.0, 1.0]
    )
    assert rates == [1000.0, 2000.0, 4000.0] and bursts == [2.0, 4.0, 1.0]
    # 1e6 FLOPs a token: 1, 2 and 4 GFLOP/s against 2, 4 and 1 (misaligned: median 1)
    assert fraction_by_window(rates, bursts, 1e6) == pytest.approx(0.5)
    # one window is measured as it is; a run too short for a window has no burst
    assert measured_windows([500.0], [2.0]) == ([500.0], [2.0])
    assert fraction_by_window(*measured_windows([500.0], []), 1e6) is None


def test_a_quality_row_replaces_its_targets_row_and_keeps_the_others(tmp_path):
    path = tmp_path / "quality.json"
    old = {"benchmark": "quality", "target_bleu": 27.0, "command": "a"}
    path.write_text(json.dumps(old))  # the layout before rows: one run
    first = with_other_targets(path, {"target_bleu": 40.0, "command": "b"})
    assert [r["command"] for r in first["rows"]] == ["a", "b"]
    path.write_text(json.dumps(first))
    second = with_other_targets(path, {"target_bleu": 40.0, "command": "c"})
    assert [r["command"] for r in second["rows"]] == ["a", "c"]
    fresh = with_other_targets(tmp_path / "none.json", {"target_bleu": 27.0})
    assert fresh == {"benchmark": "quality", "rows": [{"target_bleu": 27.0}]}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["decode", "--checkpoint", "none.pt"], "none.pt: checkpoint not found"),
        (["decode", "--checkpoint", "x.pt", "--threads", "-3"], "--threads: must be"),
        (["compare", "--lanes", "0"], "--lanes: must be > 0 (got 0)"),
        (["quality", "--minutes", "-1"], "--minutes: must be > 0"),
        (["train", "--updates", "-5"], "--updates: must be > 0"),
        (["decode", "--checkpoint", "x.pt", "--device", "foo"], "is not a device"),
    ],
)
def test_bad_benchmark_options_are_one_line_errors(argv, message, capsys):
    import benchmark

    assert benchmark.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_step_products_are_recorded_and_timed_with_their_own_shapes():
    import torch
    from bench_common import products_alone, recorded_products

    layer = torch.nn.Linear(16, 8)
    x = torch.randn(32, 16, requires_grad=True)

    def step():
        layer(x).square().sum().backward()

    calls = recorded_products(step)
    # forward x W^T + b; backward: the input's gradient and the weight's
    assert len(calls) == 3
    assert calls[0][0] == torch.ops.aten.addmm.default
    shapes = sorted(
        tuple(shape for shape, _, _ in operands)[-2:] for _, operands in calls
    )
    assert shapes == sorted(
        [((32, 16), (16, 8)), ((32, 8), (8, 16)), ((8, 32), (32, 16))]
    )
    assert any(stride[0] == 1 for _, ops in calls for _, stride, _ in ops)  # transposed
    flops, seconds = products_alone(calls, torch.device("cpu"), seconds_each=0.001)
    assert flops == 3 * 2 * 32 * 16 * 8 and seconds > 0


def test_bucketed_linear_products_are_recorded_from_inside_the_operators():
    import torch
    from bench_common import products_alone, recorded_products

    from transformer.linear import QUANTUM, linear

    x = torch.randn(200, 16, dtype=torch.bfloat16, requires_grad=True)  # 200 rows
    w = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)

    def step():
        linear(x, w).float().square().sum().backward()

    calls = recorded_products(step)
    rows = sorted({operands[0][0][0] for _, operands in calls})
    # forward and input gradient: a body of 128 rows and a 128-row tail each;
    # the weight's gradient: (8 x 128) @ (128 x 16) twice
    assert len(calls) == 6 and rows == [8, QUANTUM]
    assert {func.namespace for func, _ in calls} == {"aten"}
    flops, _ = products_alone(calls, torch.device("cpu"), seconds_each=0.001)
    assert flops == 6 * 2 * QUANTUM * 16 * 8


def test_the_off_target_rate_counts_non_empty_outputs_in_another_language():
    from multilingual_results import off_target

    def identify(text: str) -> str:
        return "de" if "der" in text.split() else "en"

    outputs = ["the dog runs", "der Hund rennt", "", "a cat", "  "]
    assert off_target(outputs, "en", identify) == pytest.approx(1 / 3)
    assert off_target(outputs, "de", identify) == pytest.approx(2 / 3)
    assert off_target(["", " "], "en", identify) == 0.0  # nothing to judge


def test_the_language_identifier_tells_multi30ks_languages_apart():
    pytest.importorskip("py3langid", reason="the multilingual extra")
    from multilingual_results import language_identifier

    identify = language_identifier(["en", "de", "fr", "cs"])
    sentences = {
        "en": "A man in a blue shirt is riding a bike down the street.",
        "de": "Ein Mann in einem blauen Hemd fährt mit dem Fahrrad die Straße.",
        "fr": "Un homme en chemise bleue descend la rue à vélo.",
        "cs": "Muž v modré košili jede na kole po ulici.",
    }
    assert {lang: identify(text) for lang, text in sentences.items()} == {
        lang: lang for lang in sentences
    }


@pytest.mark.slow
def test_the_student_benchmark_times_every_row_on_the_same_sentences(
    tmp_path, multi30k_dir
):
    import benchmark

    models = Path(__file__).resolve().parents[1] / "models"
    teachers = [str(models / f"multi30k_de_en_tiny_{m}.safetensors") for m in "ab"]
    out = tmp_path / "student.json"
    argv = ["student", "--teachers", *teachers, "--student", teachers[0]]
    argv += ["--limit", "12", "--data-dir", str(multi30k_dir), "--output", str(out)]
    assert benchmark.main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["runs"]
    assert result["sentences"] == 12 and result["threads"] == 2
    assert {"teachers_beam5", "student_fp32_greedy", "student_int8_beam5"} <= set(rows)
    assert rows["teachers_beam5"]["speedup_over_teachers"] == 1.0
    for row in rows.values():
        assert row["sentences_per_s"] == pytest.approx(12 / row["seconds"])
        assert 0 < row["bleu"] <= 100 and row["mib"] > 0
    # the teachers are two files of the student's size
    assert rows["teachers_beam5"]["mib"] == pytest.approx(
        2 * rows["student_fp32_greedy"]["mib"], rel=0.01
    )
    if importlib.util.find_spec("ctranslate2"):  # int8 export: a smaller file
        assert (
            rows["student_ct2_int8_greedy"]["mib"] < rows["student_fp32_greedy"]["mib"]
        )


@pytest.mark.slow
def test_the_decode_benchmark_reports_the_median_of_its_repeats(tmp_path, multi30k_dir):
    import benchmark

    model = (
        Path(__file__).resolve().parents[1] / "models/multi30k_de_en_tiny_a.safetensors"
    )
    out = tmp_path / "decode.json"
    argv = ["decode", "--checkpoint", str(model), "--precision", "fp32", "int8"]
    argv += ["--limit", "8", "--repeats", "3", "--data-dir", str(multi30k_dir)]
    argv += ["--max-tokens", "8192", "64"]  # a second budget: rows "...@64"
    assert benchmark.main([*argv, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["runs"]
    for name in ("greedy_cached", "beam5_cached_int8", "beam5_cached_int8@64"):
        runs = rows[name]["seconds_runs"]
        assert len(runs) == 3 and rows[name]["seconds"] == sorted(runs)[1]
    assert "seconds_runs" not in rows["greedy_uncached"]  # the slow one: once
    assert "greedy_uncached@64" not in rows
    if importlib.util.find_spec("ctranslate2"):
        ct2 = rows["ct2_process_beam5_int8"]
        assert (
            len(ct2["seconds_runs"]) == 3
            and ct2["seconds"] == sorted(ct2["seconds_runs"])[1]
        )
        assert "ct2_process_beam5@64" not in rows  # float32 export: one budget
        same = result["speedup_over_ct2_process_int8_same_budget"]
        for name, best in result["best_speedup_over_ct2_process_int8"].items():
            suffix = {"fp32": "", "int8": "_int8"}[best["precision"]]
            at = {8192: "", 64: "@64"}
            theirs = rows[f"ct2_process_{name}_int8{at[best['ct2_max_tokens']]}"]
            ours = rows[f"{name}_cached{suffix}{at[best['max_tokens']]}"]
            assert best["speedup"] == pytest.approx(theirs["seconds"] / ours["seconds"])
            # each engine's fastest budget: no row of the same engine is faster
            assert ours["seconds"] == min(
                rows[f"{name}_cached{s}{b}"]["seconds"]
                for s in ("", "_int8")
                for b in at.values()
            )
            assert theirs["seconds"] == min(
                rows[f"ct2_process_{name}_int8{b}"]["seconds"] for b in at.values()
            )
            assert same[name]["max_tokens"] == 8192
            # ours at its fastest is no slower than our fastest at 8192
            main_theirs = rows[f"ct2_process_{name}_int8"]["seconds"]
            assert theirs["seconds"] / best["speedup"] <= (
                main_theirs / same[name]["speedup"] + 1e-9
            )
