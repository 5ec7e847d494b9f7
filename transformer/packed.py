"""Linear layers with weights packed once for bf16 decoding on a CPU.

A bf16 matrix product on a CPU runs in oneDNN, which by default repacks the
weight into its blocked (AMX / AVX-512-bf16) layout at every call: for the few
rows of a decoding step that copy is a large part of the product.
``pack_linear_layers`` gives each linear layer of a bf16 model a copy of its
weight packed once (``torch.ops.mkldnn._reorder_linear_weight``, the packing
``torch.compile`` uses for frozen CPU weights) and runs its products on it
(``torch.ops.mkldnn._linear_pointwise``), with a feed-forward block's ReLU fused
into its first product. Same arithmetic, same results; the benchmarks page has
the speed.

The packed path runs only without autograd, on bf16 CPU inputs; anything else
(training, a float32 input, a moved model) takes ``nn.Linear``'s own. A weight
changed in place through autograd's view of it (``load_state_dict``, ``copy_``
under ``no_grad``) is packed again at the next call; an edit through ``.data``
bypasses the version counter that tells. A packed model is for decoding: a tied
output layer becomes a module of its own (``output_proj``, as int8's does), so
its state dict gains that key, and int8 quantization does not see packed layers.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: activations oneDNN can apply to a product's output, by ``F`` function
FUSED_ACTIVATIONS = {F.relu: "relu"}


def packing_available() -> bool:
    """Can this torch pack bf16 weights for oneDNN (a CPU build with oneDNN)?"""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ones(4, 4, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        out = torch.ops.mkldnn._linear_pointwise(weight, packed, None, "none", [], "")
    except (AttributeError, RuntimeError) as err:  # op missing or CPU refuses
        log.debug("no packed bf16 linear layers: %s", err)
        return False
    return bool(torch.equal(out, F.linear(weight, weight)))


class PackedLinear(nn.Linear):
    """``nn.Linear`` (the same parameters, state-dict keys and results) whose
    bf16 CPU products without autograd use a weight packed once, optionally
    followed by a fused ``activation`` (a key of ``FUSED_ACTIVATIONS``)."""

    def __init__(
        self, weight: nn.Parameter, bias: nn.Parameter | None, activation=None
    ) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight, self.bias = weight, bias  # shared, not copied
        self.activation = activation
        self._attr = "none" if activation is None else FUSED_ACTIVATIONS[activation]
        self._packed: Tensor | None = None
        self._packed_of: tuple[int, int] | None = None  # the weight's (version, ptr)
        if self.weight.dtype == torch.bfloat16 and self.weight.device.type == "cpu":
            self._pack()  # now, not in the first translation

    def _pack(self) -> Tensor:
        """The packed weight, packed again if the weight changed since."""
        w = self.weight
        key = (w._version, w.data_ptr())
        if self._packed_of != key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            self._packed_of = key
        return self._packed

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (
            torch.is_grad_enabled()
            or torch.compiler.is_compiling()  # inductor packs weights itself
            or x.dtype != torch.bfloat16
            or w.dtype != torch.bfloat16
            or x.device.type != "cpu"
            or w.device.type != "cpu"
        ):
            out = F.linear(x, w, self.bias)
            return out if self.activation is None else self.activation(out)
        return torch.ops.mkldnn._linear_pointwise(
            x, self._pack(), self.bias, self._attr, [], ""
        )

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weight out (oneDNN tensors have
        no storage to copy); it is packed again at the first call."""
        state = dict(super().__getstate__())  # a copy: not this module's own
        state["_packed"], state["_packed_of"] = None, None
        return state


def pack_linear_layers(model: nn.Module) -> nn.Module:
    """``model`` (or each model of an ensemble) with packed linear layers, in
    place: every ``nn.Linear`` becomes a ``PackedLinear`` over the same
    parameters, a feed-forward block's ReLU moves into its first layer, and a
    tied output projection (the target embedding as output layer, the largest
    product of a decoding step) gets a ``PackedLinear`` of its own over the
    embedding's weight. Does nothing where packing is unavailable."""
    from transformer.layers import FeedForward

    if not packing_available():
        return model
    for member in getattr(model, "models", [model]):
        # (a tied layer with a bias of its own, a Marian import's, keeps its one
        # fused product: as a module of its own the bias would round separately)
        tied = getattr(member, "output_proj", True) is None
        if tied and getattr(member, "final_logits_bias", None) is None:
            member.output_proj = PackedLinear(member.tgt_embed.weight, None)
    for module in list(model.modules()):
        fc1 = getattr(module, "fc1", None)
        if (
            isinstance(module, FeedForward)
            and type(fc1) is nn.Linear
            and module.activation in FUSED_ACTIVATIONS
        ):
            module.fc1 = PackedLinear(fc1.weight, fc1.bias, module.activation)
            module.activation = _identity
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child.weight, child.bias))
    return model


def _identity(x: Tensor) -> Tensor:
    """A feed-forward block's activation once its first layer applies it."""
    return x
