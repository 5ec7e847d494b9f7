"""The RNN encoder-decoder: a bidirectional LSTM/GRU encoder and a decoder with
soft, hard or no attention (Bahdanau et al. 2015; Luong et al. 2015).

Each decoding step t reads the previous target token and (with attention) the
previous attentional vector (input feeding), runs the decoder RNN one step to
h_t, scores h_t against every encoder state, and mixes the attended context c_t
with h_t into the attentional vector a_t = tanh(W_c [c_t; h_t]), from which the
next token is predicted. Scores: additive v^T tanh(W_q h_t + W_k s) (Bahdanau's
form, with Luong's order of query and step), ``general`` h_t^T W s, ``dot``
h_t^T s.

- ``soft``: c_t is the weighted sum of encoder states, softmax weights.
- ``hard``: c_t is one encoder state. In training the position is sampled from
  the weights with the Gumbel-max trick, and gradients flow through the
  Gumbel-softmax relaxation at ``model.gumbel_temperature`` (straight-through:
  the forward pass uses the one-hot sample, the backward pass the gradient of the
  relaxed weights; lower temperatures are closer to the sample and noisier).
  At inference it is the argmax of the weights.
- ``none``: the fixed-vector model. The decoder starts from the final encoder
  states and sees nothing else of the source: a_t = tanh(W_o h_t).

Every variant starts the decoder's hidden state from a projection of the last
encoder layer's final forward and backward states (an LSTM's cell starts at
zero). The decoder is sequential by nature, so
teacher forcing runs the same one-step code over the target, position by
position (``none`` has no input feeding and runs the RNN over all positions in
one call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from transformer.attention import padding_mask
from transformer.config import ModelConfig
from transformer.dropout import Dropout
from transformer.models.common import check_ids, output_projection, token_embeddings


@dataclass
class RNNMemory:
    """Encoder output: states (B, S, H), their attention keys (B, S, A), the
    source mask (B, S) True at real tokens, and the decoder's first hidden state
    (L, B, H)."""

    states: Tensor
    keys: Tensor
    mask: Tensor
    init: Tensor

    def index_select(self, index: Tensor) -> RNNMemory:
        return RNNMemory(
            self.states.index_select(0, index),
            self.keys.index_select(0, index),
            self.mask.index_select(0, index),
            self.init.index_select(1, index),
        )


@dataclass
class RNNState:
    """Decoder state for incremental decoding.

    ``hidden`` (L, B', H) and ``cell`` (LSTM only) are the RNN's; ``feed`` (B', D)
    is the last attentional vector. The source side (``states``, ``keys``,
    ``mask``) keeps one row per sentence, each shared by B' / N' consecutive
    decoder rows (the beams of a sentence), as the Transformer's cross K/V do.
    """

    hidden: Tensor | None = None
    cell: Tensor | None = None
    feed: Tensor | None = None
    states: Tensor | None = None
    keys: Tensor | None = None
    mask: Tensor | None = None
    length: int = 0

    def reorder(
        self, index: Tensor, sources: Tensor | None = None, keep_sources: bool = False
    ) -> None:
        """Keep decoder rows ``index``; the source side as in ``KVCache.reorder``."""
        if self.hidden is None:
            return
        self.hidden = self.hidden.index_select(1, index)
        if self.cell is not None:
            self.cell = self.cell.index_select(1, index)
        if self.feed is not None:
            self.feed = self.feed.index_select(0, index)
        if not keep_sources and self.states is not None:
            rows = index if sources is None else sources
            self.states = self.states.index_select(0, rows)
            self.keys = self.keys.index_select(0, rows)
            self.mask = self.mask.index_select(0, rows)


class Attention(nn.Module):
    """Scores a decoder state against the encoder states and attends: softly,
    to one sampled (training) or best (inference) position, as ``cfg.attention``.

    Set ``record_weights = True`` to keep each call's weights (B', S) in
    ``self.weights`` (hard attention: the one-hot selections), for plots.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.rnn_hidden
        self.kind, self.score = cfg.attention, cfg.attention_score
        self.temperature = cfg.gumbel_temperature
        if self.score == "additive":
            self.key_proj = nn.Linear(h, h, bias=False)
            self.query_proj = nn.Linear(h, h)
            self.v = nn.Linear(h, 1, bias=False)
        elif self.score == "general":
            self.key_proj = nn.Linear(h, h, bias=False)
        self.record_weights = False
        self.weights: list[Tensor] = []

    def keys(self, states: Tensor) -> Tensor:
        """Encoder states (B, S, H) -> keys (B, S, H), projected once per source."""
        return states if self.score == "dot" else self.key_proj(states)

    def scores(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """query (B', H), keys (N, S, H), mask (N, S) -> scores (B', S), -inf at
        padding; each key row serves B' / N consecutive queries."""
        n, s, h = keys.shape
        group = query.size(0) // n
        if self.score == "additive":
            q = self.query_proj(query).view(n, group, 1, h)
            scores = self.v(torch.tanh(q + keys[:, None])).squeeze(-1)  # (N, g, S)
        else:
            scores = query.view(n, group, h) @ keys.transpose(1, 2)  # (N, g, S)
        scores = scores.masked_fill(~mask[:, None, :], -math.inf)
        return scores.reshape(-1, s)  # (B', S)

    def forward(
        self, query: Tensor, states: Tensor, keys: Tensor, mask: Tensor
    ) -> Tensor:
        """query (B', H); states, keys (N, S, H); mask (N, S) -> context (B', H)."""
        scores = self.scores(query, keys, mask)  # (B', S)
        if self.kind == "soft":
            weights = scores.softmax(-1)
        elif self.training:
            # one-hot sample forward, relaxed weights' gradient backward
            # in float32: bf16 Gumbel noise would be too coarse to sample by
            weights = F.gumbel_softmax(scores.float(), tau=self.temperature, hard=True)
            weights = weights.to(states.dtype)
        else:
            weights = F.one_hot(scores.argmax(-1), scores.size(-1)).to(scores.dtype)
        if self.record_weights:
            self.weights.append(weights.detach())
        n, s, h = states.shape
        context = weights.view(n, -1, s) @ states  # (N, g, H)
        return context.reshape(-1, h)


class RNNSeq2Seq(nn.Module):
    """RNN encoder-decoder for sequence-to-sequence tasks (``model.arch: rnn``).

    Args:
        cfg: the architecture; vocabulary sizes must be set (> 0).

    Shape:
        src: (B, S) source ids padded with ``cfg.pad_id``.
        tgt: (B, T) target ids, starting with <bos> for teacher forcing.
        logits: (B, T, V_tgt).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, h = cfg.d_model, cfg.rnn_hidden
        rnn = nn.LSTM if cfg.rnn_type == "lstm" else nn.GRU
        self.tgt_embed, self.src_embed = token_embeddings(cfg)
        self.dropout = Dropout(cfg.dropout)
        between = cfg.dropout  # nn.LSTM / nn.GRU apply it between layers only
        self.encoder = rnn(
            d,
            h // 2,
            cfg.encoder_layers,
            batch_first=True,
            bidirectional=True,
            dropout=between if cfg.encoder_layers > 1 else 0.0,
        )
        self.bridge = nn.Linear(h, cfg.decoder_layers * h)
        self.feeding = cfg.attention != "none"
        self.decoder = rnn(
            d + (d if self.feeding else 0),
            h,
            cfg.decoder_layers,
            batch_first=True,
            dropout=between if cfg.decoder_layers > 1 else 0.0,
        )
        self.attention = Attention(cfg) if self.feeding else None
        # the attentional vector a_t: tanh(W_c [c_t; h_t]), or tanh(W_o h_t)
        self.combine = nn.Linear(2 * h if self.feeding else h, d)
        self.output_proj = output_projection(cfg)

    def encode(self, src: Tensor) -> RNNMemory:
        """(B, S) source ids -> ``RNNMemory`` with states (B, S, H)."""
        check_ids(src, self.cfg.src_vocab_size, "source")
        mask = padding_mask(src, self.cfg.pad_id)  # (B, S)
        x = self.dropout(self.src_embed(src))  # (B, S, D)
        # lengths live on the CPU for packing (a host read, once per batch)
        lengths = mask.sum(1).cpu()
        if (lengths == 0).any():
            raise ValueError(
                f"source row {int((lengths == 0).nonzero()[0])} has no token "
                "(every source ends with <eos>)"
            )
        packed = pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        out, final = self.encoder(packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
        states = self.dropout(states)  # (B, S, H): forward and backward halves
        last = final[0] if isinstance(final, tuple) else final  # (2 L_enc, B, H/2)
        summary = torch.cat([last[-2], last[-1]], dim=-1)  # (B, H)
        init = torch.tanh(self.bridge(summary))  # (B, L_dec * H)
        init = init.view(src.size(0), self.cfg.decoder_layers, -1).transpose(0, 1)
        keys = self.attention.keys(states) if self.attention is not None else states
        return RNNMemory(states, keys, mask, init.contiguous())  # init (L, B, H)

    def new_cache(self) -> RNNState:
        return RNNState()

    def target_positions(self, src: Tensor) -> Tensor:
        """(B, S) sources -> (B,) target positions available to each sentence."""
        return torch.full_like(src[:, 0], self.cfg.max_positions)

    def _start(self, memory: RNNMemory) -> RNNState:
        b = memory.init.size(1)
        zeros = memory.init.new_zeros(b, self.cfg.d_model)
        return RNNState(
            hidden=memory.init,
            cell=torch.zeros_like(memory.init) if self.cfg.rnn_type == "lstm" else None,
            feed=zeros if self.feeding else None,
            # the fixed-vector decoder never reads the source again
            states=memory.states if self.feeding else None,
            keys=memory.keys if self.feeding else None,
            mask=memory.mask if self.feeding else None,
        )

    def decode(
        self, tgt: Tensor, memory: RNNMemory, state: RNNState | None = None
    ) -> Tensor:
        """Target ids -> next-token logits (B, T, V).

        Without a state, ``tgt`` is the whole prefix, run from the encoder's
        summary. With one, ``tgt`` holds only the new positions and the state is
        advanced in place.
        """
        check_ids(tgt, self.cfg.tgt_vocab_size, "target")
        if state is None:
            state = self._start(memory)
        elif state.hidden is None:
            vars(state).update(vars(self._start(memory)))
        x = self.dropout(self.tgt_embed(tgt))  # (B, T, D)
        if self.feeding:
            outputs = [self._step(x[:, t], state) for t in range(tgt.size(1))]
            out = torch.stack(outputs, dim=1)  # (B, T, D)
        else:  # no input feeding: the whole sequence in one call
            top, carry = self.decoder(x, _carry(state))
            _store(state, carry)
            out = torch.tanh(self.combine(top))  # (B, T, D)
        state.length += tgt.size(1)
        return self.project(self.dropout(out))

    def _step(self, x: Tensor, state: RNNState) -> Tensor:
        """One target position: embedding x (B', D) -> attentional vector (B', D)."""
        step_in = torch.cat([x, state.feed], dim=-1)[:, None]  # (B', 1, 2D)
        top, carry = self.decoder(step_in, _carry(state))
        _store(state, carry)
        query = top[:, 0]  # (B', H)
        context = self.attention(query, state.states, state.keys, state.mask)
        state.feed = torch.tanh(self.combine(torch.cat([context, query], dim=-1)))
        return state.feed

    def project(self, x: Tensor) -> Tensor:
        """Attentional vectors (B, T, D) -> logits (B, T, V)."""
        if self.output_proj is None:
            return F.linear(x, self.tgt_embed.weight)
        return self.output_proj(x)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced training, (B, T, V)."""
        return self.decode(tgt_in, self.encode(src))

    @torch.no_grad()
    def alignment(self, src: Tensor, tgt: Tensor, layer: int = -1) -> Tensor:
        """Teacher-force ``tgt`` (1, T) and return the attention weights (1, T, S)
        (hard attention: the selected positions); ``layer`` is unused."""
        if self.attention is None:
            raise ValueError("model.attention: none has no attention to plot")
        self.attention.record_weights = True
        self.attention.weights = []
        try:
            self(src, tgt)
            weights = torch.stack(self.attention.weights, dim=1)  # (1, T, S)
        finally:
            self.attention.record_weights = False
            self.attention.weights = []
        return weights


def _carry(state: RNNState):
    return state.hidden if state.cell is None else (state.hidden, state.cell)


def _store(state: RNNState, carry) -> None:
    if isinstance(carry, tuple):
        state.hidden, state.cell = carry
    else:
        state.hidden = carry
