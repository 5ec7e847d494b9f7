"""int8 decoding (``decoding.precision: int8``): the linear layers of every model
quantized, the tied output projection included; the same search."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import train_copy_model
from transformer.config import DecodingConfig
from transformer.inference import set_precision
from transformer.models import Ensemble
from transformer.search import generate

_BODY = torch.randint(4, 14, (12, 6), generator=torch.Generator().manual_seed(3))
SRC = torch.cat([_BODY, torch.full((12, 1), 3)], 1)


@pytest.fixture(scope="module")
def copier():
    return train_copy_model(200)


def quantized_linears(model) -> int:
    dynamic = torch.ao.nn.quantized.dynamic
    return sum(isinstance(m, dynamic.Linear) for m in model.modules())


@pytest.mark.slow
def test_int8_quantizes_every_linear_layer_and_the_tied_output(copier):
    import copy

    fp32 = copy.deepcopy(copier)
    int8 = set_precision(copy.deepcopy(copier), "int8")
    linears = sum(isinstance(m, torch.nn.Linear) for m in fp32.modules())
    assert fp32.output_proj is None  # tied: the embedding is the output layer
    assert quantized_linears(int8) == linears + 1  # and now a layer of its own
    assert int8.output_proj.weight().qscheme() == torch.per_channel_affine
    cfg = DecodingConfig(strategy="greedy")
    ours = [h[0].tokens for h in generate(fp32, SRC, cfg)]
    theirs = [h[0].tokens for h in generate(int8, SRC, cfg)]
    assert sum(a == b for a, b in zip(ours, theirs, strict=True)) >= 10  # of 12
    with torch.no_grad():  # the log-probabilities move by the rounding only
        tgt = torch.tensor([[2, 5, 6, 7]])
        a = fp32(SRC[:1], tgt).log_softmax(-1)
        b = int8(SRC[:1], tgt).log_softmax(-1)
    assert (a - b).abs().max() < 0.5
    assert (a - b).abs().max() > 0  # it did quantize


def test_int8_in_an_ensemble_and_an_rnn():
    import copy

    rnn = train_copy_model(30, arch="rnn", rnn_hidden=32)
    members = [copy.deepcopy(rnn), copy.deepcopy(rnn)]
    ensemble = set_precision(Ensemble(members).eval(), "int8")
    assert all(quantized_linears(m) > 0 for m in ensemble.models)
    kinds = {type(m).__name__ for m in ensemble.modules()}
    assert "LSTM" in kinds and any(
        "quantized" in type(m).__module__
        for m in ensemble.modules()
        if type(m).__name__ == "LSTM"
    )
    out = generate(ensemble, SRC, DecodingConfig(strategy="beam", beam_size=3))
    assert len(out) == len(SRC)
