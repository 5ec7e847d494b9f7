"""Boolean masks in inductor's CPU kernels, stored and loaded at vector speed.

``torch.compile`` keeps the masks of dropout and of ReLU's backward as ``bool``
tensors, and inductor's C++ (torch 2.13) moves each vector of them between memory
and its ``VecMask`` registers through ATen's generic element-by-element code, so a
compiled kernel that stores or reads a mask ran several times slower than eager's
and a compiled training step slower than an eager one (the figures: the
benchmarks page, training throughput). ``vectorize_bool_masks`` makes inductor
write those two lines as a small loop over a register-sized buffer that the C++
compiler vectorises (the same values: 1 byte per element, 0 or 1).

It edits two methods of inductor's C++ vector kernel (private API), so it
applies to the torch versions it was written and tested against
(``PATCHED_TORCH``) and leaves others as they are. A no-op post-grad pass
with its own ``uuid`` puts this module's source in inductor's cache key, so
code generated without the change is not reused with it or the other way round.
"""

from __future__ import annotations

import inspect
import logging

import torch

log = logging.getLogger(__name__)

#: torch (major, minor) versions whose inductor this change was tested against
PATCHED_TORCH = {(2, 13)}

_applied = False


def torch_is_patched() -> bool:
    """Is the running torch one of ``PATCHED_TORCH``?"""
    major, minor = torch.__version__.split(".")[:2]
    return (int(major), int(minor)) in PATCHED_TORCH


def _store_line(value: str, address: str, count: str) -> str:
    """C++ that stores ``count`` elements of the mask ``value`` as bools: a
    ``VecMask`` through a register-sized buffer; a ``Vectorized<bool>`` (a bool
    view of bytes) as inductor stores it."""
    return (
        "[](const auto& m_, bool* p_, int64_t n_) {"
        " using M_ = std::decay_t<decltype(m_)>;"
        " if constexpr (std::is_same_v<M_, at::vec::Vectorized<bool>>) {"
        " m_.store(p_, n_);"
        " } else {"
        " using V_ = std::decay_t<decltype(m_[0])>;"
        " using T_ = typename V_::value_type;"
        " constexpr int S_ = M_::size();"
        " __at_align__ T_ b_[S_];"
        " for (int j_ = 0; j_ < S_ / V_::size(); j_++)"
        " m_[j_].store(b_ + j_ * V_::size());"
        " for (int64_t i_ = 0; i_ < n_; i_++)"
        " p_[i_] = c10::bit_cast<at::vec::int_same_size_t<T_>>(b_[i_]) != 0;"
        f" }} }}({value}, {address}, {count});"
    )


def _load_expr(mask_type: str, n_vectors: int, address: str, count: str) -> str:
    """A C++ expression: ``count`` bools at ``address`` as a ``mask_type``
    (``at::vec::VecMask<float, n_vectors>``), the lanes past ``count`` false:
    an int mask (0 / -1) built in a buffer, then cast to float's."""
    return (
        "[&](const bool* p_, int64_t n_) {"
        f" constexpr int S_ = {mask_type}::size();"
        " __at_align__ int b_[S_];"
        " for (int i_ = 0; i_ < S_; i_++) b_[i_] = (i_ < n_ && p_[i_]) ? -1 : 0;"
        f" return at::vec::VecMask<int,{n_vectors}>("
        f"at::vec::VectorizedN<int,{n_vectors}>::loadu(b_))"
        f".template cast<float,{n_vectors}>();"
        f" }}({address}, {count})"
    )


def vectorize_bool_masks() -> bool:
    """Make inductor's CPU kernels store and load contiguous bool masks with
    vectorisable code (process-wide, idempotent). Returns whether the change is
    in effect: False on torch versions outside ``PATCHED_TORCH`` or where the
    methods it edits are not as expected."""
    global _applied
    if _applied:
        return True
    if not torch_is_patched():
        log.debug("inductor bool masks: torch %s left as it is", torch.__version__)
        return False
    try:
        from torch._inductor import config
        from torch._inductor.codegen import cpp
        from torch._inductor.custom_graph_pass import (
            CustomGraphPass,
            get_hash_for_files,
        )
        from torch._inductor.utils import IndentedBuffer
    except ImportError:
        return False
    kernel = cpp.CppVecKernel
    store, load = kernel._get_store_line, kernel._get_vec_load_line
    expected = {
        store: ["self", "value", "var", "index", "dtype", "accu_store"],
        load: ["self", "var", "index", "dtype", "load_mask"],
    }
    if any(list(inspect.signature(f).parameters) != p for f, p in expected.items()):
        log.debug("inductor bool masks: unexpected kernel methods, left as they are")
        return False

    def store_line(self, value, var, index, dtype, accu_store=False):
        tiling = self.itervars[self.tiling_idx]
        if (
            dtype != torch.bool
            or accu_store
            or self._try_get_const_stride(index, tiling) != 1
        ):
            return store(self, value, var, index, dtype, accu_store)
        code = IndentedBuffer()
        address = f"{var} + {cpp.cexpr_index(index)}"
        code.writeline(_store_line(value, address, cpp.cexpr_index(self.num_elems)))
        return code

    def load_line(self, var, index, dtype, load_mask=None):
        if dtype != torch.bool:
            return load(self, var, index, dtype, load_mask)
        # inductor's own line ignores load_mask for bool too
        address = f"{var} + {cpp.cexpr_index(index)}" if index != 0 else var
        n_vectors = self._get_num_vectors(torch.float)
        return _load_expr(
            self._get_mask_type(torch.float),
            n_vectors,
            address,
            cpp.cexpr_index(self.num_elems),
        )

    class CacheKey(CustomGraphPass):
        """Changes nothing in the graph; its uuid keys inductor's caches."""

        def __call__(self, graph) -> None:
            pass

        def uuid(self):
            return get_hash_for_files((__file__,))

    kernel._get_store_line = store_line
    kernel._get_vec_load_line = load_line
    passes = config.post_grad_custom_post_pass
    if passes is None:
        config.post_grad_custom_post_pass = CacheKey()
    else:  # another pass already set: keep it, and key the cache on both
        passes = list(passes) if isinstance(passes, (list, tuple)) else [passes]
        config.post_grad_custom_post_pass = [*passes, CacheKey()]
    _applied = True
    log.debug("inductor bool masks: vectorised loads and stores")
    return True
