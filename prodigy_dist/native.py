"""A native CPU kernel for the factored statistics: the row and the column sums of g^2 in one streaming pass.

Inductor always emits the row reduction and the column reduction of a 2-D tensor as two loops over it (the fast-path
issue records the formulations tried), so on a CPU the compiled path reads the gradient twice for its statistics.
This kernel reads it once: rows are split among threads, each row's sum is finished at once and its squares are
added to the thread's own column accumulator; the accumulators are added at the end. While a row is in cache its
Prodigy samples (every 11th element of the global flattening) are copied out too, so the sample pass reads them
contiguously instead of walking the whole gradient again.

It is built with ``torch.utils.cpp_extension`` on first use (a C++ compiler and ninja are needed; tens of seconds,
cached by torch in ``~/.cache/torch_extensions``). If the build fails, that is logged once and the compiled path
keeps its own statistics kernel.
"""

from __future__ import annotations

import logging
import threading

import torch

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>

template <typename T>
static void row_col(const T* g, int64_t rows, int64_t cols, float* row_out, float* partial, int64_t start,
                    T* samples) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    float* acc = partial + at::get_thread_num() * cols;
    for (int64_t i = begin; i < end; ++i) {
      const T* row = g + i * cols;
      float s = 0.f;
      #pragma omp simd reduction(+:s)
      for (int64_t j = 0; j < cols; ++j) {
        float v = static_cast<float>(row[j]);
        v *= v;
        s += v;
        acc[j] += v;
      }
      row_out[i] = s;
      if (samples != nullptr) {  // the row is in cache now: copy out its elements at flat start + 11 k
        const int64_t first = i * cols, last = first + cols;
        int64_t k = first <= start ? start : start + ((first - start + 10) / 11) * 11;
        for (; k < last; k += 11) samples[(k - start) / 11] = row[k - first];
      }
    }
  });
}

std::vector<torch::Tensor> row_col_sq_sums(torch::Tensor g, int64_t start) {
  TORCH_CHECK(g.dim() == 2 && g.is_contiguous() && g.device().is_cpu(), "a contiguous 2-D CPU tensor");
  const int64_t rows = g.size(0), cols = g.size(1), threads = at::get_num_threads();
  auto f32 = g.options().dtype(torch::kFloat);
  auto row_out = torch::empty({rows}, f32);
  auto partial = torch::zeros({threads, cols}, f32);
  const int64_t numel = rows * cols;
  const int64_t n_samples = start < 0 ? 0 : (numel > start ? (numel - start + 10) / 11 : 0);
  auto samples = torch::empty({n_samples}, g.options());
  if (g.scalar_type() == torch::kFloat) {
    row_col<float>(g.data_ptr<float>(), rows, cols, row_out.data_ptr<float>(), partial.data_ptr<float>(), start,
                   start < 0 ? nullptr : samples.data_ptr<float>());
  } else if (g.scalar_type() == torch::kBFloat16) {
    row_col<at::BFloat16>(g.data_ptr<at::BFloat16>(), rows, cols, row_out.data_ptr<float>(),
                          partial.data_ptr<float>(), start,
                          start < 0 ? nullptr : samples.data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(false, "float32 or bfloat16");
  }
  return {row_out, partial.sum(0), samples};
}
"""

_lock = threading.Lock()
_module = None
_failed = False


def _load():
    global _module, _failed
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is None and not _failed:
            try:
                from torch.utils.cpp_extension import load_inline
                _module = load_inline(name="prodigy_dist_native_stats_v2", cpp_sources=[_SOURCE],
                                      functions=["row_col_sq_sums"], extra_cflags=["-O3", "-fopenmp"],
                                      extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # no compiler, no ninja, a build error: keep the compiled statistics
                _failed = True
                logger.warning("the native statistics kernel could not be built (%s: %s); the compiled path uses "
                               "its own two-pass statistics", type(e).__name__, str(e).splitlines()[0][:200])
    return _module


def row_col_sq_sums(g: torch.Tensor, sample_start: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(sums of g^2 along dim 1, along dim 0 (fp32), and, with ``sample_start``, a contiguous copy of
    ``g.view(-1)[sample_start::11]``) for a contiguous 2-D fp32/bf16 CPU tensor, in one pass over ``g``; None when
    the kernel does not apply or could not be built."""
    if g.device.type != "cpu" or g.dim() != 2 or not g.is_contiguous() or \
            g.dtype not in (torch.float32, torch.bfloat16):
        return None
    module = _load()
    if module is None:
        return None
    rows, cols, samples = module.row_col_sq_sums(g, -1 if sample_start is None else sample_start)
    return rows, cols, samples if sample_start is not None else None
