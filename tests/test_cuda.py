"""The CUDA paths, checked against the CPU: forward and backward, bf16 autocast,
the KV-cached search, a training run (fused Adam, pinned-memory data workers,
torch.compile), int8 refused, device-side id checks. Skipped without a GPU;
``scripts/gpu_check.sh`` runs them on one (``-m cuda``)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from tests.conftest import tiny, tiny_model, train_copy_model
from transformer.config import ConfigError, DecodingConfig
from transformer.search import generate

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SRC = torch.tensor([[5, 6, 7, 8, 9, 3], [10, 11, 3, 0, 0, 0], [12, 13, 4, 3, 0, 0]])
TGT = torch.tensor([[2, 5, 6, 7], [2, 10, 11, 0], [2, 12, 0, 0]])


@pytest.fixture(scope="module")
def copier():
    return train_copy_model(150)


def test_forward_and_backward_match_the_cpu():
    cpu = tiny_model(seed=1).train()
    gpu = copy.deepcopy(cpu).cuda()
    torch.manual_seed(0)  # dropout off in tiny_model: the same function
    a = cpu(SRC, TGT)
    b = gpu(SRC.cuda(), TGT.cuda())
    torch.testing.assert_close(b.cpu(), a, atol=2e-4, rtol=1e-4)
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(
            q.grad.cpu(),
            p.grad,
            atol=5e-4,
            rtol=1e-3,
            msg=lambda m, n=name: f"{n}: {m}",
        )


def test_bf16_autocast_stays_close_to_fp32():
    from transformer.precision import autocast

    model = tiny_model(seed=2).cuda()
    device = torch.device("cuda")
    with torch.no_grad():
        full = model(SRC.cuda(), TGT.cuda()).float().log_softmax(-1)
        with autocast(device, "bf16"):
            half = model(SRC.cuda(), TGT.cuda()).float().log_softmax(-1)
    assert (full - half).abs().max() < 0.1
    assert (full - half).abs().max() > 0  # it did run in bf16


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cached_search_on_the_gpu_equals_the_cpu(copier, strategy):
    nbest = 2 if strategy == "beam" else 1
    cfg = DecodingConfig(strategy=strategy, beam_size=4, nbest=nbest)
    cpu = generate(copier, SRC, cfg)
    gpu = generate(copy.deepcopy(copier).cuda(), SRC.cuda(), cfg)
    assert [[h.tokens for h in r] for r in gpu] == [[h.tokens for h in r] for r in cpu]
    for a, b in zip(cpu, gpu, strict=True):
        assert [h.score for h in b] == pytest.approx([h.score for h in a], abs=1e-3)


def test_compiled_decoding_step_on_the_gpu(copier):
    cfg = DecodingConfig(strategy="beam", beam_size=3)
    model = copy.deepcopy(copier).cuda()
    plain = generate(model, SRC.cuda(), cfg)
    compiled_cfg = DecodingConfig(strategy="beam", beam_size=3, compile=True)
    compiled = generate(model, SRC.cuda(), compiled_cfg)
    assert [r[0].tokens for r in compiled] == [r[0].tokens for r in plain]


@pytest.mark.parametrize("compile", [False, True])
def test_training_on_the_gpu(tmp_path, toy_tokenizer, compile):
    """bf16 autocast, fused Adam, two pinned-memory data workers, compile."""
    from transformer.training import Trainer

    cfg = tiny(
        tmp_path / "run",
        toy_tokenizer,
        "training.device=cuda",
        "training.precision=bf16",
        f"training.compile={str(compile).lower()}",
        "data.workers=2",
        "training.max_steps=6",
        "training.validate_every=6",
    )
    trainer = Trainer(cfg, resume=False)
    assert trainer.device.type == "cuda" and trainer.precision == "bf16"
    assert trainer.optimizer.defaults.get("fused") is True
    trainer.train()
    assert trainer.step == 6
    weights = [p for p in trainer.model.parameters()]
    assert all(torch.isfinite(p).all() for p in weights)
    assert torch.cuda.max_memory_allocated() > 0


def test_bad_ids_fail_on_the_device():
    """A device-side assert ends the CUDA context: in a process of its own."""
    code = (
        "import torch; from tests.conftest import tiny_model\n"
        "model = tiny_model(seed=0).cuda()\n"
        "src = torch.tensor([[5, 10000, 3]], device='cuda')\n"
        "model(src, torch.tensor([[2, 5]], device='cuda'))\n"
        "torch.cuda.synchronize()\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert run.returncode != 0
    assert "ids must be in" in run.stderr


def test_int8_is_refused_on_the_gpu(copier):
    from transformer.inference import set_precision

    with pytest.raises(ConfigError, match="int8 decodes on a CPU"):
        set_precision(copy.deepcopy(copier).cuda(), "int8")
