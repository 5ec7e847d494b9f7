"""bf16 runs only where the hardware has it; elsewhere fp32 with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model
from transformer import precision
from transformer.inference import set_precision

CPU = torch.device("cpu")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy_copy.yaml"
NONE = dict.fromkeys(precision.FLAGS, False)


@pytest.fixture
def flags(monkeypatch):
    """Set this 'CPU's flags; forget earlier warnings."""
    monkeypatch.setattr(precision, "_logged", set())

    def set_flags(**on):
        monkeypatch.setattr(precision, "cpu_flags", lambda: {**NONE, **on})

    return set_flags


@pytest.mark.parametrize(
    "on, native",
    [
        ({}, False),
        ({"avx2": True}, False),
        ({"avx2": True, "avx512_bf16": True}, True),
        ({"amx_bf16": True}, True),
        ({"bf16": True}, True),  # Arm
    ],
)
def test_native_bf16_follows_the_cpu_flags(flags, on, native):
    flags(**on)
    assert precision.native_bf16(CPU) is native


def test_bf16_without_native_support_falls_back_to_fp32_with_a_warning(flags, caplog):
    flags(avx2=True)
    with caplog.at_level(logging.WARNING):
        got = precision.effective_precision(CPU, "bf16", "training.precision")
        again = precision.effective_precision(CPU, "bf16", "training.precision")
    assert got == again == "fp32"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # once per process, not once per batch
    assert "training.precision: bf16 asked for" in warnings[0]
    assert "running fp32" in warnings[0]
    assert precision.effective_precision(CPU, "fp32", "training.precision") == "fp32"


def test_bf16_with_native_support_autocasts_to_bf16(flags, caplog):
    flags(avx512_bf16=True)
    with caplog.at_level(logging.WARNING):
        chosen = precision.effective_precision(CPU, "bf16", "training.precision")
    assert chosen == "bf16" and not caplog.records
    with precision.autocast(CPU, chosen):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with precision.autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("native", [False, True])
def test_auto_is_bf16_with_native_bf16_and_fp32_elsewhere_logged_once(
    flags, caplog, native
):
    flags(avx2=True, amx_bf16=native)
    with caplog.at_level(logging.INFO, logger="transformer.precision"):
        got = precision.effective_precision(CPU, "auto", "training.precision")
        again = precision.effective_precision(CPU, "auto", "training.precision")
    assert got == again == ("bf16" if native else "fp32")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"training.precision: auto -> {got} (this CPU has "
        f"{'' if native else 'no '}native bf16)"
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records)  # not a warning


def test_a_config_accepts_precision_auto_and_refuses_others():
    from transformer.config import ConfigError, load_config

    cfg = load_config(CONFIG, ["training.precision=auto"])
    assert cfg.training.precision == "auto"
    with pytest.raises(ConfigError, match="training.precision"):
        load_config(CONFIG, ["training.precision=bf17"])


@pytest.mark.parametrize("native", [False, True])
def test_decoding_precision_casts_only_with_native_bf16(flags, caplog, native):
    flags(amx_bf16=native)
    with caplog.at_level(logging.WARNING):
        model = set_precision(tiny_model(), "bf16")
    dtype = torch.bfloat16 if native else torch.float32
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert ("decoding.precision: bf16 asked for" in caplog.text) is not native


def test_cpu_flags_read_proc_cpuinfo_without_torch_capabilities(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
    )
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(precision, "Path", lambda _: cpuinfo)
    found = precision.cpu_flags()
    assert found == {
        "avx2": True,
        "avx512_bf16": True,
        "amx_bf16": False,
        "bf16": False,
    }
