"""Native CPU kernels for the parts of the compiled step where inductor's CPU code falls short of bandwidth.

* :func:`statistics` -- the factored statistics: the row and the column sums of g^2 in one streaming pass.
  Inductor always emits the row reduction and the column reduction of a 2-D tensor as two loops over it (the
  fast-path issue records the formulations tried). Rows are split into shares fixed by the shape (whole blocks
  of 96 KB, at least 128 rows and 256 KB); each block's row sums are finished at once and their squares added to
  the share's own column accumulator (with AVX-512 one row per sweep, a single stream through memory: four rows
  side by side ran at half of g.sum()'s bandwidth from memory on rows of 384-768 elements, GPT-2 124M's step
  91.6 -> 86.7 ms; elsewhere four rows per sweep); the shares' accumulators are added in share order at the end,
  so the results do not depend on the number of threads. After each block, the same pass computes the block's
  Prodigy statistics on its sampled elements (every 11th of the global flattening): dot(g, p0 - x) with g still
  in cache and x (z or the parameter) in one strided walk, and the new ``s`` with sum |s|, or SPEED's sums. With
  AVX-512 the walk takes sixteen samples from eleven contiguous vector loads and six permutes (a gather per sixteen
  samples cost as much again as the walk's memory reads: 25.5 -> 22.2 ms for the fp32 matrices of GPT-2 124M, 2
  threads). The compiled alternative, a separate kernel over strided views, reads g and x again.
* :func:`stochastic_round_` -- the stochastic rounding of the bf16 update's results (fp32 bits plus noise,
  truncated) where the update pass is compiled (Prodigy mode). Inductor's CPU code scalarises the bit casts it
  needs, which made the bf16 update pass five times slower than the same pass rounding to
  nearest; the compiled update writes fp32 results into a small buffer that stays in cache, and this kernel
  rounds them into the bf16 storage.
* :func:`update_sf_factored` -- the Schedule-Free update of a factored 2-D tensor (the compiled update pass's
  operations, in fp32; :func:`update_sf_full` the same with the full second moment, ``factored=False``: GPT-2
  124M, 2 threads, 104 -> 91 ms a step, its statistics pass no longer walking z), which also copies z's new
  values at the Prodigy sample positions into a compact vector while the row is in cache: the next step's
  :func:`statistics` reads them there (``compact``) instead of walking z, 4 of the 24 bytes per parameter the
  default step read (GPT-2 124M, 2 threads: 0.90-0.93 of the step time
  with the compiled update and the walk). bf16 weights are stored rounded stochastically with the noise table
  (the bits of :mod:`prodigy_dist.rounding`) or to nearest, in the same pass (GPT-2 124M bf16, 2 threads: 1.36x
  fused AdamW's step, 2.6-2.9x with the compiled update and :func:`stochastic_round_`). With eps=None (Adam-atan2)
  it computes the arctangent with a polynomial of its own, within 2 ulp of torch.atan2 (whose 1-ulp version made
  that update pass bound by its arithmetic: GPT-2 124M, 2 threads, 2.04x fused AdamW's step before, about the
  default options' ratio after).
* :func:`rms_factored` -- the StableAdamW sum of the squared update, sum (d g / (a_i c_j + d eps))^2, for factored
  2-D tensors; :func:`rms_prodigy_factored` the same in Prodigy mode, which also writes the new first moment (GPT-2
  124M, Prodigy mode, 2 threads: that pass 46 -> 25 ms, the step 105 -> 84 ms), and :func:`rms_full_sf` with the
  full second moment (``factored=False``), which writes v. Inductor's full reductions keep
  their accumulator in a heap-allocated cascade-summation stack (a store and a reload per vector of the loop) and
  its row reductions reload the broadcast scalars in the inner loop; both run at about half of the memory
  bandwidth on a CPU.

* :func:`statistics_list`, :func:`rms_full_sf_list`, :func:`update_sf_full_list` -- the same passes over a list of
  small tensors (a bucket's norm weights and biases) in one call each, every tensor a single row, whole on one
  thread, the threads splitting the list; :func:`statistics_many`, :func:`update_sf_factored_many`,
  :func:`update_sf_full_many` and (Prodigy mode) :func:`update_prodigy_factored_many` -- the statistics pass and the
  update of a bucket's matrices in one call each (the statistics of all their shares in one parallel region: 20M,
  2 threads, that pass 0.92-0.94 of its time, 1.9M 0.85-0.87), with each one's RMS pass right before its update on
  one process (the Python work and the call per tensor cost, from a cold cache, more than the arithmetic
  of a small matrix: 20M-parameter GPT, 2 threads, the step 24.5 -> 23.4 ms with the compact samples' writes
  without a division each, 23.6 -> 21.5 ms with the statistics in one call too; Prodigy mode, whose update was
  compiled, 33.0 -> 26.0 ms; ``factored=False`` 32.7 -> 30.3 ms). Where no tensor needs its RMS pass, the
  Schedule-Free update splits all the matrices' rows among the threads in one parallel region instead of one region
  per matrix (the update pass alone over the 38 matrices of a 1.9M-parameter GPT, 2 threads: 1.43 -> 1.30 ms; 20M:
  10.37 -> 10.06 ms).
* :func:`factors` -- the factored second moments' EMA and the square roots of their normalised factors, for a
  whole bucket in one call; and StableAdamW's divisors without the RMS pass. Where the update takes each tensor's
  RMS pass right before its update (one process), the statistics pass also sums, per column, g^2 times three powers
  of the row's new factor (known once the row is summed; the row is read again from cache), and :func:`factors`
  finishes the sum of the squared update from them with the column factors: exact up to a Taylor remainder in eps /
  sqrt(v) that it bounds, taken only below an fp32 ulp of the sum (else that tensor takes its RMS pass). The step
  then reads g twice instead of three times (GPT-2 124M, 2 threads, Xeon: 133 -> 113 ms, 1.71 -> 1.46x fused AdamW;
  at 20M the statistics pass +0.6-1.3 ms, the RMS passes -5 ms).

The kernels check dtypes, devices and memory layouts themselves and report a tensor they do not take (None or
False from the Python functions: the caller uses its other kernels); the same checks in Python cost several
microseconds per call, more than the arithmetic of a small tensor. The statistics pass prefetches each row's data
8 KB ahead in software (20M-parameter GPT, 2 threads, from a cold cache: that pass 2.6 -> 2.15 ms).

Row sums accumulate in fp32 per row and column sums in fp32 per share, with explicit fused multiply-adds (on one
core that pass was bound by its arithmetic: wte of GPT-2 124M, 1 thread, 7.7 -> 6.3 ms; g.sum() 4.4 ms); the
Prodigy sums in fp32 per block of rows and in double across blocks and shares; the RMS sum in fp32 per row and in
double across rows (pieces of 16 rows, or of 4096 elements with the full second moment, added in piece order). No
result depends on the number of threads. Elsewhere the elementwise roundings are those of the compiled kernels
(``-ffp-contract=off``: no implicit fused multiply-adds), so the new ``s`` is bit-identical to the compiled
kernel's. The kernels are built with ``torch.utils.cpp_extension`` on first use, with the vector instructions of
the CPU capability torch reports (a C++ compiler and ninja are needed; tens of seconds, cached by torch in
``~/.cache/torch_extensions``).
If the build fails, that is logged once and the compiled path uses its own kernels; ``PRODIGY_DIST_NATIVE=0`` in
the environment keeps them off.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from . import rounding

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

// Element loads as fp32: bf16 is the upper half of an fp32 (a shift, which vectorises).
static inline float as_float(float x) { return x; }
static inline float as_float(uint16_t x) {
  const uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Four rows: their sums of x^2 into out[0..3], and x^2 added to acc. Pointers are __restrict parameters (not
// lambda captures), so the compiler keeps every scalar in a register and vectorises with plain loads; acc is read
// and written once per four rows.
template <typename T>
static inline void rows4_squares(const T* __restrict r0, const T* __restrict r1, const T* __restrict r2,
                                 const T* __restrict r3, float* __restrict acc, int64_t cols, float* __restrict out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  #pragma omp simd reduction(+:s0, s1, s2, s3)
  for (int64_t j = 0; j < cols; ++j) {
    const float v0 = as_float(r0[j]), v1 = as_float(r1[j]), v2 = as_float(r2[j]), v3 = as_float(r3[j]);
    // fused multiply-adds: this pass is bound by its arithmetic on one core, not by memory
    s0 = std::fma(v0, v0, s0);
    s1 = std::fma(v1, v1, s1);
    s2 = std::fma(v2, v2, s2);
    s3 = std::fma(v3, v3, s3);
    acc[j] = std::fma(v3, v3, std::fma(v2, v2, std::fma(v1, v1, std::fma(v0, v0, acc[j]))));
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

template <typename T>
static inline float row_squares(const T* __restrict row, float* __restrict acc, int64_t cols) {
  float s = 0.f;
  #pragma omp simd reduction(+:s)
  for (int64_t j = 0; j < cols; ++j) {
    const float v = as_float(row[j]);
    s = std::fma(v, v, s);
    acc[j] = std::fma(v, v, acc[j]);
  }
  return s;
}

static inline float round_bf16(float x) {  // round to nearest even, as c10::BFloat16 does (NaN: 0x7fc0)
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  uint32_t r = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  r = x != x ? 0x7fc00000u : r;
  float f;
  std::memcpy(&f, &r, 4);
  return f;
}
static inline uint16_t bf16_bits(float rounded) { uint32_t b; std::memcpy(&b, &rounded, 4); return uint16_t(b >> 16); }

// Element stores of fp32 values already rounded like the storage.
static inline void put(float* p, float v) { *p = v; }
static inline void put(uint16_t* p, float rounded) { *p = bf16_bits(rounded); }

// A moment's exponential average with the roundings of its storage (LOW: bf16) after each operation, as
// prodigy_dist.compiled._moments: old * beta, then + add.
template <bool LOW>
static inline float ema(float old, float beta, float add) {
  float x = old * beta;
  if (LOW) x = round_bf16(x);
  x = x + add;
  return LOW ? round_bf16(x) : x;
}

// The denominator of the full second moment v, rounded like its storage (prodigy_dist.compiled._direction):
// sqrt(v), then + eps (eps already rounded like the storage; none for Adam-atan2).
template <bool LOW, bool EPS>
static inline float full_denominator(float v, float eps) {
  float den = std::sqrt(v);
  if (LOW) den = round_bf16(den);
  if (!EPS) return den;
  den = den + eps;
  return LOW ? round_bf16(den) : den;
}

static inline float fma_(float a, float b, float c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Whether t is a contiguous CPU tensor of this dtype.
static inline bool cpu_dense(const torch::Tensor& t, torch::ScalarType type) {
  return t.scalar_type() == type && t.is_contiguous() && t.device().is_cpu();
}

// sum over [0, n) of part(begin, end) over the pieces [k piece, (k + 1) piece), the threads splitting the pieces, and
// the pieces' sums added in piece order: the same bits on any number of threads.
template <typename F>
static double parallel_sum(int64_t n, int64_t piece, const F& part) {
  const int64_t pieces = (n + piece - 1) / piece;
  std::vector<double> sums(pieces, 0.0);
  double* out = sums.data();
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) out[k] = part(k * piece, std::min(n, (k + 1) * piece));
  });
  double total = 0.0;
  for (double s : sums) total += s;
  return total;
}

// Software prefetch of the `bytes` bytes that lie kPrefetchAhead bytes after p, into L1 (prefetches never fault, also
// past the end of a tensor). Issued once per row, they keep more lines in flight than the hardware prefetcher
// alone: the native statistics pass over the fp32 matrices of a 20M-parameter GPT, cold: 2.6 -> 2.15 ms (g.sum()
// 1.7-2.0 ms on the same data); 1-4 KB ahead gained less, 8-64 KB the same.
static constexpr int64_t kPrefetchAhead = 8192;
static inline void prefetch_ahead(const void* p, int64_t bytes) {
  const char* q = static_cast<const char*>(p) + kPrefetchAhead;
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(q + o, 0, 3);
}

// The Prodigy samples of a tensor sit at flat indices start + 11 n: the first one at or after flat index `first`,
// and how many a tensor of `numel` elements holds.
static inline int64_t first_sample(int64_t first, int64_t start) {
  return first <= start ? start : start + ((first - start + 10) / 11) * 11;
}
static inline int64_t sample_count(int64_t numel, int64_t start) {
  return numel > start ? (numel - start + 10) / 11 : 0;
}

struct Sample {  // what the Prodigy statistics of one tensor need (samples at flat index start + 11 n)
  int64_t start;
  const void* data;  // z (Schedule-Free) or the parameter, g's dtype and shape
  const void* compact;  // the sampled elements of data, contiguous (written by the last update), or null
  const uint16_t* p0;  // bf16
  const uint16_t* s;  // bf16, or null with SPEED
  uint16_t* s_new;
  float beta3, delta;
};

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
// AVX-512: sixteen samples (elements 0, 11, ..., 165 of a 176-element window) from eleven contiguous vector loads
// and six permutes, instead of a gather per sixteen (gathers made the sampled walk twice as expensive as its reads).
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
template <typename T>
static inline __m512 every11(const T* __restrict p) {
  // sample m sits in vector (11 m) / 16 at lane (11 m) % 16; pairs of vectors hold three samples each
  const __m512i i0 = _mm512_setr_epi32(0, 11, 22, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i i1 = _mm512_setr_epi32(0, 0, 0, 1, 12, 23, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i i2 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 2, 13, 24, 0, 0, 0, 0, 0, 0, 0);
  const __m512i i3 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 14, 25, 0, 0, 0, 0);
  const __m512i i4 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 15, 26, 0);
  const __m512i i5 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5);
  __m512 r = _mm512_permutex2var_ps(load16(p), i0, load16(p + 16));
  r = _mm512_mask_mov_ps(r, 0x0038, _mm512_permutex2var_ps(load16(p + 32), i1, load16(p + 48)));
  r = _mm512_mask_mov_ps(r, 0x01c0, _mm512_permutex2var_ps(load16(p + 64), i2, load16(p + 80)));
  r = _mm512_mask_mov_ps(r, 0x0e00, _mm512_permutex2var_ps(load16(p + 96), i3, load16(p + 112)));
  r = _mm512_mask_mov_ps(r, 0x7000, _mm512_permutex2var_ps(load16(p + 128), i4, load16(p + 144)));
  return _mm512_mask_mov_ps(r, 0x8000, _mm512_permutexvar_ps(i5, load16(p + 160)));
}
static inline __m512 round_bf16_16(__m512 x) {  // round_bf16 on sixteen lanes
  const __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb),
                               _mm512_set1_epi32(int(0xffff0000u)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
  return _mm512_castsi512_ps(r);
}
// Samples [0, n) in groups of sixteen while the 176-element window stays inside the `avail` elements from gk;
// returns how many were done.
template <typename T, bool C>
static inline int64_t samples16(const T* __restrict gk, const T* __restrict xk, int64_t count, int64_t avail,
                                const uint16_t* __restrict p0, const uint16_t* __restrict s,
                                uint16_t* __restrict s_new, float beta3, float delta_g, float* out) {
  constexpr bool low = sizeof(T) == 2;
  __m512 dot = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
  const __m512 b3 = _mm512_set1_ps(beta3), dg = _mm512_set1_ps(delta_g);
  int64_t n = 0;
  for (; n + 16 <= count && 11 * n + 176 <= avail; n += 16) {
    const __m512 g = every11(gk + 11 * n);
    __m512 e = _mm512_sub_ps(load16(p0 + n), C ? load16(xk + n) : every11(xk + 11 * n));
    if (low) e = round_bf16_16(e);
    dot = _mm512_add_ps(dot, _mm512_mul_ps(g, e));
    if (s == nullptr) {  // SPEED
      a1 = _mm512_add_ps(a1, _mm512_abs_ps(e));
      a2 = _mm512_add_ps(a2, _mm512_mul_ps(e, e));
    } else {
      const __m512 s1 = round_bf16_16(_mm512_mul_ps(load16(s + n), b3));
      __m512 step = _mm512_mul_ps(g, dg);
      if (low) step = round_bf16_16(step);
      const __m512 sn = round_bf16_16(_mm512_add_ps(s1, step));
      _mm256_storeu_si256((__m256i*)(s_new + n), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(sn), 16)));
      a1 = _mm512_add_ps(a1, _mm512_abs_ps(sn));
    }
  }
  out[0] = _mm512_reduce_add_ps(dot);
  out[1] = _mm512_reduce_add_ps(a1);
  out[2] = _mm512_reduce_add_ps(a2);
  return n;
}
#define PRODIGY_DIST_SAMPLES16 1

// One row: its sum of x^2 (four accumulators), and x^2 added to acc. One contiguous stream per thread: reading four
// rows side by side (rows4_squares) ran at half the bandwidth of g.sum() from memory on rows of 384-768 elements
// (four short streams at a time defeat the hardware prefetcher); acc stays in L1. acc gets the same fused
// multiply-adds in the same order as there, so the column sums do not change.
static inline __m512 load16_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load16_masked(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
// (ACC: the squares are also added to acc; without, the row's sum alone, the same bits)
template <typename T, bool ACC = true>
static inline float row_squares16(const T* __restrict row, float* __restrict acc, int64_t cols) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 64 <= cols; j += 64) {
    const __m512 v0 = load16(row + j), v1 = load16(row + j + 16), v2 = load16(row + j + 32),
                 v3 = load16(row + j + 48);
    s0 = _mm512_fmadd_ps(v0, v0, s0);
    s1 = _mm512_fmadd_ps(v1, v1, s1);
    s2 = _mm512_fmadd_ps(v2, v2, s2);
    s3 = _mm512_fmadd_ps(v3, v3, s3);
    if (ACC) {
      _mm512_storeu_ps(acc + j, _mm512_fmadd_ps(v0, v0, _mm512_loadu_ps(acc + j)));
      _mm512_storeu_ps(acc + j + 16, _mm512_fmadd_ps(v1, v1, _mm512_loadu_ps(acc + j + 16)));
      _mm512_storeu_ps(acc + j + 32, _mm512_fmadd_ps(v2, v2, _mm512_loadu_ps(acc + j + 32)));
      _mm512_storeu_ps(acc + j + 48, _mm512_fmadd_ps(v3, v3, _mm512_loadu_ps(acc + j + 48)));
    }
  }
  for (; j < cols; j += 16) {
    const __mmask16 m = cols - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (cols - j)) - 1);
    const __m512 v = load16_masked(row + j, m);
    s0 = _mm512_fmadd_ps(v, v, s0);
    if (ACC) _mm512_mask_storeu_ps(acc + j, m, _mm512_fmadd_ps(v, v, _mm512_maskz_loadu_ps(m, acc + j)));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}
#endif

// The Prodigy statistics of the sampled elements among flat indices [first, first + span) (a block of rows), with
// the roundings of the compiled kernel (prodigy_dist.compiled._sample_pass): dot(g, p0 - x); then
// s_new = beta3 s + delta g and sum |s_new|, or SPEED's sums of |p0 - x| and (p0 - x)^2. Added to acc[0..2].
// C: x's samples are read from S.compact (contiguous) instead of from a strided walk over x.
template <typename T, bool C>
static inline void row_samples(const T* __restrict row, const T* __restrict xrow, int64_t first, int64_t span,
                               const Sample& S, double* __restrict acc) {
  constexpr bool low = sizeof(T) == 2;  // bf16 parameters: the differences are bf16 too
  constexpr int64_t xs = C ? 1 : 11;  // stride of x's samples
  const int64_t k0 = first_sample(first, S.start);
  if (k0 >= first + span) return;
  const int64_t n0 = (k0 - S.start) / 11, count = (first + span - k0 + 10) / 11;
  const T* __restrict gk = row + (k0 - first);
  const T* __restrict xk = C ? static_cast<const T*>(S.compact) + n0 : xrow + (k0 - first);
  const uint16_t* __restrict p0 = S.p0 + n0;
  const uint16_t* __restrict s = S.s == nullptr ? nullptr : S.s + n0;
  uint16_t* __restrict s_new = S.s_new == nullptr ? nullptr : S.s_new + n0;
  const float beta3 = S.beta3, delta_g = low ? round_bf16(S.delta) : S.delta;
  float dot = 0.f, a1 = 0.f, a2 = 0.f;
  int64_t n1 = 0;  // samples done by the vector path
#ifdef PRODIGY_DIST_SAMPLES16
  float vec[3];
  n1 = samples16<T, C>(gk, xk, count, first + span - k0, p0, s, s_new, beta3, delta_g, vec);
  dot = vec[0];
  a1 = vec[1];
  a2 = vec[2];
#endif
  if (s == nullptr) {  // SPEED
    #pragma omp simd reduction(+:dot, a1, a2)
    for (int64_t n = n1; n < count; ++n) {
      const float g = as_float(gk[11 * n]);
      float e = as_float(p0[n]) - as_float(xk[xs * n]);
      if (low) e = round_bf16(e);
      dot += g * e;
      a1 += std::fabs(e);
      a2 += e * e;
    }
  } else {
    #pragma omp simd reduction(+:dot, a1)
    for (int64_t n = n1; n < count; ++n) {
      const float g = as_float(gk[11 * n]);
      float e = as_float(p0[n]) - as_float(xk[xs * n]);
      if (low) e = round_bf16(e);
      dot += g * e;
      const float s1 = round_bf16(as_float(s[n]) * beta3);
      const float step = low ? round_bf16(g * delta_g) : g * delta_g;
      const float sn = round_bf16(s1 + step);
      s_new[n] = bf16_bits(sn);
      a1 += std::fabs(sn);
    }
  }
  acc[0] += dot;
  acc[1] += a1;
  acc[2] += a2;
}

// StableAdamW's sum of squares from the statistics pass (factors_ and the Python function factors explain it): per
// row, the new moment of the factor indexed by the rows, F = beta2 F_old + alpha (row sum * inv_cols) (factors_'s
// operations), f = F / d^2, and g^2 f^-1, g^2 f^(-3/2), g^2 f^-2 added to three column accumulators; and the least f
// of a row that is not all zeros. A row of zeros adds nothing; a row whose f lies outside [1e-18, 1e18] (where f^-2
// could leave fp32's range) adds NaN, so that the tensor takes its RMS pass instead.
struct Expansion {
  const float* f_old;  // the factor's moment before this step, one value per row
  float beta2, alpha, inv_cols, inv_d2;
};

static constexpr float kExpansionLow = 1e-18f, kExpansionHigh = 1e18f;

// The weights of a row (w[0..2]: f^-1, f^(-3/2), f^-2) from its sum of squares; lowers *f_min.
static inline void expansion_weights(float row_sum, float f_old, const Expansion& E, float* w, float* f_min) {
  if (row_sum == 0.f) {  // (its g is zero: no term)
    w[0] = w[1] = w[2] = 0.f;
    return;
  }
  const float f = fma_(row_sum * E.inv_cols, E.alpha, f_old * E.beta2) * E.inv_d2;
  if (f >= kExpansionLow && f <= kExpansionHigh) {
    w[0] = 1.f / f;
    w[1] = w[0] / std::sqrt(f);
    w[2] = w[0] * w[0];
    *f_min = std::min(*f_min, f);
  } else {
    w[0] = w[1] = w[2] = std::numeric_limits<float>::quiet_NaN();
  }
}

// Rows [r0, r1) of a block just summed (from cache), four at a time: their weighted squares added to e (3 x cols).
// (Without AVX-512; the sweep has added the column sums.)
template <typename T>
static inline void rows_expand(const T* __restrict g, int64_t r0, int64_t r1, int64_t cols, const float* row_sums,
                               const Expansion& E, float* __restrict e, float* f_min) {
  float* __restrict e0 = e;
  float* __restrict e1 = e + cols;
  float* __restrict e2 = e + 2 * cols;
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    float w[4][3];
    for (int k = 0; k < 4; ++k) expansion_weights(row_sums[r + k], E.f_old[r + k], E, w[k], f_min);
    const T* __restrict x0 = g + r * cols;
    const T* __restrict x1 = x0 + cols;
    const T* __restrict x2 = x1 + cols;
    const T* __restrict x3 = x2 + cols;
    #pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      const float v0 = as_float(x0[j]), v1 = as_float(x1[j]), v2 = as_float(x2[j]), v3 = as_float(x3[j]);
      const float q0 = v0 * v0, q1 = v1 * v1, q2 = v2 * v2, q3 = v3 * v3;
      e0[j] = std::fma(q3, w[3][0], std::fma(q2, w[2][0], std::fma(q1, w[1][0], std::fma(q0, w[0][0], e0[j]))));
      e1[j] = std::fma(q3, w[3][1], std::fma(q2, w[2][1], std::fma(q1, w[1][1], std::fma(q0, w[0][1], e1[j]))));
      e2[j] = std::fma(q3, w[3][2], std::fma(q2, w[2][2], std::fma(q1, w[1][2], std::fma(q0, w[0][2], e2[j]))));
    }
  }
  for (; r < r1; ++r) {
    float w[3];
    expansion_weights(row_sums[r], E.f_old[r], E, w, f_min);
    const T* __restrict x = g + r * cols;
    #pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      const float v = as_float(x[j]);
      const float q = v * v;
      e0[j] = std::fma(q, w[0], e0[j]);
      e1[j] = std::fma(q, w[1], e1[j]);
      e2[j] = std::fma(q, w[2], e2[j]);
    }
  }
}

#ifdef PRODIGY_DIST_SAMPLES16
// One row's sixteen values v into the accumulators of rows_expand's four sums (acc, then e's three rows).
struct Expand16 {
  __m512 a, s0, s1, s2;
  inline void load(const float* acc, const float* e, int64_t cols, int64_t j, __mmask16 m) {
    a = _mm512_maskz_loadu_ps(m, acc + j);
    s0 = _mm512_maskz_loadu_ps(m, e + j);
    s1 = _mm512_maskz_loadu_ps(m, e + cols + j);
    s2 = _mm512_maskz_loadu_ps(m, e + 2 * cols + j);
  }
  inline void add(__m512 v, __m512 w0, __m512 w1, __m512 w2) {
    const __m512 q = _mm512_mul_ps(v, v);
    a = _mm512_fmadd_ps(v, v, a);
    s0 = _mm512_fmadd_ps(q, w0, s0);
    s1 = _mm512_fmadd_ps(q, w1, s1);
    s2 = _mm512_fmadd_ps(q, w2, s2);
  }
  inline void store(float* acc, float* e, int64_t cols, int64_t j, __mmask16 m) const {
    _mm512_mask_storeu_ps(acc + j, m, a);
    _mm512_mask_storeu_ps(e + j, m, s0);
    _mm512_mask_storeu_ps(e + cols + j, m, s1);
    _mm512_mask_storeu_ps(e + 2 * cols + j, m, s2);
  }
};

// The expansion with AVX-512, which also adds the column sums to acc: columns [j, j + 64) (FOUR) or the sixteen from
// j (the last ones masked by m) walk down the rows [r0, r1), each row's weights w[3 (r - r0) ..], with the
// accumulators in registers. Per column and row the operations of rows_expand (and of the sweep's column sums), in
// row order, so the same bits; acc and e are read and written once per block, not once per four rows as a four-row
// version of rows_expand that also added acc did, bound by those loads and stores (over the fp32 matrices of a
// 20M-parameter GPT, 2 threads, from a flushed cache, one parallel region per matrix, the expansion added 0.7 ms to
// the statistics pass, then 0.25; the whole pass with the Prodigy samples 0.89-0.92 of its time).
template <typename T, bool FOUR>
static inline void columns_expand16(const T* __restrict g, int64_t r0, int64_t r1, int64_t cols, int64_t j,
                                    __mmask16 m, const float* __restrict w, float* __restrict e,
                                    float* __restrict acc) {
  const __mmask16 all = 0xffff;
  Expand16 x0, x1, x2, x3;
  x0.load(acc, e, cols, j, FOUR ? all : m);
  if (FOUR) {
    x1.load(acc, e, cols, j + 16, all);
    x2.load(acc, e, cols, j + 32, all);
    x3.load(acc, e, cols, j + 48, all);
  }
  for (int64_t r = r0; r < r1; ++r, w += 3) {
    const T* __restrict x = g + r * cols + j;
    const __m512 w0 = _mm512_set1_ps(w[0]), w1 = _mm512_set1_ps(w[1]), w2 = _mm512_set1_ps(w[2]);
    if (FOUR) {
      x0.add(load16(x), w0, w1, w2);
      x1.add(load16(x + 16), w0, w1, w2);
      x2.add(load16(x + 32), w0, w1, w2);
      x3.add(load16(x + 48), w0, w1, w2);
    } else {
      x0.add(load16_masked(x, m), w0, w1, w2);
    }
  }
  x0.store(acc, e, cols, j, FOUR ? all : m);
  if (FOUR) {
    x1.store(acc, e, cols, j + 16, all);
    x2.store(acc, e, cols, j + 32, all);
    x3.store(acc, e, cols, j + 48, all);
  }
}

// The expansion of rows [r0, r1) with AVX-512, column sums included, in column strips of 64 (four vectors: sixteen
// accumulators, enough independent chains of fused multiply-adds to keep both units busy), then the last columns
// sixteen at a time; w: scratch for 3 (r1 - r0) weights.
template <typename T>
static inline void rows_expand16(const T* __restrict g, int64_t r0, int64_t r1, int64_t cols, const float* row_sums,
                                 const Expansion& E, float* __restrict e, float* f_min, float* __restrict acc,
                                 float* __restrict w) {
  for (int64_t r = r0; r < r1; ++r) expansion_weights(row_sums[r], E.f_old[r], E, w + 3 * (r - r0), f_min);
  int64_t j = 0;
  for (; j + 64 <= cols; j += 64) columns_expand16<T, true>(g, r0, r1, cols, j, __mmask16(0xffff), w, e, acc);
  for (; j < cols; j += 16) {
    const __mmask16 m = cols - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (cols - j)) - 1);
    columns_expand16<T, false>(g, r0, r1, cols, j, m, w, e, acc);
  }
}
#endif

// Rows per block: the block's rows of g are summed first, then the sampled elements of the block (g from cache, x in
// one long strided walk that the hardware prefetcher follows; short walks per row each pay the prefetcher's ramp-up).
static constexpr int64_t kBlockBytes = 96 * 1024;

// One tensor's statistics pass in a call over several (statistics_many; statistics is a call over one): its input,
// its outputs, and where its shares of the work and their partial sums lie.
struct PassJob {
  const void* g;
  int64_t rows, cols;
  const Sample* sp;  // (null: no Prodigy statistics)
  const Expansion* ep;  // (null: no expansion)
  float* row_out;  // rows
  float* col_out;  // cols
  float* sums_out;  // 3: the Prodigy sums
  float* expand_out;  // 4 x cols with ep: the accumulators, then the least f in the first element of the fourth row
  float* gsq;  // (null: not wanted) the sum of g^2, the row sums added in double
  int64_t block, first_share, shares, part;  // part: its partials' offset in the call's buffer
};

// A tensor's shares: rows [k share_rows, (k + 1) share_rows), whole blocks of at least 128 rows and kShareBytes, at
// most kMaxShares of them. Each share sums its column sums (and the expansion's accumulators) from zero into a
// partial of its own, and the partials are added in share order: the results depend on the shape alone, neither on
// the number of threads nor on which thread took which share, so a tensor's statistics are the same bits alone
// (statistics) and among others (statistics_many), whose shares of every tensor are split among the threads in one
// parallel region (a region per tensor left threads idle: a 128x128 matrix is one share). The partials cost at most
// 4/128 of the tensor's size.
static constexpr int64_t kShareBytes = 256 * 1024, kMaxShares = 64, kShareMinRows = 128;

static inline int64_t block_rows(int64_t cols, int64_t elem) {
  return std::max<int64_t>(4, (kBlockBytes / std::max<int64_t>(1, cols * elem)) / 4 * 4);
}

static inline int64_t share_rows(int64_t rows, int64_t cols, int64_t elem, int64_t block) {
  const int64_t block_bytes = block * std::max<int64_t>(1, cols * elem), blocks = (rows + block - 1) / block;
  const int64_t per_share = std::max({(kShareMinRows + block - 1) / block,
                                      (kShareBytes + block_bytes - 1) / block_bytes,
                                      (blocks + kMaxShares - 1) / kMaxShares, int64_t(1)});
  return per_share * block;
}

// Rows [r0, r1) of a tensor (a share: whole blocks, but for the tensor's last): the row sums into row_out, the column
// sums added to acc, the expansion's accumulators to e (3 x cols) and its least f to *f_min, the Prodigy sums to
// local[0..2]. w: scratch for 3 x block weights.
template <typename T>
static void share_pass(const PassJob& J, int64_t r0, int64_t r1, float* acc, float* e, float* f_min, double* local,
                       float* w) {
  const T* g = static_cast<const T*>(J.g);
  const int64_t cols = J.cols, block = J.block;
  const Sample* S = J.sp;
  const Expansion* E = J.ep;
  float* row_out = J.row_out;
  const T* x = S == nullptr ? nullptr : static_cast<const T*>(S->data);
  for (int64_t b0 = r0; b0 < r1; b0 += block) {
    const int64_t b1 = std::min(b0 + block, r1);
    int64_t i = b0;
#ifdef PRODIGY_DIST_SAMPLES16
    // (with the expansion the column sums are added by its walk over the block, in registers: rows_expand16)
    for (; i < b1; ++i) {
      prefetch_ahead(g + i * cols, cols * int64_t(sizeof(T)));
      row_out[i] = E != nullptr ? row_squares16<T, false>(g + i * cols, acc, cols)
                                : row_squares16<T, true>(g + i * cols, acc, cols);
    }
#endif
    for (; i + 4 <= b1; i += 4)
      rows4_squares(g + i * cols, g + (i + 1) * cols, g + (i + 2) * cols, g + (i + 3) * cols, acc, cols, row_out + i);
    for (; i < b1; ++i) row_out[i] = row_squares(g + i * cols, acc, cols);
    if (E != nullptr) {  // the block's rows again, from cache
#ifdef PRODIGY_DIST_SAMPLES16
      rows_expand16<T>(g, b0, b1, cols, row_out, *E, e, f_min, acc, w);
#else
      rows_expand<T>(g, b0, b1, cols, row_out, *E, e, f_min);
#endif
    }
    if (S != nullptr && S->compact != nullptr)
      row_samples<T, true>(g + b0 * cols, x + b0 * cols, b0 * cols, (b1 - b0) * cols, *S, local);
    else if (S != nullptr)
      row_samples<T, false>(g + b0 * cols, x + b0 * cols, b0 * cols, (b1 - b0) * cols, *S, local);
  }
}

// The statistics passes of jobs (one dtype T): every tensor's shares, split among the threads by bytes in one
// parallel region, then each tensor's partials added in share order.
template <typename T>
static void run_passes(std::vector<PassJob>& jobs) {
  const int64_t elem = sizeof(T);
  std::vector<std::array<int64_t, 3>> shares;  // (job, first row, end row)
  std::vector<int64_t> share_start;  // bytes of g before the share, over the call
  int64_t bytes = 0, part_floats = 0, max_block = 0;
  for (size_t j = 0; j < jobs.size(); ++j) {
    PassJob& J = jobs[j];
    J.block = block_rows(J.cols, elem);
    const int64_t rows_per_share = share_rows(J.rows, J.cols, elem, J.block);
    J.first_share = int64_t(shares.size());
    for (int64_t r = 0; r < J.rows; r += rows_per_share) {
      shares.push_back({int64_t(j), r, std::min(J.rows, r + rows_per_share)});
      share_start.push_back(bytes);
      bytes += std::max<int64_t>(1, (shares.back()[2] - r) * J.cols * elem);  // (a share of no bytes: one)
    }
    J.shares = int64_t(shares.size()) - J.first_share;
    J.part = part_floats;
    part_floats += J.shares * (J.ep != nullptr ? 4 : 1) * J.cols;
    if (J.ep != nullptr) max_block = std::max(max_block, J.block);
  }
  // per share: its column sums (cols), then with the expansion its accumulators (3 x cols); its least f; its sums.
  // The partials go to a buffer kept from call to call by the calling thread (at most 4/128 of the largest call's
  // gradient elements): a fresh one of several MB took page faults on every step (GPT-2 124M: ~330 a step, 2.5 ms
  // of system time).
  static thread_local std::vector<float> parts_buffer;
  if (parts_buffer.size() < size_t(part_floats)) parts_buffer.resize(part_floats);
  float* const parts = parts_buffer.data();
  std::vector<float> f_mins(shares.size(), std::numeric_limits<float>::infinity());
  std::vector<double> sums(3 * shares.size(), 0.0);
  const int64_t threads = at::get_num_threads(), n_shares = int64_t(shares.size());
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> w(3 * max_block);
    // thread t: the shares that start in its part [t, t + 1) x bytes / threads of the bytes
    int64_t k = std::lower_bound(share_start.begin(), share_start.end(), bytes * t0 / threads) - share_start.begin();
    for (; k < n_shares && share_start[k] < bytes * t1 / threads; ++k) {
      const PassJob& J = jobs[shares[k][0]];
      const int64_t index = k - J.first_share, width = (J.ep != nullptr ? 4 : 1) * J.cols;
      float* part = parts + J.part + index * width;
      std::fill(part, part + width, 0.f);
      share_pass<T>(J, shares[k][1], shares[k][2], part, J.ep != nullptr ? part + J.cols : nullptr, &f_mins[k],
                    &sums[3 * k], w.data());
    }
  });
  at::parallel_for(0, int64_t(jobs.size()), 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const PassJob& J = jobs[j];
      const int64_t cols = J.cols, width = (J.ep != nullptr ? 4 : 1) * cols;
      std::fill(J.col_out, J.col_out + cols, 0.f);
      if (J.ep != nullptr) std::fill(J.expand_out, J.expand_out + 4 * cols, 0.f);
      float f_min = std::numeric_limits<float>::infinity();
      double total[3] = {0.0, 0.0, 0.0};
      for (int64_t k = 0; k < J.shares; ++k) {  // (in share order)
        const float* part = parts + J.part + k * width;
        for (int64_t c = 0; c < cols; ++c) J.col_out[c] += part[c];
        if (J.ep != nullptr) {
          for (int64_t c = 0; c < 3 * cols; ++c) J.expand_out[c] += part[cols + c];
          f_min = std::min(f_min, f_mins[J.first_share + k]);
        }
        for (int m = 0; m < 3; ++m) total[m] += sums[3 * (J.first_share + k) + m];
      }
      if (J.ep != nullptr) J.expand_out[3 * cols] = f_min;
      for (int m = 0; m < 3; ++m) J.sums_out[m] = float(total[m]);
      if (J.gsq != nullptr) {
        double sq = 0.0;
        for (int64_t i = 0; i < J.rows; ++i) sq += J.row_out[i];
        *J.gsq = float(sq);
      }
    }
  });
}

// Whether the statistics pass takes these tensors (g 2-D; with start >= 0 the sample's tensors; f_old fp32).
static bool statistics_applies(const torch::Tensor& g, int64_t start, const c10::optional<torch::Tensor>& data,
                               const c10::optional<torch::Tensor>& p0, const c10::optional<torch::Tensor>& s,
                               const c10::optional<torch::Tensor>& compact,
                               const c10::optional<torch::Tensor>& f_old) {
  const auto dtype = g.scalar_type();
  if (!((dtype == torch::kFloat || dtype == torch::kBFloat16) && g.dim() == 2 && cpu_dense(g, dtype)))
    return false;
  if (start >= 0 && !(data.has_value() && cpu_dense(*data, dtype) && p0.has_value() &&
                      cpu_dense(*p0, torch::kBFloat16) && (!s.has_value() || cpu_dense(*s, torch::kBFloat16)) &&
                      (!compact.has_value() || cpu_dense(*compact, dtype))))
    return false;
  return !f_old.has_value() || cpu_dense(*f_old, torch::kFloat);
}

// A tensor's Sample (start >= 0) after the checks of its sizes (an internal error where they do not fit); s_new: the
// output of the new s (or undefined with SPEED).
static Sample make_sample(const torch::Tensor& g, int64_t start, const c10::optional<torch::Tensor>& data,
                          const c10::optional<torch::Tensor>& p0, const c10::optional<torch::Tensor>& s,
                          double beta3, double delta, const c10::optional<torch::Tensor>& compact,
                          torch::Tensor& s_new) {
  const int64_t n_samples = sample_count(g.numel(), start);
  TORCH_CHECK(data->sizes() == g.sizes(), "data: g's shape");
  TORCH_CHECK(p0->numel() == n_samples && (!s.has_value() || s->numel() == n_samples) &&
              (!compact.has_value() || compact->numel() == n_samples), "p0, s, compact: one value per sample");
  return Sample{start, data->data_ptr(), compact.has_value() ? compact->data_ptr() : nullptr,
                reinterpret_cast<const uint16_t*>(p0->data_ptr()),
                s.has_value() ? reinterpret_cast<const uint16_t*>(s->data_ptr()) : nullptr,
                s.has_value() ? reinterpret_cast<uint16_t*>(s_new.data_ptr()) : nullptr, float(beta3), float(delta)};
}

// One tensor's statistics pass (after statistics_applies) as a job, with its result tensors appended to out: rows
// (r, 1), cols (1, c), the new s (empty unless sampled with s), the expansion's accumulators (4, c; empty without
// f_old); S and E: where its Sample and Expansion are kept (they must outlive the job); the Prodigy sums go to
// sums_out[0..2] and, with gsq, the sum of g^2 to *gsq.
static PassJob statistics_job(
    const torch::Tensor& g, int64_t start, const c10::optional<torch::Tensor>& data,
    const c10::optional<torch::Tensor>& p0, const c10::optional<torch::Tensor>& s, double beta3, double delta,
    const c10::optional<torch::Tensor>& compact, const c10::optional<torch::Tensor>& f_old, double beta2,
    double alpha, double inv_cols, double inv_d2, float* sums_out, float* gsq, Sample& S, Expansion& E,
    std::vector<torch::Tensor>& out) {
  const int64_t rows = g.size(0), cols = g.size(1);
  const auto f32 = g.options().dtype(torch::kFloat);
  auto row_out = torch::empty({rows, 1}, f32);  // (keepdim shapes: what the optimizer keeps them as)
  auto col_out = torch::empty({1, cols}, f32);
  auto s_new = torch::empty({start >= 0 && s.has_value() ? sample_count(g.numel(), start) : 0},
                            g.options().dtype(torch::kBFloat16));
  if (start >= 0) S = make_sample(g, start, data, p0, s, beta3, delta, compact, s_new);
  auto expand_out = torch::empty({f_old.has_value() ? 4 : 0, cols}, f32);
  if (f_old.has_value()) {
    TORCH_CHECK(f_old->numel() == rows, "f_old: one value per row");
    E = Expansion{f_old->data_ptr<float>(), float(beta2), float(alpha), float(inv_cols), float(inv_d2)};
  }
  PassJob J{};
  J.g = g.data_ptr();
  J.rows = rows;
  J.cols = cols;
  J.sp = start >= 0 ? &S : nullptr;
  J.ep = f_old.has_value() ? &E : nullptr;
  J.row_out = row_out.data_ptr<float>();
  J.col_out = col_out.data_ptr<float>();
  J.sums_out = sums_out;
  J.expand_out = expand_out.data_ptr<float>();
  J.gsq = gsq;
  out.insert(out.end(), {row_out, col_out, s_new, expand_out});
  return J;
}

static void run_passes(std::vector<PassJob>& jobs, torch::ScalarType dtype) {
  if (dtype == torch::kFloat)
    run_passes<float>(jobs);
  else
    run_passes<uint16_t>(jobs);
}

// Factored statistics of g (rows, cols: sums of g^2 along dim 1 and dim 0) and, with start >= 0, the Prodigy
// statistics of its sampled elements: sums = [dot(g, p0 - x), sum |s_new| (or SPEED's sum |p0 - x|),
// SPEED's sum (p0 - x)^2] and s_new. Returns nothing where the tensors' dtypes, devices or memory layouts are not the
// kernel's; raises on inconsistent arguments (an internal error). (No ATen operation beyond the allocations of the
// results: each costs a microsecond or more, and this runs once per tensor and step.)
std::vector<torch::Tensor> statistics(torch::Tensor g, int64_t start, c10::optional<torch::Tensor> data,
                                      c10::optional<torch::Tensor> p0, c10::optional<torch::Tensor> s,
                                      double beta3, double delta, c10::optional<torch::Tensor> compact,
                                      c10::optional<torch::Tensor> f_old, double beta2, double alpha,
                                      double inv_cols, double inv_d2) {
  if (!statistics_applies(g, start, data, p0, s, compact, f_old)) return {};
  auto sums_out = torch::empty({3}, g.options().dtype(torch::kFloat));
  Sample S{};
  Expansion E{};
  std::vector<torch::Tensor> t;
  std::vector<PassJob> jobs{statistics_job(g, start, data, p0, s, beta3, delta, compact, f_old, beta2, alpha,
                                           inv_cols, inv_d2, sums_out.data_ptr<float>(), nullptr, S, E, t)};
  run_passes(jobs, g.scalar_type());
  return {t[0], t[1], sums_out, t[2], t[3]};
}

// statistics() for the 2-D tensors of a bucket in one call (the same bits as tensor by tensor; all their shares in
// one parallel region): the Python-level work of a call per tensor costs more, from a cold cache, than the
// arithmetic of a small matrix. Per tensor i: starts[i] (-1: no Prodigy statistics; else datas, p0s, ss (empty:
// SPEED) and compacts give its sample), f_olds[i] (none: no expansion; else with inv_cols[i]). Returns [sums (n, 4):
// the Prodigy sums and the sum of g^2 (row sums added in double), rows (n), cols (n), s_new (n), expansions (n)]
// (s_new, expansions: empty tensors where there are none), or nothing unless the kernel takes every tensor.
std::vector<torch::Tensor> statistics_many(std::vector<torch::Tensor> gs, std::vector<int64_t> starts,
                                           std::vector<c10::optional<torch::Tensor>> datas,
                                           std::vector<c10::optional<torch::Tensor>> p0s,
                                           std::vector<c10::optional<torch::Tensor>> ss, double beta3, double delta,
                                           std::vector<c10::optional<torch::Tensor>> compacts,
                                           std::vector<c10::optional<torch::Tensor>> f_olds, double beta2,
                                           double alpha, std::vector<double> inv_cols, double inv_d2) {
  const size_t n = gs.size();
  TORCH_CHECK(starts.size() == n && datas.size() == n && p0s.size() == n && ss.size() == n && compacts.size() == n &&
              f_olds.size() == n && inv_cols.size() == n, "one entry per tensor");
  for (size_t i = 0; i < n; ++i)
    if (gs[i].scalar_type() != gs[0].scalar_type() ||
        !statistics_applies(gs[i], starts[i], datas[i], p0s[i], ss[i], compacts[i], f_olds[i]))
      return {};
  auto sums = torch::zeros({int64_t(n), 4}, torch::TensorOptions().dtype(torch::kFloat));
  float* sums_p = sums.data_ptr<float>();
  std::vector<Sample> samples(n);  // (sized once: the jobs point into them)
  std::vector<Expansion> expansions(n);
  std::vector<torch::Tensor> t;
  t.reserve(4 * n);
  std::vector<PassJob> jobs;
  jobs.reserve(n);
  for (size_t i = 0; i < n; ++i)
    jobs.push_back(statistics_job(gs[i], starts[i], datas[i], p0s[i], ss[i], beta3, delta, compacts[i], f_olds[i],
                                  beta2, alpha, inv_cols[i], inv_d2, sums_p + 4 * i, sums_p + 4 * i + 3, samples[i],
                                  expansions[i], t));
  if (n > 0) run_passes(jobs, gs[0].scalar_type());
  std::vector<torch::Tensor> out(1 + 4 * n);  // (sums, then the rows, cols, new s and accumulators of each tensor)
  out[0] = sums;
  for (size_t i = 0; i < n; ++i)
    for (size_t k = 0; k < 4; ++k) out[1 + k * n + i] = t[4 * i + k];
  return out;
}

// sum over the row of (d g_j / (a c_j + e))^2, with the operations of the compiled update (fp32).
template <typename T>
static inline float row_update_squares(const T* __restrict row, const float* __restrict c, float a, float d,
                                       float e, int64_t cols) {
  float s = 0.f;
  #pragma omp simd reduction(+:s)
  for (int64_t j = 0; j < cols; ++j) {
    const float u = (as_float(row[j]) * d) / (a * c[j] + e);
    s += u * u;
  }
  return s;
}

template <typename T>
static double rms_rows(const T* g, const float* a, const float* c, int64_t rows, int64_t cols, float d, float e) {
  return parallel_sum(rows, 16, [=](int64_t begin, int64_t end) {
    double s = 0.0;
    for (int64_t i = begin; i < end; ++i) s += row_update_squares(g + i * cols, c, a[i], d, e, cols);
    return s;
  });
}

// Prodigy mode (no Schedule-Free): the new first moment m <- beta1 m + (1 - beta1) d g, rounded like its storage at
// each operation (prodigy_dist.compiled._moments), stored in place, and the row's sum of (m / (a c_j + e))^2.
template <typename T>
static inline float row_moment_squares(const T* __restrict g, T* __restrict m, const float* __restrict c, float a,
                                       float beta1, float m_alpha, float e, int64_t cols) {
  constexpr bool low = sizeof(T) == 2;
  float s = 0.f;
  #pragma omp simd reduction(+:s)
  for (int64_t j = 0; j < cols; ++j) {
    const float mn = ema<low>(as_float(m[j]), beta1, as_float(g[j]) * m_alpha);
    put(m + j, mn);
    const float u = mn / (a * c[j] + e);
    s += u * u;
  }
  return s;
}

template <typename T>
static double rms_moment_rows(const T* g, T* m, const float* a, const float* c, int64_t rows, int64_t cols,
                              float beta1, float m_alpha, float e) {
  return parallel_sum(rows, 16, [=](int64_t begin, int64_t end) {
    double s = 0.0;
    for (int64_t i = begin; i < end; ++i)
      s += row_moment_squares(g + i * cols, m + i * cols, c, a[i], beta1, m_alpha, e, cols);
    return s;
  });
}

// The sum of squares as a 0-dim fp32 tensor, or with numel > 0 StableAdamW's divisor sqrt(max(sqrt(sum / numel),
// 1)) (the fp32 operations of prodigy_dist.compiled._stable_scales, with torch's square root, which on a CPU is not
// always the correctly rounded one).
static torch::Tensor sum_or_divisor(double total, int64_t numel, const torch::TensorOptions& options) {
  const float out = static_cast<float>(total);
  if (numel <= 0) return torch::tensor(out, options);
  return torch::tensor(out / static_cast<float>(numel), options).sqrt_().clamp_min_(1.0).sqrt_();
}

// Prodigy mode's RMS pass: the new first moment, in place, and the sum of the squared update (or the divisor).
// k: the step's scalars (prodigy_dist.compiled._scalars: k[1] d eps, k[2] beta1, k[3] (1 - beta1) d).
torch::Tensor rms_prodigy_factored(torch::Tensor g, torch::Tensor m, torch::Tensor a, torch::Tensor c,
                                   torch::Tensor k, int64_t numel) {
  const auto dtype = g.scalar_type();
  TORCH_CHECK((dtype == torch::kFloat || dtype == torch::kBFloat16) && g.dim() == 2 && cpu_dense(g, dtype) &&
              cpu_dense(m, dtype) && m.sizes() == g.sizes(),
              "g, m: contiguous fp32 or bf16 CPU tensors of one 2-D shape");
  TORCH_CHECK(cpu_dense(a, torch::kFloat) && cpu_dense(c, torch::kFloat) && cpu_dense(k, torch::kFloat) &&
              a.numel() == g.size(0) && c.numel() == g.size(1) && k.numel() >= 4,
              "a, c: fp32 factors of g's rows and columns; k: scalars");
  const int64_t rows = g.size(0), cols = g.size(1);
  const float* kp = k.data_ptr<float>();
  double total;
  if (dtype == torch::kFloat) {
    total = rms_moment_rows<float>(g.data_ptr<float>(), m.data_ptr<float>(), a.data_ptr<float>(),
                                   c.data_ptr<float>(), rows, cols, kp[2], kp[3], kp[1]);
  } else {
    total = rms_moment_rows<uint16_t>(reinterpret_cast<const uint16_t*>(g.data_ptr()),
                                      reinterpret_cast<uint16_t*>(m.data_ptr()), a.data_ptr<float>(),
                                      c.data_ptr<float>(), rows, cols, kp[2], kp[3], kp[1]);
  }
  return sum_or_divisor(total, numel, g.options().dtype(torch::kFloat));
}

// Schedule-Free with the full second moment (factored=False): v <- beta2 v + (1 - beta2) d^2 g^2 in place, and the
// sum of (d g / (sqrt(v) + d eps))^2, each operation rounded like the storage (prodigy_dist.compiled._moments and
// _direction). g, v: contiguous, flat.
template <typename T>
static double rms_full_part(const T* __restrict gp, T* __restrict vp, int64_t begin, int64_t end,
                            const float* k) {
  constexpr bool low = sizeof(T) == 2;
  const float d = k[0], beta2 = k[4], v_alpha = k[5], eps = low ? round_bf16(k[1]) : k[1];
  double total = 0.0;
  for (int64_t b0 = begin; b0 < end; b0 += 4096) {  // fp32 sums over chunks of 4096, added in double
    const int64_t b1 = std::min(end, b0 + 4096);
    float s = 0.f;
    #pragma omp simd reduction(+:s)
    for (int64_t j = b0; j < b1; ++j) {
      const float gv = as_float(gp[j]);
      const float vn = ema<low>(as_float(vp[j]), beta2, (gv * gv) * v_alpha);
      put(vp + j, vn);
      const float u = (gv * d) / full_denominator<low, true>(vn, eps);
      s += u * u;
    }
    total += s;
  }
  return total;
}

template <typename T>
static double rms_full_elements(const T* g, T* v, int64_t n, const float* k) {
  return parallel_sum(n, 4096, [=](int64_t begin, int64_t end) { return rms_full_part(g, v, begin, end, k); });
}

torch::Tensor rms_full_sf(torch::Tensor g, torch::Tensor v, torch::Tensor k, int64_t numel) {
  const auto dtype = g.scalar_type();
  TORCH_CHECK((dtype == torch::kFloat || dtype == torch::kBFloat16) && cpu_dense(g, dtype) &&
              cpu_dense(v, dtype) && v.numel() == g.numel(), "g, v: contiguous fp32 or bf16 CPU tensors of one size");
  TORCH_CHECK(cpu_dense(k, torch::kFloat) && k.numel() >= 6, "k: the step's scalars");
  double total;
  if (dtype == torch::kFloat) {
    total = rms_full_elements<float>(g.data_ptr<float>(), v.data_ptr<float>(), g.numel(), k.data_ptr<float>());
  } else {
    total = rms_full_elements<uint16_t>(reinterpret_cast<const uint16_t*>(g.data_ptr()),
                                        reinterpret_cast<uint16_t*>(v.data_ptr()), g.numel(), k.data_ptr<float>());
  }
  return sum_or_divisor(total, numel, g.options().dtype(torch::kFloat));
}

torch::Tensor rms_factored(torch::Tensor g, torch::Tensor a, torch::Tensor c, double d, double e, int64_t numel) {
  TORCH_CHECK(g.dim() == 2 && g.is_contiguous() && g.device().is_cpu(), "a contiguous 2-D CPU tensor");
  TORCH_CHECK(a.scalar_type() == torch::kFloat && c.scalar_type() == torch::kFloat && a.is_contiguous() &&
              c.is_contiguous() && a.numel() == g.size(0) && c.numel() == g.size(1), "fp32 factors of g's shape");
  const int64_t rows = g.size(0), cols = g.size(1);
  double total;
  if (g.scalar_type() == torch::kFloat) {
    total = rms_rows<float>(g.data_ptr<float>(), a.data_ptr<float>(), c.data_ptr<float>(), rows, cols, float(d),
                            float(e));
  } else if (g.scalar_type() == torch::kBFloat16) {
    total = rms_rows<uint16_t>(reinterpret_cast<const uint16_t*>(g.data_ptr()), a.data_ptr<float>(),
                               c.data_ptr<float>(), rows, cols, float(d), float(e));
  } else {
    TORCH_CHECK(false, "float32 or bfloat16");
  }
  return sum_or_divisor(total, numel, g.options().dtype(torch::kFloat));
}

// atan2(y, x) within 2 ulp (torch.atan2: Sleef's 1-ulp version, three to four times the arithmetic, which
// made Adam-atan2's update pass bound by it). Written without branches so that the loops calling it vectorise:
// atan(t) = t + t^3 P(t^2) on t = min(|x|, |y|) / max(|x|, |y|) in [0, 1], P fitted for this project (a degree-7
// polynomial minimising the maximum relative error, about 1.7e-8 before rounding; 1.05 ulp in fp32 arithmetic),
// then the octant from the comparisons and the signs. The special values are those of atan2: (±0, ±0), the
// infinities (±pi/4 and ±3pi/4 for two of them) and NaN.
static inline float atan2_fast(float y, float x) {
  const float ay = std::fabs(y), ax = std::fabs(x);
  const float big = ay > ax ? ay : ax, small = ay > ax ? ax : ay;
  float t = small / big;
  t = ay == ax ? 1.f : t;  // (inf, inf): pi/4 (and exactly 1 for |y| = |x| anyway)
  t = big == 0.f ? 0.f : t;  // (0, 0): 0 or pi with the signs
  const float t2 = t * t;
  float p = 2.920656931e-03f;
  p = fma_(p, t2, -1.636779681e-02f);
  p = fma_(p, t2, 4.321166128e-02f);
  p = fma_(p, t2, -7.552198321e-02f);
  p = fma_(p, t2, 1.066599786e-01f);
  p = fma_(p, t2, -1.421105415e-01f);
  p = fma_(p, t2, 1.999377310e-01f);
  p = fma_(p, t2, -3.333315253e-01f);
  float r = fma_(p * t2, t, t);
  r = ay > ax ? 1.57079637f - r : r;  // fp32 pi/2
  uint32_t xb, yb, rb;
  std::memcpy(&xb, &x, 4);
  std::memcpy(&yb, &y, 4);
  r = (xb >> 31) ? 3.14159274f - r : r;  // x < 0 or x = -0: pi - atan (fp32 pi)
  std::memcpy(&rb, &r, 4);
  rb |= yb & 0x80000000u;  // the sign of y
  std::memcpy(&r, &rb, 4);
  return x != x || y != y ? x + y : r;
}

// The Schedule-Free update of one row of a factored tensor, with the operations of the compiled update
// (prodigy_dist.compiled._update_pass), in fp32: u = (g d) / (a c_j + d eps) [/ scale] [+ lam y], or with ATAN2
// (eps=None) u = 4/pi atan2(g d, a c_j); y <- lerp(y, z, w) - dlr xy u [- lam xy y], z <- z - dlr u [- lam y].
// DECAY: 0 none, 1 by lr, 2 raw. T: the element type of g, y and z (float, or bf16 bits); the results are stored
// as T: STORE 0 fp32, 1 bf16 rounded to nearest even (as torch's conversion), 2 bf16 rounded stochastically with
// the noise ny, nz (as prodigy_dist.rounding: the fp32 bits plus the noise, truncated).
template <int STORE>
static inline void store(float* p, float v, int32_t) { *p = v; }
template <int STORE>
static inline void store(uint16_t* p, float v, int32_t noise) {
  if (STORE == 1) {
    *p = bf16_bits(round_bf16(v));
  } else {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    *p = uint16_t((bits + uint32_t(noise)) >> 16);
  }
}

// FULL: the full second moment v instead of the factors a, c: the denominator is sqrt(v) (+ d eps), rounded like
// the storage; without StableAdamW (no RMS pass before) v is updated here first, as in the RMS pass.
template <typename T, int STORE, bool STABLE, int DECAY, bool ATAN2, bool FULL>
static inline void update_row(const T* __restrict g, T* __restrict y, T* __restrict z, T* __restrict v,
                              const float* __restrict c, int64_t cols, float a, const float* __restrict k,
                              float scale, const int32_t* __restrict ny, const int32_t* __restrict nz) {
  constexpr bool low = sizeof(T) == 2;
  const float d = k[0], eps = k[1], w = k[6], ndlr = k[7], ndlr_xy = k[8], lam = k[9], nlam = k[10],
              nlam_xy = k[11], beta2 = k[4], v_alpha = k[5];
  const float eps_full = low ? round_bf16(eps) : eps;
  const bool near = std::fabs(w) < 0.5f;  // torch.lerp's two forms
  #pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    const float gv = as_float(g[j]);
    float den;
    if (FULL) {
      float vn = as_float(v[j]);
      if (!STABLE) {
        vn = ema<low>(vn, beta2, (gv * gv) * v_alpha);
        put(v + j, vn);
      }
      den = full_denominator<low, !ATAN2>(vn, eps_full);
    } else {
      den = ATAN2 ? a * c[j] : a * c[j] + eps;
    }
    float u = ATAN2 ? atan2_fast(gv * d, den) * 1.2732395f : (gv * d) / den;
    if (STABLE) u = u / scale;
    const float yv = as_float(y[j]), zv = as_float(z[j]);
    if (DECAY == 1) u = u + yv * lam;
    const float diff = zv - yv;
    float yn = near ? yv + w * diff : zv - diff * (1.f - w);
    float zn = zv + u * ndlr;
    yn = yn + u * ndlr_xy;
    if (DECAY == 2) {
      zn = zn + yv * nlam;
      yn = yn + yv * nlam_xy;
    }
    store<STORE>(z + j, zn, STORE == 2 ? nz[j] : 0);
    store<STORE>(y + j, yn, STORE == 2 ? ny[j] : 0);
  }
}

// Rows [b, e) of a tensor; with zs, z's new sampled values too (start >= 0); with STORE 2 the noise of flat element
// f of the y (z) stream is table[(start_y (start_z) + f) % table_size] (the table is stored twice in a row, so a
// row's noise is one slice).
template <typename T, int STORE, bool STABLE, int DECAY, bool ATAN2, bool FULL>
static void update_row_range(const T* g, T* y, T* z, T* v, const float* a, const float* c, int64_t b, int64_t e,
                             int64_t cols, const float* k, float scale, int64_t start, T* zs, const int32_t* table,
                             int64_t table_size, int64_t start_y, int64_t start_z) {
  for (int64_t i = b; i < e; ++i) {
    const int64_t first = i * cols;
    const int32_t* ny = STORE == 2 ? table + (start_y + first) % table_size : nullptr;
    const int32_t* nz = STORE == 2 ? table + (start_z + first) % table_size : nullptr;
    update_row<T, STORE, STABLE, DECAY, ATAN2, FULL>(g + first, y + first, z + first, FULL ? v + first : nullptr,
                                                     c, cols, FULL ? 0.f : a[i], k, scale, ny, nz);
    if (zs == nullptr) continue;
    const int64_t q0 = first_sample(first, start);  // (z's row is in cache)
    T* __restrict out = zs + (q0 - start) / 11;
    for (int64_t q = q0 - first; q < cols; q += 11) *out++ = z[first + q];
  }
}

// Rows per share of an update pass's parallel work (~16K elements).
static inline int64_t update_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols)); }

// All the rows of a tensor, split among the threads.
template <typename T, int STORE, bool STABLE, int DECAY, bool ATAN2, bool FULL>
static void update_rows(const T* g, T* y, T* z, T* v, const float* a, const float* c, int64_t rows, int64_t cols,
                        const float* k, float scale, int64_t start, T* zs, const int32_t* table, int64_t table_size,
                        int64_t start_y, int64_t start_z) {
  at::parallel_for(0, rows, update_grain(cols), [=](int64_t b, int64_t e) {
    update_row_range<T, STORE, STABLE, DECAY, ATAN2, FULL>(g, y, z, v, a, c, b, e, cols, k, scale, start, zs, table,
                                                           table_size, start_y, start_z);
  });
}

template <typename F>
static void with_bool(bool value, F f) {
  if (value) f(std::true_type{}); else f(std::false_type{});
}
template <typename F>
static void with_int3(int64_t value, F f) {  // value in {0, 1, 2}
  if (value == 0) f(std::integral_constant<int, 0>{});
  else if (value == 1) f(std::integral_constant<int, 1>{});
  else f(std::integral_constant<int, 2>{});
}

// f(element, store mode) for the storage of the results: fp32 (STORE 0); bf16 rounded stochastically with the noise
// table (2), else to nearest even (1).
template <typename F>
static void with_storage(torch::ScalarType dtype, bool noise, F f) {
  if (dtype == torch::kFloat) f(float{}, std::integral_constant<int, 0>{});
  else if (noise) f(uint16_t{}, std::integral_constant<int, 2>{});
  else f(uint16_t{}, std::integral_constant<int, 1>{});
}

// The compile-time variant of an update pass, as a type.
template <typename Element, int Store, bool Stable, int Decay, bool Atan2, bool Full>
struct UpdateVariant {
  using T = Element;
  static constexpr int STORE = Store;
  static constexpr bool STABLE = Stable, ATAN2 = Atan2, FULL = Full;
  static constexpr int DECAY = Decay;
};

// f(UpdateVariant<...>{}) for the run-time options: element type and storage from the dtype (fp32; bf16 rounded
// stochastically with `noise`, else to nearest), StableAdamW, weight decay (0, 1, 2), atan2, full second moment.
// (atan2 never comes with StableAdamW: that variant is not instantiated.)
template <typename F>
static void with_update_variant(torch::ScalarType dtype, bool noise, bool stable, int64_t decay, bool atan2,
                                bool full, F f) {
  with_storage(dtype, noise, [&](auto element, auto store_mode) {
    using T = std::decay_t<decltype(element)>;
    constexpr int STORE = std::decay_t<decltype(store_mode)>::value;
    with_bool(stable, [&](auto s) {
      with_int3(decay, [&](auto d) {
        with_bool(atan2, [&](auto a) {
          with_bool(full, [&](auto fl) {
            constexpr bool S = decltype(s)::value, A = decltype(a)::value, FL = decltype(fl)::value;
            constexpr int D = decltype(d)::value;
            if constexpr (!(S && A)) f(UpdateVariant<T, STORE, S, D, A, FL>{});
          });
        });
      });
    });
  });
}

// In place on y and z (contiguous, 2-D; g, y, z all fp32 or all bf16): the update above, with the factors a, c or
// (v given) the full second moment; with start >= 0, also z's new values at flat indices start + 11 n into zs (the
// next step's statistics read them there instead of walking z). bf16: with a table, stochastic rounding (start_y,
// start_z: the streams' table starts of flat element 0); without, rounding to nearest even.
// Whether update_sf takes these tensors (dtypes, devices, memory layouts).
static bool update_applies(const torch::Tensor& g, const torch::Tensor& y, const torch::Tensor& z,
                           const c10::optional<torch::Tensor>& a, const c10::optional<torch::Tensor>& c,
                           const c10::optional<torch::Tensor>& v, const torch::Tensor& k,
                           const c10::optional<torch::Tensor>& table, int64_t start,
                           const c10::optional<torch::Tensor>& zs) {
  const auto dtype = g.scalar_type();
  const auto f32 = torch::kFloat;
  return (dtype == torch::kFloat || dtype == torch::kBFloat16) && g.dim() == 2 && cpu_dense(g, dtype) &&
         cpu_dense(y, dtype) && cpu_dense(z, dtype) && cpu_dense(k, f32) &&
         (v.has_value() ? cpu_dense(*v, dtype) :
                          (a.has_value() && c.has_value() && cpu_dense(*a, f32) && cpu_dense(*c, f32))) &&
         (!table.has_value() || (dtype == torch::kBFloat16 && cpu_dense(*table, torch::kInt) &&
                                 g.size(1) <= table->numel() / 2)) &&
         (start < 0 || (zs.has_value() && cpu_dense(*zs, dtype)));
}

// Returns false (nothing written) where the tensors' dtypes, devices or memory layouts are not the kernel's; raises on
// inconsistent arguments (an internal error).
bool update_sf(torch::Tensor g, torch::Tensor y, torch::Tensor z, c10::optional<torch::Tensor> a,
               c10::optional<torch::Tensor> c, c10::optional<torch::Tensor> v, torch::Tensor k,
               c10::optional<torch::Tensor> scale, int64_t decay, bool atan2, int64_t start,
               c10::optional<torch::Tensor> zs, c10::optional<torch::Tensor> table, int64_t start_y,
               int64_t start_z) {
  const auto dtype = g.scalar_type();
  const bool full = v.has_value();
  if (!update_applies(g, y, z, a, c, v, k, table, start, zs) || (scale.has_value() &&
                                                                !cpu_dense(*scale, torch::kFloat)))
    return false;
  TORCH_CHECK(y.sizes() == g.sizes() && z.sizes() == g.sizes(), "g, y, z: one shape");
  TORCH_CHECK(full ? v->sizes() == g.sizes() : (a->numel() == g.size(0) && c->numel() == g.size(1)),
              "v: g's shape; or a, c: the factors of g's rows and columns");
  TORCH_CHECK(k.numel() >= 12, "k: the step's scalars");
  TORCH_CHECK(!scale.has_value() || scale->numel() == 1, "scale: one value");
  TORCH_CHECK(decay >= 0 && decay <= 2, "decay: 0, 1 or 2");
  TORCH_CHECK(!(atan2 && scale.has_value()), "atan2 (eps=None) has no StableAdamW scale");
  const int64_t rows = g.size(0), cols = g.size(1), numel = rows * cols;
  const int32_t* table_ptr = nullptr;
  int64_t table_size = 0;
  if (table.has_value()) {
    table_size = table->numel() / 2;
    TORCH_CHECK(start_y >= 0 && start_z >= 0 && start_y < table_size && start_z < table_size,
                "table starts: in the table");
    table_ptr = table->data_ptr<int32_t>();
  }
  void* zs_ptr = nullptr;
  if (start >= 0) {
    TORCH_CHECK(zs->numel() == sample_count(numel, start), "zs: one value per sample");
    zs_ptr = zs->data_ptr();
  }
  const float sc = scale.has_value() ? scale->data_ptr<float>()[0] : 1.f;
  const float* ap = full ? nullptr : a->data_ptr<float>();
  const float* cp = full ? nullptr : c->data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  with_update_variant(dtype, table_ptr != nullptr, scale.has_value(), decay, atan2, full, [&](auto variant) {
    using V = decltype(variant);
    using T = typename V::T;
    update_rows<T, V::STORE, V::STABLE, V::DECAY, V::ATAN2, V::FULL>(
        static_cast<const T*>(g.data_ptr()), static_cast<T*>(y.data_ptr()), static_cast<T*>(z.data_ptr()),
        V::FULL ? static_cast<T*>(v->data_ptr()) : nullptr, ap, cp, rows, cols, kp, sc, start,
        static_cast<T*>(zs_ptr), table_ptr, table_size, start_y, start_z);
  });
  return true;
}

// update_sf for several tensors of a bucket in one call: the Python-level work of a call per tensor costs more, from
// a cold cache, than the arithmetic of a small matrix. The factored ones with their factors as, cs (vs empty), or
// (as, cs empty) those with the full second moment vs. With rms_each (one process) each tensor's StableAdamW divisor
// comes from scales (one per tensor) where that is finite, else from its RMS pass right before its update (so the
// update reads g from cache), computed as rms_factored (or rms_full_sf, which writes v) does; without rms_each from
// scales or none. Where a tensor takes its RMS pass, tensor after tensor (each pass over all threads); else the rows
// of all the tensors split among the threads at once. Returns false (nothing written) unless every tensor is the
// kernel's.
bool update_sf_many(std::vector<torch::Tensor> gs, std::vector<torch::Tensor> ys, std::vector<torch::Tensor> zs,
                    std::vector<torch::Tensor> as, std::vector<torch::Tensor> cs, std::vector<torch::Tensor> vs,
                    torch::Tensor k, c10::optional<torch::Tensor> scales, bool rms_each, double d, double eps_term,
                    std::vector<int64_t> numels, int64_t decay, bool atan2, std::vector<int64_t> starts,
                    std::vector<c10::optional<torch::Tensor>> samples_out, c10::optional<torch::Tensor> table,
                    std::vector<int64_t> start_y, std::vector<int64_t> start_z) {
  const size_t n = gs.size();
  const bool full = !vs.empty();
  TORCH_CHECK(ys.size() == n && zs.size() == n && (full ? (vs.size() == n && as.empty() && cs.empty()) :
              (as.size() == n && cs.size() == n)) && numels.size() == n && starts.size() == n &&
              samples_out.size() == n && (!table.has_value() || (start_y.size() == n && start_z.size() == n)),
              "one entry per tensor");
  const c10::optional<torch::Tensor> none;
  for (size_t i = 0; i < n; ++i)
    if (gs[i].scalar_type() != gs[0].scalar_type() ||
        !update_applies(gs[i], ys[i], zs[i], full ? none : c10::optional<torch::Tensor>(as[i]),
                        full ? none : c10::optional<torch::Tensor>(cs[i]),
                        full ? c10::optional<torch::Tensor>(vs[i]) : none, k, table, starts[i], samples_out[i]))
      return false;
  if (scales.has_value() && !cpu_dense(*scales, torch::kFloat)) return false;
  TORCH_CHECK(!(atan2 && (rms_each || scales.has_value())), "rms_each or scales, never with atan2");
  TORCH_CHECK(!scales.has_value() || scales->numel() == int64_t(n), "scales: one per tensor");
  TORCH_CHECK(k.numel() >= 12 && decay >= 0 && decay <= 2, "k: the step's scalars; decay: 0, 1 or 2");
  for (size_t i = 0; i < n; ++i) {
    const torch::Tensor& g = gs[i];
    TORCH_CHECK(ys[i].sizes() == g.sizes() && zs[i].sizes() == g.sizes() && (full ? vs[i].sizes() == g.sizes() :
                (as[i].numel() == g.size(0) && cs[i].numel() == g.size(1))),
                "g, y, z (v): one shape; a, c: the factors of its rows and columns");
    TORCH_CHECK(starts[i] < 0 || samples_out[i]->numel() == sample_count(g.numel(), starts[i]),
                "samples: one value per sample");
  }
  const auto dtype = gs.empty() ? torch::kFloat : gs[0].scalar_type();
  const int32_t* table_ptr = table.has_value() ? table->data_ptr<int32_t>() : nullptr;
  const int64_t table_size = table.has_value() ? table->numel() / 2 : 0;
  const float* kp = k.data_ptr<float>();
  const bool stable = rms_each || scales.has_value();
  if (table_ptr != nullptr)
    for (size_t i = 0; i < n; ++i)
      TORCH_CHECK(start_y[i] >= 0 && start_z[i] >= 0 && start_y[i] < table_size && start_z[i] < table_size,
                  "table starts: in the table");
  bool rms_needed = false;  // a tensor's divisor from its RMS pass
  for (size_t i = 0; i < n && rms_each && !rms_needed; ++i)
    rms_needed = !(scales.has_value() && std::isfinite(scales->data_ptr<float>()[i]));
  with_update_variant(dtype, table_ptr != nullptr, stable, decay, atan2, full, [&](auto variant) {
    using V = decltype(variant);
    using T = typename V::T;
    // rows [b, e) of tensor i, with its StableAdamW divisor
    const auto rows_of = [&](size_t i, int64_t b, int64_t e, float scale) {
      update_row_range<T, V::STORE, V::STABLE, V::DECAY, V::ATAN2, V::FULL>(
          static_cast<const T*>(gs[i].data_ptr()), static_cast<T*>(ys[i].data_ptr()),
          static_cast<T*>(zs[i].data_ptr()), full ? static_cast<T*>(vs[i].data_ptr()) : nullptr,
          full ? nullptr : as[i].data_ptr<float>(), full ? nullptr : cs[i].data_ptr<float>(), b, e, gs[i].size(1), kp,
          scale, starts[i], starts[i] >= 0 ? static_cast<T*>(samples_out[i]->data_ptr()) : nullptr, table_ptr,
          table_size, table_ptr != nullptr ? start_y[i] : 0, table_ptr != nullptr ? start_z[i] : 0);
    };
    const auto given = [&](size_t i) { return scales.has_value() ? scales->data_ptr<float>()[i] : 1.f; };
    if (!rms_needed) {
      // Every divisor known: the tensors' rows in shares of update_grain rows, all in one parallel region (a region
      // per tensor left threads idle on small matrices: each waits for the slowest share of every tensor).
      std::vector<std::array<int64_t, 3>> shares;  // (tensor, first row, end row)
      for (size_t i = 0; i < n; ++i) {
        const int64_t rows = gs[i].size(0), grain = update_grain(gs[i].size(1));
        for (int64_t r = 0; r < rows; r += grain) shares.push_back({int64_t(i), r, std::min(rows, r + grain)});
      }
      at::parallel_for(0, int64_t(shares.size()), 1, [&](int64_t begin, int64_t end) {
        for (int64_t w = begin; w < end; ++w) {
          const size_t i = size_t(shares[w][0]);
          rows_of(i, shares[w][1], shares[w][2], given(i));
        }
      });
      return;
    }
    for (size_t i = 0; i < n; ++i) {
      const torch::Tensor& g = gs[i];
      const int64_t rows = g.size(0), cols = g.size(1);
      float scale = given(i);
      if (rms_each && !(scales.has_value() && std::isfinite(scale))) {
        const T* gp = static_cast<const T*>(g.data_ptr());
        const double total = full ? rms_full_elements<T>(gp, static_cast<T*>(vs[i].data_ptr()), g.numel(), kp) :
            rms_rows<T>(gp, as[i].data_ptr<float>(), cs[i].data_ptr<float>(), rows, cols, float(d), float(eps_term));
        scale = sum_or_divisor(total, numels[i], g.options().dtype(torch::kFloat)).data_ptr<float>()[0];
      }
      // (tensor after tensor: the update reads g from cache, right after the RMS pass)
      at::parallel_for(0, rows, update_grain(cols), [&](int64_t b, int64_t e) { rows_of(i, b, e, scale); });
    }
  });
  return true;
}

// Prodigy mode (no Schedule-Free): the update of one row of a factored tensor, with the operations of the compiled
// update (prodigy_dist.compiled._update_pass with _moments and _direction), in fp32: the first moment m from the RMS
// pass (MOMENTS_DONE: with StableAdamW), else m <- beta1 m + (1 - beta1) d g here, rounded like its storage at each
// operation and stored; u = m / (a c_j + d eps) [/ scale], or with ATAN2 4/pi atan2(m, a c_j);
// y <- y [* (1 - decay)] - dlr u (SCALE: the weight decay of Prodigy mode). STORE as in update_row (y only).
template <typename T, int STORE, bool STABLE, bool SCALE, bool ATAN2>
static inline void update_prodigy_row(const T* __restrict g, T* __restrict y, T* __restrict m,
                                      const float* __restrict c, int64_t cols, float a, const float* __restrict k,
                                      float scale, const int32_t* __restrict ny) {
  constexpr bool low = sizeof(T) == 2;
  constexpr bool MOMENTS_DONE = STABLE;
  const float eps = k[1], beta1 = k[2], m_alpha = k[3], ndlr = k[7], keep = k[12];
  #pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    float mv;
    if (MOMENTS_DONE) {
      mv = as_float(m[j]);
    } else {
      mv = ema<low>(as_float(m[j]), beta1, as_float(g[j]) * m_alpha);
      put(m + j, mv);
    }
    float u;
    if (ATAN2) {
      u = atan2_fast(mv, a * c[j]) * 1.2732395f;
    } else {
      u = mv / (a * c[j] + eps);
    }
    if (STABLE) u = u / scale;
    float yn = as_float(y[j]);
    if (SCALE) yn = yn * keep;
    yn = yn + u * ndlr;
    store<STORE>(y + j, yn, STORE == 2 ? ny[j] : 0);
  }
}

// The Prodigy-mode update of the factored tensors of a bucket in one call, tensor after tensor (each pass over all
// threads), as update_sf_many does for Schedule-Free: with rms_each (one process, StableAdamW) each tensor's
// RMS pass (which writes the new first moment, rms_prodigy_factored) right before its update, so that the update
// reads m from cache; else with scales (the moments written by the RMS passes before), or neither (no StableAdamW:
// the moments computed here). decay: 0 none, 1 the weight decay of Prodigy mode (y * k[12]). bf16 with a table:
// stochastic rounding of y from start_y[i] (as update_sf_many's y stream). Returns false (nothing written)
// unless every tensor is the kernel's.
bool update_prodigy_factored_many(std::vector<torch::Tensor> gs, std::vector<torch::Tensor> ys,
                                  std::vector<torch::Tensor> ms, std::vector<torch::Tensor> as,
                                  std::vector<torch::Tensor> cs, torch::Tensor k, c10::optional<torch::Tensor> scales,
                                  bool rms_each, std::vector<int64_t> numels, int64_t decay, bool atan2,
                                  c10::optional<torch::Tensor> table, std::vector<int64_t> start_y) {
  const size_t n = gs.size();
  TORCH_CHECK(ys.size() == n && ms.size() == n && as.size() == n && cs.size() == n && numels.size() == n &&
              (!table.has_value() || start_y.size() == n), "one entry per tensor");
  const c10::optional<torch::Tensor> none;
  for (size_t i = 0; i < n; ++i)
    if (gs[i].scalar_type() != gs[0].scalar_type() || !cpu_dense(ms[i], gs[i].scalar_type()) ||
        !update_applies(gs[i], ys[i], ms[i], as[i], cs[i], none, k, table, -1, none))
      return false;
  if (scales.has_value() && !cpu_dense(*scales, torch::kFloat)) return false;
  const bool stable = rms_each || scales.has_value();
  TORCH_CHECK(!(atan2 && stable), "rms_each or scales, never with atan2");
  TORCH_CHECK(!scales.has_value() || scales->numel() == int64_t(n), "scales: one per tensor");
  TORCH_CHECK(k.numel() >= 13 && (decay == 0 || decay == 1), "k: the step's scalars; decay: 0 or 1");
  const auto dtype = gs.empty() ? torch::kFloat : gs[0].scalar_type();
  const int32_t* table_ptr = table.has_value() ? table->data_ptr<int32_t>() : nullptr;
  const int64_t table_size = table.has_value() ? table->numel() / 2 : 0;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(ys[i].sizes() == gs[i].sizes() && ms[i].sizes() == gs[i].sizes() && as[i].numel() == gs[i].size(0) &&
                cs[i].numel() == gs[i].size(1), "g, y, m: one shape; a, c: the factors of its rows and columns");
    if (table_ptr != nullptr)
      TORCH_CHECK(start_y[i] >= 0 && start_y[i] < table_size, "table starts: in the table");
  }
  const float* kp = k.data_ptr<float>();
  for (size_t i = 0; i < n; ++i) {
    const torch::Tensor& g = gs[i];
    const int64_t rows = g.size(0), cols = g.size(1);
    const float* ap = as[i].data_ptr<float>();
    const float* cp = cs[i].data_ptr<float>();
    float scale = scales.has_value() ? scales->data_ptr<float>()[i] : 1.f;
    if (rms_each) {
      const double total = dtype == torch::kFloat ?
          rms_moment_rows<float>(g.data_ptr<float>(), ms[i].data_ptr<float>(), ap, cp, rows, cols, kp[2], kp[3],
                                 kp[1]) :
          rms_moment_rows<uint16_t>(reinterpret_cast<const uint16_t*>(g.data_ptr()),
                                    reinterpret_cast<uint16_t*>(ms[i].data_ptr()), ap, cp, rows, cols, kp[2], kp[3],
                                    kp[1]);
      scale = sum_or_divisor(total, numels[i], g.options().dtype(torch::kFloat)).data_ptr<float>()[0];
    }
    const int64_t sy = table_ptr != nullptr ? start_y[i] : 0;
    auto run = [&](auto element, auto store_mode, auto stable_c, auto scale_c, auto atan2_c) {
      using T = std::decay_t<decltype(element)>;
      constexpr int STORE = std::decay_t<decltype(store_mode)>::value;
      constexpr bool S = decltype(stable_c)::value, SC = decltype(scale_c)::value, A = decltype(atan2_c)::value;
      if constexpr (!(S && A)) {
        const T* gp = static_cast<const T*>(g.data_ptr());
        T* yp = static_cast<T*>(ys[i].data_ptr());
        T* mp = static_cast<T*>(ms[i].data_ptr());
        at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols)), [=](int64_t b, int64_t e) {
          for (int64_t r = b; r < e; ++r) {
            const int64_t first = r * cols;
            const int32_t* ny = STORE == 2 ? table_ptr + (sy + first) % table_size : nullptr;
            update_prodigy_row<T, STORE, S, SC, A>(gp + first, yp + first, mp + first, cp, cols, ap[r], kp, scale,
                                                   ny);
          }
        });
      }
    };
    with_storage(dtype, table_ptr != nullptr, [&](auto element, auto store_mode) {
      with_bool(stable, [&](auto s) {
        with_bool(decay == 1, [&](auto sc) { with_bool(atan2, [&](auto a) { run(element, store_mode, s, sc, a); }); });
      });
    });
  }
  return true;
}

// StableAdamW's divisor of a factored tensor from the accumulators of its statistics pass (rows_expand): with the
// final moment G of the factor indexed by the columns and P_j = G_j / mean r, the update is u_ij = g_ij / (x_ij +
// eps) with x_ij = sqrt(f_i P_j), t = eps / x <= t_max = eps / sqrt(min f min P), and sum u^2 = S0 - 2 eps S1 +
// 3 eps^2 S2 - R with S_k = sum_j E_k[j] P_j^(-1-k/2) and 0 <= R <= 4 t_max eps^2 S2 (Taylor's remainder of
// (1 + t)^-2 is at most 4 t^3). Taken (sqrt(max(sqrt(sum / numel), 1)), as sum_or_divisor) only where that bound is
// below 2^-24 of the sum, an ulp (the divisor, its fourth root, moves by less than a quarter ulp); else NaN: the
// caller runs the tensor's RMS pass.
static float expansion_divisor(const c10::optional<torch::Tensor>& expansion, const float* G, int64_t n_cols,
                               float mean, double eps, int64_t numel) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (!expansion.has_value()) return nan;
  TORCH_CHECK(cpu_dense(*expansion, torch::kFloat) && expansion->numel() == 4 * n_cols,
              "expansion: the accumulators of the statistics pass, (4, cols)");
  const float* e = expansion->data_ptr<float>();
  // (fp32 over chunks of 256 columns, vectorised, added in double)
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
  float p_min = std::numeric_limits<float>::infinity();
  int bad = 0;
  const float inv_mean = 1.f / mean, inf = std::numeric_limits<float>::infinity();
  for (int64_t j0 = 0; j0 < n_cols; j0 += 256) {
    const int64_t j1 = std::min(n_cols, j0 + 256);
    float c0 = 0.f, c1 = 0.f, c2 = 0.f;
    #pragma omp simd reduction(+:c0, c1, c2) reduction(min:p_min) reduction(|:bad)
    for (int64_t j = j0; j < j1; ++j) {
      const float a0 = e[j], a1 = e[n_cols + j], a2 = e[2 * n_cols + j];
      const bool used = a0 != 0.f || a1 != 0.f || a2 != 0.f;  // (not a column of zeros)
      const float p = G[j] * inv_mean;
      const float ip = 1.f / p;
      bad |= int(used && !(p >= 1e-30f));
      c0 += used ? a0 * ip : 0.f;
      c1 += used ? (a1 * ip) / std::sqrt(p) : 0.f;
      c2 += used ? (a2 * ip) * ip : 0.f;
      p_min = std::min(p_min, used ? p : inf);
    }
    s0 += c0;
    s1 += c1;
    s2 += c2;
  }
  if (bad) return nan;
  const double total = s0 - 2.0 * eps * s1 + 3.0 * eps * eps * s2;
  if (total == 0.0 && s0 == 0.0) return 1.f;  // (g is zero)
  const double t_max = eps / std::sqrt(double(e[3 * n_cols]) * double(p_min));
  const double bound = 4.0 * t_max * eps * eps * s2;
  if (!(std::isfinite(total) && std::isfinite(bound) && bound <= std::ldexp(total, -24))) return nan;
  // sum_or_divisor's fp32 operations, without its ATen calls (four per tensor cost more than this function)
  return std::sqrt(std::max(std::sqrt(static_cast<float>(total) / static_cast<float>(numel)), 1.f));
}

// The factored second moments of a bucket's tensors, updated in place, and per tensor the square roots of the two
// factors of the estimate (prodigy_dist.compiled._factors, whose multi-tensor calls cost more host time than the
// arithmetic): moment <- beta2 moment + alpha (part * inv_count) for (r, row part, 1 / size along dr) and (c, column
// part, 1 / size along dc); then sqrt(r / (sum r / n_dc + 1e-30)) and sqrt(c). The sum of r is `r_totals[i]` where
// defined (the reduced sum of a piece sharded along dc). 2-D tensors only; nothing (and nothing written) unless every
// tensor is a contiguous fp32 CPU one. The sum of r is taken in double and the
// square roots with std::sqrt, without ATen operations (eight per tensor cost more than the arithmetic): equal to the
// multi-tensor operations there up to an ulp (their fp32 sum's order).
std::vector<torch::Tensor> factors_(std::vector<torch::Tensor> rs, std::vector<torch::Tensor> cs,
                                    std::vector<torch::Tensor> row_parts, std::vector<torch::Tensor> col_parts,
                                    std::vector<double> inv_r, std::vector<double> inv_c, std::vector<int64_t> n_dc,
                                    std::vector<int64_t> dcs, std::vector<c10::optional<torch::Tensor>> r_totals,
                                    double beta2, double alpha, std::vector<c10::optional<torch::Tensor>> expansions,
                                    double eps, std::vector<int64_t> numels) {
  const size_t n = rs.size();
  TORCH_CHECK(expansions.empty() || (expansions.size() == n && numels.size() == n), "one expansion per tensor");
  TORCH_CHECK(cs.size() == n && row_parts.size() == n && col_parts.size() == n && inv_r.size() == n &&
              inv_c.size() == n && n_dc.size() == n && dcs.size() == n && r_totals.size() == n, "one entry per tensor");
  for (size_t i = 0; i < n; ++i)  // (all checked before anything is written)
    if (!(cpu_dense(rs[i], torch::kFloat) && cpu_dense(cs[i], torch::kFloat) &&
          cpu_dense(row_parts[i], torch::kFloat) && cpu_dense(col_parts[i], torch::kFloat)))
      return {};
  const float b2 = float(beta2), al = float(alpha);
  std::vector<torch::Tensor> out;
  out.reserve(2 * n + 1);
  auto divisors_out = torch::empty({expansions.empty() ? 0 : int64_t(n)}, torch::dtype(torch::kFloat));
  float* divisors = divisors_out.data_ptr<float>();
  for (size_t i = 0; i < n; ++i) {
    for (int k = 0; k < 2; ++k) {
      torch::Tensor& m = k == 0 ? rs[i] : cs[i];
      const torch::Tensor& part = k == 0 ? row_parts[i] : col_parts[i];
      TORCH_CHECK(m.numel() == part.numel(), "moments and parts of one size");
      float* __restrict mp = m.data_ptr<float>();
      const float* __restrict pp = part.data_ptr<float>();
      const float inv = float(k == 0 ? inv_r[i] : inv_c[i]);
      const int64_t len = m.numel();
      #pragma omp simd
      for (int64_t j = 0; j < len; ++j) mp[j] = fma_(pp[j] * inv, al, mp[j] * b2);
    }
    // (2-D tensors: r has one value per index of dc, and its sum over dc is the sum of all of them)
    const float* __restrict r = rs[i].data_ptr<float>();
    const float* __restrict c = cs[i].data_ptr<float>();
    const int64_t nr = rs[i].numel(), nc = cs[i].numel();
    TORCH_CHECK(rs[i].dim() == 2 && cs[i].dim() == 2 && (dcs[i] == 0 || dcs[i] == 1) && rs[i].size(dcs[i]) == nr,
                "2-D factored moments");
    float total;
    if (r_totals[i].has_value()) {
      TORCH_CHECK(cpu_dense(*r_totals[i], torch::kFloat) && r_totals[i]->numel() == 1, "r_totals: one fp32 value");
      total = r_totals[i]->data_ptr<float>()[0];
    } else {
      double sum = 0.0;
      for (int64_t j = 0; j < nr; ++j) sum += r[j];
      total = float(sum);
    }
    const float mean = total / float(n_dc[i]) + 1e-30f;
    auto rn = torch::empty({nr}, rs[i].options());
    auto sc = torch::empty({nc}, cs[i].options());
    float* __restrict rp = rn.data_ptr<float>();
    float* __restrict cp = sc.data_ptr<float>();
    #pragma omp simd
    for (int64_t j = 0; j < nr; ++j) rp[j] = std::sqrt(r[j] / mean);
    #pragma omp simd
    for (int64_t j = 0; j < nc; ++j) cp[j] = std::sqrt(c[j]);
    out.push_back(rn);
    out.push_back(sc);
    if (!expansions.empty()) divisors[i] = expansion_divisor(expansions[i], dcs[i] == 0 ? c : r,
                                                             dcs[i] == 0 ? nc : nr, mean, eps, numels[i]);
  }
  if (!expansions.empty()) out.push_back(divisors_out);
  return out;
}

// ---- Lists of small tensors (a bucket's norm weights and biases): one call per pass for all of them, each tensor a
// single flat row of the kernels above, whole on one thread, the threads splitting the list (a Python-level call
// per tensor and pass costs more than a small tensor's arithmetic).

// The dtype of a list of gradients (contiguous CPU tensors, all fp32 or all bf16).
static torch::ScalarType list_dtype(const std::vector<torch::Tensor>& gs) {
  const auto dtype = gs.empty() ? torch::kFloat : gs[0].scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "gradients: fp32 or bf16");
  for (const auto& g : gs) TORCH_CHECK(cpu_dense(g, dtype), "gradients: contiguous CPU tensors of one dtype");
  return dtype;
}

static void check_like(const std::vector<torch::Tensor>& ts, const std::vector<torch::Tensor>& gs,
                       torch::ScalarType dtype, const char* what) {
  TORCH_CHECK(ts.size() == gs.size(), what, ": one tensor per gradient");
  for (size_t i = 0; i < ts.size(); ++i)
    TORCH_CHECK(cpu_dense(ts[i], dtype) && ts[i].numel() == gs[i].numel(), what,
                ": contiguous CPU tensors of the gradients' sizes and dtype");
}

// sum of g^2 over n elements: fp32 over chunks of 4096, added in double
template <typename T>
static double flat_squares(const T* __restrict g, int64_t n) {
  double total = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += 4096) {
    const int64_t b1 = std::min(n, b0 + 4096);
    float s = 0.f;
    #pragma omp simd reduction(+:s)
    for (int64_t j = b0; j < b1; ++j) {
      const float v = as_float(g[j]);
      s += v * v;
    }
    total += s;
  }
  return total;
}

// Phase A: per tensor its sum of g^2, and with p0s the Prodigy statistics of its samples (flat indices
// starts[i] + 11 n) as statistics() computes them for a single row, with x = xs[i]: sums[i] = [dot, sum |s_new|
// (SPEED, ss empty: sum |p0 - x|), SPEED's sum (p0 - x)^2] and the new s. Returns [sq (n), sums (n, 3), s_new...].
std::vector<torch::Tensor> statistics_list(std::vector<torch::Tensor> gs, std::vector<torch::Tensor> xs,
                                           std::vector<torch::Tensor> p0s, std::vector<torch::Tensor> ss,
                                           std::vector<int64_t> starts, double beta3, double delta) {
  const auto dtype = list_dtype(gs);
  const int64_t n = int64_t(gs.size());
  const bool prodigy = !p0s.empty(), speed = ss.empty();
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat);
  auto sq = torch::empty({n}, f32);
  auto sums = torch::zeros({n, 3}, f32);
  std::vector<torch::Tensor> out{sq, sums};
  std::vector<Sample> S;
  if (prodigy) {
    check_like(xs, gs, dtype, "xs");
    TORCH_CHECK(int64_t(p0s.size()) == n && int64_t(starts.size()) == n && (speed || int64_t(ss.size()) == n),
                "one p0, s and sample start per tensor");
    for (int64_t i = 0; i < n; ++i) {
      const int64_t count = sample_count(gs[i].numel(), starts[i]);
      TORCH_CHECK(starts[i] >= 0 && cpu_dense(p0s[i], torch::kBFloat16) && p0s[i].numel() == count &&
                  (speed || (cpu_dense(ss[i], torch::kBFloat16) && ss[i].numel() == count)),
                  "p0, s: contiguous bf16, one value per sample");
      auto s_new = torch::empty({speed ? 0 : count}, torch::TensorOptions().dtype(torch::kBFloat16));
      out.push_back(s_new);
      S.push_back(Sample{starts[i], xs[i].data_ptr(), nullptr, reinterpret_cast<const uint16_t*>(p0s[i].data_ptr()),
                         speed ? nullptr : reinterpret_cast<const uint16_t*>(ss[i].data_ptr()),
                         speed ? nullptr : reinterpret_cast<uint16_t*>(s_new.data_ptr()), float(beta3),
                         float(delta)});
    }
  }
  float* sq_out = sq.data_ptr<float>();
  float* sums_out = sums.data_ptr<float>();
  auto run = [&](auto element) {
    using T = decltype(element);
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T* g = static_cast<const T*>(gs[i].data_ptr());
        const int64_t numel = gs[i].numel();
        sq_out[i] = float(flat_squares(g, numel));
        if (!prodigy) continue;
        double acc[3] = {0.0, 0.0, 0.0};
        row_samples<T, false>(g, static_cast<const T*>(S[i].data), 0, numel, S[i], acc);
        for (int j = 0; j < 3; ++j) sums_out[3 * i + j] = float(acc[j]);
      }
    });
  };
  if (dtype == torch::kFloat) run(float{});
  else run(uint16_t{});
  return out;
}

// rms_full_sf for each tensor: v written, the sums of the squared update returned (n).
torch::Tensor rms_full_sf_list(std::vector<torch::Tensor> gs, std::vector<torch::Tensor> vs, torch::Tensor k) {
  const auto dtype = list_dtype(gs);
  check_like(vs, gs, dtype, "vs");
  TORCH_CHECK(cpu_dense(k, torch::kFloat) && k.numel() >= 6, "k: the step's scalars");
  const int64_t n = int64_t(gs.size());
  auto out = torch::empty({n}, torch::TensorOptions().dtype(torch::kFloat));
  float* o = out.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  auto run = [&](auto element) {
    using T = decltype(element);
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        o[i] = float(rms_full_part<T>(static_cast<const T*>(gs[i].data_ptr()), static_cast<T*>(vs[i].data_ptr()),
                                      0, gs[i].numel(), kp));
    });
  };
  if (dtype == torch::kFloat) run(float{});
  else run(uint16_t{});
  return out;
}

// update_sf with the full second moment for each tensor (scales: StableAdamW's divisor per tensor; bf16 with a
// table: stochastic rounding from the streams' starts per tensor).
void update_sf_full_list(std::vector<torch::Tensor> gs, std::vector<torch::Tensor> ys, std::vector<torch::Tensor> zs,
                         std::vector<torch::Tensor> vs, torch::Tensor k, c10::optional<torch::Tensor> scales,
                         int64_t decay, bool atan2, c10::optional<torch::Tensor> table, std::vector<int64_t> start_y,
                         std::vector<int64_t> start_z) {
  const auto dtype = list_dtype(gs);
  const int64_t n = int64_t(gs.size());
  check_like(ys, gs, dtype, "ys");
  check_like(zs, gs, dtype, "zs");
  check_like(vs, gs, dtype, "vs");
  TORCH_CHECK(cpu_dense(k, torch::kFloat) && k.numel() >= 12, "k: the step's scalars");
  TORCH_CHECK(!scales.has_value() || (cpu_dense(*scales, torch::kFloat) && scales->numel() == n),
              "scales: one fp32 value per tensor");
  TORCH_CHECK(decay >= 0 && decay <= 2, "decay: 0, 1 or 2");
  TORCH_CHECK(!(atan2 && scales.has_value()), "atan2 (eps=None) has no StableAdamW scale");
  const int32_t* table_ptr = nullptr;
  if (table.has_value()) {
    const int64_t table_size = table->numel() / 2;
    TORCH_CHECK(dtype == torch::kBFloat16 && cpu_dense(*table, torch::kInt) && int64_t(start_y.size()) == n &&
                int64_t(start_z.size()) == n, "table: the doubled int32 noise table (bf16 only), starts per tensor");
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(gs[i].numel() <= table_size && start_y[i] >= 0 && start_z[i] >= 0 && start_y[i] < table_size &&
                  start_z[i] < table_size, "tensors no longer than the noise table, starts in it");
    table_ptr = table->data_ptr<int32_t>();
  }
  const float* sc = scales.has_value() ? scales->data_ptr<float>() : nullptr;
  const float* kp = k.data_ptr<float>();
  with_update_variant(dtype, table_ptr != nullptr, scales.has_value(), decay, atan2, true, [&](auto variant) {
    using V = decltype(variant);
    using T = typename V::T;
    if constexpr (V::FULL) {
      at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          update_row<T, V::STORE, V::STABLE, V::DECAY, V::ATAN2, true>(
              static_cast<const T*>(gs[i].data_ptr()), static_cast<T*>(ys[i].data_ptr()),
              static_cast<T*>(zs[i].data_ptr()), static_cast<T*>(vs[i].data_ptr()), nullptr, gs[i].numel(), 0.f, kp,
              sc != nullptr ? sc[i] : 1.f, V::STORE == 2 ? table_ptr + start_y[i] : nullptr,
              V::STORE == 2 ? table_ptr + start_z[i] : nullptr);
      });
    }
  });
}

// prodigy_dist.rounding.table_starts_many, the same 64-bit arithmetic: one round of its splitmix64-style hash.
static inline uint64_t mix_in(uint64_t h, uint64_t v) {
  h = (h ^ v) * 0xBF58476D1CE4E5B9ull;
  h = (h ^ (h >> 31)) * 0x94D049BB133111EBull;
  return h ^ (h >> 29);
}

// The noise-table starts of the parameter's and z's streams of several parameters at `step` (rounding.py's).
std::vector<std::vector<int64_t>> table_starts_many(int64_t step, std::vector<int64_t> offsets,
                                                   std::vector<int64_t> keys, int64_t table_size) {
  TORCH_CHECK(offsets.size() == keys.size() && table_size > 0, "one offset per key");
  std::vector<std::vector<int64_t>> out(2, std::vector<int64_t>(keys.size()));
  for (int stream = 0; stream < 2; ++stream) {
    const uint64_t h = mix_in(mix_in(0x9E3779B97F4A7C15ull, uint64_t(step)), uint64_t(stream));
    for (size_t i = 0; i < keys.size(); ++i) {
      TORCH_CHECK(offsets[i] >= 0, "offsets: not negative");
      out[stream][i] = int64_t(((mix_in(h, uint64_t(keys[i])) >> 1) + uint64_t(offsets[i])) % uint64_t(table_size));
    }
  }
  return out;
}

// out <- atan2_fast(y, x) (fp32, contiguous, one size): the update's atan2, for its tests.
void atan2_fast_(torch::Tensor out, torch::Tensor y, torch::Tensor x) {
  TORCH_CHECK(cpu_dense(out, torch::kFloat) && cpu_dense(y, torch::kFloat) && cpu_dense(x, torch::kFloat) &&
              y.numel() == out.numel() && x.numel() == out.numel(),
              "out, y, x: contiguous fp32 CPU tensors of one size");
  const float* __restrict yp = y.data_ptr<float>();
  const float* __restrict xp = x.data_ptr<float>();
  float* __restrict op = out.data_ptr<float>();
  #pragma omp simd
  for (int64_t i = 0; i < out.numel(); ++i) op[i] = atan2_fast(yp[i], xp[i]);
}

// target (bf16) <- source (fp32) + noise, truncated: the upper half of the noisy fp32 bits (prodigy_dist.rounding's
// stochastic rounding; inductor's CPU code turns the bit casts this needs into scalar loops).
void stochastic_round_(torch::Tensor target, torch::Tensor source, torch::Tensor noise) {
  TORCH_CHECK(target.scalar_type() == torch::kBFloat16 && source.scalar_type() == torch::kFloat &&
              noise.scalar_type() == torch::kInt && target.is_contiguous() && source.is_contiguous() &&
              noise.is_contiguous() && target.numel() == source.numel() && noise.numel() == source.numel() &&
              target.device().is_cpu() && source.device().is_cpu() && noise.device().is_cpu(),
              "bf16 target, fp32 source and int32 noise: contiguous CPU tensors of one size");
  const uint32_t* src = reinterpret_cast<const uint32_t*>(source.data_ptr());
  const uint32_t* add = reinterpret_cast<const uint32_t*>(noise.data_ptr());
  uint16_t* out = reinterpret_cast<uint16_t*>(target.data_ptr());
  at::parallel_for(0, source.numel(), 1 << 14, [=](int64_t begin, int64_t end) {
    const uint32_t* __restrict s = src;
    const uint32_t* __restrict n = add;
    uint16_t* __restrict o = out;
    #pragma omp simd
    for (int64_t i = begin; i < end; ++i) o[i] = uint16_t((s[i] + n[i]) >> 16);
  });
}
"""

#: Compiler flags per CPU capability (torch.backends.cpu.get_cpu_capability()); the build is named after it, so a
#: cache shared between machines never loads a build for instructions the CPU lacks.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2"],
    "AVX2": ["-mavx2", "-mfma"],
}

_lock = threading.Lock()
_module = None
_failed = False


#: Set to 0 to keep the native kernels off (the compiled kernels do their work; for comparisons and diagnosis).
ENV_SWITCH = "PRODIGY_DIST_NATIVE"


def _load():
    global _module, _failed
    if _module is not None or _failed:
        return _module
    if os.environ.get(ENV_SWITCH, "1") == "0":
        logger.info("%s=0: the native CPU kernels are off; the compiled path uses its own kernels", ENV_SWITCH)
        _failed = True
        return None
    with _lock:
        if _module is None and not _failed:
            try:
                from torch.utils.cpp_extension import load_inline
                isa = torch.backends.cpu.get_cpu_capability()
                flags = _ISA_FLAGS.get(isa, [])
                logger.info("loading the native CPU kernels (%s); the first use on a machine builds them, ~20 s (if "
                            "this waits much longer, a build killed midway left a 'lock' file in torch's extension "
                            "cache, $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions: delete it)", isa)
                _module = load_inline(name=f"prodigy_dist_native_v50_{isa.lower() if flags else 'base'}",
                                      cpp_sources=[_SOURCE],
                                      functions=["statistics", "statistics_many", "rms_factored", "stochastic_round_",
                                                 "update_sf", "atan2_fast_", "factors_",
                                                 "rms_prodigy_factored", "rms_full_sf", "statistics_list",
                                                 "rms_full_sf_list", "update_sf_full_list",
                                                 "update_sf_many", "update_prodigy_factored_many",
                                                 "table_starts_many"],
                                      extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"] + flags,
                                      extra_ldflags=["-fopenmp"],
                                      verbose=False)
            except Exception as e:  # no compiler, no ninja, a build error: keep the compiled kernels
                _failed = True
                logger.warning("the native CPU kernels could not be built (%s: %s); the compiled path uses its own "
                               "statistics and RMS kernels", type(e).__name__, str(e).splitlines()[0][:200])
    return _module


def available() -> bool:
    """Whether the native kernels are built (building them on the first call)."""
    return _load() is not None


def _applies(g: torch.Tensor) -> bool:
    return g.device.type == "cpu" and g.dim() == 2 and g.is_contiguous() and g.dtype in (torch.float32,
                                                                                          torch.bfloat16)


def statistics(g: torch.Tensor, sample: tuple | None = None, expansion: tuple | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """One pass over ``g`` (a contiguous 2-D fp32/bf16 CPU tensor): the sums of g^2 along dim 1 and along dim 0
    (fp32, keepdim: shapes (rows, 1) and (1, cols)), and with ``sample = (start, x, p0, s, beta3, delta[,
    compact])`` the Prodigy statistics of the elements at flat index start + 11 n: ``sums`` = fp32
    [dot(g, p0 - x), sum |s_new|, 0] where s_new = beta3 s + delta g (bf16, returned), or with ``s=None`` (SPEED)
    [dot, sum |p0 - x|, sum (p0 - x)^2]. ``x`` (z or the parameter) has g's shape and dtype, ``p0`` and ``s`` are
    contiguous bf16 vectors of the sample count. The roundings are those of prodigy_dist.compiled._sample_pass,
    except that the dot of bf16 parameters is left in fp32 (round it). ``compact``: x's sampled elements as a
    contiguous vector (what :func:`update_sf_factored` wrote), read instead of walking x. With ``expansion = (f_old,
    beta2, alpha, inv_cols, inv_d2)`` (``f_old``: the fp32 moment of the factor indexed by g's rows before this
    step, contiguous) a fifth value follows: the (4, cols) fp32 accumulators from which :func:`factors` computes
    StableAdamW's divisor without an RMS pass (see there). None when the kernel does not take the tensors (dtypes,
    devices, memory layouts) or could not be built."""
    # (the C++ function checks the dtypes, devices and layouts, and returns nothing where they are not its own)
    module = _load()
    if module is None:
        return None
    f_old, beta2, alpha, inv_cols, inv_d2 = expansion if expansion is not None else (None, 0.0, 0.0, 0.0, 0.0)
    if sample is None:
        out = module.statistics(g, -1, None, None, None, 0.0, 0.0, None, f_old, beta2, alpha, inv_cols, inv_d2)
        s = None
    else:
        start, x, p0, s, beta3, delta = sample[:6]
        compact = sample[6] if len(sample) > 6 else None
        out = module.statistics(g, start, x, p0, s, beta3, delta, compact, f_old, beta2, alpha, inv_cols, inv_d2)
    if not out:
        return None
    rows, cols, sums, s_new, expanded = out
    result = (rows, cols, None, None) if sample is None else (rows, cols, sums, s_new if s is not None else None)
    return result + (expanded,) if expansion is not None else result


def rms_factored(g: torch.Tensor, a: torch.Tensor, c: torch.Tensor, d: float, eps_term: float,
                 numel: int = 0) -> torch.Tensor | None:
    """sum over i, j of (d g_ij / (a_i c_j + eps_term))^2 as a 0-dim fp32 tensor (one pass over ``g``; ``a`` and
    ``c``: contiguous fp32 vectors of g's row and column counts), or with ``numel`` (the tensor's global element
    count) StableAdamW's divisor computed from it, sqrt(max(sqrt(sum / numel), 1)); None when the kernel does not
    apply or could not be built."""
    if not _applies(g) or a.dtype != torch.float32 or c.dtype != torch.float32:
        return None
    module = _load()
    if module is None:
        return None
    return module.rms_factored(g, a.contiguous(), c.contiguous(), d, eps_term, numel)


def rms_prodigy_factored(g: torch.Tensor, m: torch.Tensor, a: torch.Tensor, c: torch.Tensor,
                         scalars: torch.Tensor, numel: int = 0) -> torch.Tensor | None:
    """Prodigy mode's RMS pass over a factored 2-D tensor: the new first moment m <- beta1 m + (1 - beta1) d g,
    written in place (rounded like its storage, as prodigy_dist.compiled._moments), and sum over i, j of
    (m_ij / (a_i c_j + d eps))^2 as a 0-dim fp32 tensor, or with ``numel`` StableAdamW's divisor (as
    :func:`rms_factored`). ``g``, ``m``: contiguous, both fp32 or both bf16; ``scalars``: compiled._scalars. None
    (nothing written) when it does not apply or the kernels could not be built."""
    if not _applies(g) or m.dtype != g.dtype or m.shape != g.shape or not m.is_contiguous() \
            or m.device.type != "cpu" or any(t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu"
                                             for t in (a, c, scalars)):
        return None
    module = _load()
    if module is None:
        return None
    return module.rms_prodigy_factored(g, m, a, c, scalars, numel)


def rms_full_sf(g: torch.Tensor, v: torch.Tensor, scalars: torch.Tensor, numel: int = 0) -> torch.Tensor | None:
    """The RMS pass of Schedule-Free with the full second moment (``factored=False``): v <- beta2 v + (1 - beta2)
    d^2 g^2 written in place and sum (d g / (sqrt(v) + d eps))^2 as a 0-dim fp32 tensor (or with ``numel``
    StableAdamW's divisor), every operation rounded like the storage (prodigy_dist.compiled._moments, _direction).
    ``g``, ``v``: contiguous, of one size, both fp32 or both bf16; ``scalars``: compiled._scalars. None (nothing
    written) when it does not apply or the kernels could not be built."""
    if g.device.type != "cpu" or v.device.type != "cpu" or g.dtype not in (torch.float32, torch.bfloat16) \
            or v.dtype != g.dtype or v.numel() != g.numel() or not (g.is_contiguous() and v.is_contiguous()) \
            or scalars.dtype != torch.float32 or scalars.device.type != "cpu":
        return None
    module = _load()
    if module is None:
        return None
    return module.rms_full_sf(g, v, scalars, numel)


def statistics_many(gs: list[torch.Tensor], sample: tuple | None = None, expansion: tuple | None = None
                    ) -> tuple[torch.Tensor, list, list, list | None, list | None] | None:
    """:func:`statistics` of several 2-D tensors in one call (all fp32 or all bf16; every tensor's shares of rows in
    one parallel region, the same bits as one call per tensor). ``sample = (starts, xs, p0s, ss, beta3, delta,
    compacts)``: per tensor what :func:`statistics`'s sample holds (``ss=None``: SPEED; an entry of ``compacts`` may
    be None); ``expansion = (f_olds, beta2, alpha, inv_cols, inv_d2)``: per tensor f_old and inv_cols. Returns
    (sums, rows, cols, s_new, accumulators): ``sums`` (n, 4) fp32, per tensor the three Prodigy sums of
    :func:`statistics` (zeros without ``sample``) and its sum of g^2 (the row sums added in double); ``rows``,
    ``cols`` as :func:`statistics` returns them; ``s_new`` (None without ``sample`` or with SPEED) and
    ``accumulators`` (None without ``expansion``) one tensor each. None when the kernel does not take every tensor
    (dtypes, devices, memory layouts) or could not be built."""
    module = _load()
    if module is None:
        return None
    n = len(gs)
    if sample is None:
        starts, xs, p0s, ss, beta3, delta, compacts = [-1] * n, [None] * n, [None] * n, None, 0.0, 0.0, [None] * n
    else:
        starts, xs, p0s, ss, beta3, delta, compacts = sample
    f_olds, beta2, alpha, inv_cols, inv_d2 = expansion if expansion is not None else ([None] * n, 0.0, 0.0,
                                                                                       [0.0] * n, 0.0)
    out = module.statistics_many(gs, starts, xs, p0s, ss if ss is not None else [None] * n, beta3, delta, compacts,
                                 f_olds, beta2, alpha, inv_cols, inv_d2)
    if not out:
        return None
    sums = out[0]
    rows, cols, s_new, accumulators = (out[1 + k * n:1 + (k + 1) * n] for k in range(4))
    return (sums, rows, cols, s_new if sample is not None and ss is not None else None,
            accumulators if expansion is not None else None)


def statistics_list(gs: list[torch.Tensor], sample: tuple | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None] | None:
    """Phase A of a list of small tensors in one call (contiguous CPU gradients of any shape, all fp32 or all bf16):
    per tensor its sum of g^2 (fp32, one value per tensor), and with ``sample = (xs, p0s, ss, starts, beta3,
    delta)`` the Prodigy statistics of each tensor's elements at flat index starts[i] + 11 n, as :func:`statistics`
    computes them for one row: ``sums`` (n, 3) and the new s per tensor (``ss=None``: SPEED, no new s). Returns
    (sq, sums, s_new), or None when the kernels could not be built. Raises on tensors that do not fit (an internal
    error: the caller checks the bucket)."""
    module = _load()
    if module is None:
        return None
    if sample is None:
        sq, _ = module.statistics_list(gs, [], [], [], [], 0.0, 0.0)
        return sq, None, None
    xs, p0s, ss, starts, beta3, delta = sample
    sq, sums, *s_new = module.statistics_list(gs, xs, p0s, ss if ss is not None else [], starts, beta3, delta)
    return sq, sums, s_new if ss is not None else None


def rms_full_sf_list(gs: list[torch.Tensor], vs: list[torch.Tensor], scalars: torch.Tensor) -> torch.Tensor | None:
    """:func:`rms_full_sf` for each tensor of a list of small ones in one call (v written): the sums of the squared
    update, one fp32 value per tensor. None when the kernels could not be built."""
    module = _load()
    if module is None:
        return None
    return module.rms_full_sf_list(gs, vs, scalars)


def _update_module(decay: str):
    """The built kernels for an update with the weight decay mode ``decay`` (checked first), or None where they could
    not be built."""
    if decay not in _DECAYS:
        raise ValueError(f"decay must be one of {sorted(_DECAYS)}, got {decay!r}")
    return _load()


def update_sf_full_list(gs: list[torch.Tensor], ys: list[torch.Tensor], zs: list[torch.Tensor],
                        vs: list[torch.Tensor], scalars: torch.Tensor, scales: torch.Tensor | None, decay: str,
                        atan2: bool = False, noise: tuple[torch.Tensor, list[int], list[int]] | None = None) -> bool:
    """:func:`update_sf_full` for each tensor of a list of small ones in one call (``scales``: StableAdamW's
    divisors, one per tensor, or None; ``noise = (table, starts_y, starts_z)``: the starts per tensor). Tensors of
    any shape, contiguous, each no longer than the noise table. False (nothing written) when the kernels could not
    be built."""
    module = _update_module(decay)
    if module is None:
        return False
    table, starts_y, starts_z = noise if noise is not None else (None, [], [])
    module.update_sf_full_list(gs, ys, zs, vs, scalars, scales, _DECAYS[decay], atan2, table, starts_y, starts_z)
    return True


def stochastic_round_(target: torch.Tensor, source: torch.Tensor, noise: torch.Tensor) -> bool:
    """target (bf16) <- source (fp32) with stochastic rounding by ``noise`` (int32 in [0, 2^16), one per element):
    the bits of prodigy_dist.rounding.copy_stochastic_. False (nothing written) when it does not apply or the
    kernels could not be built."""
    if not (target.device.type == source.device.type == noise.device.type == "cpu") \
            or target.dtype != torch.bfloat16 or source.dtype != torch.float32 or noise.dtype != torch.int32 \
            or not (target.is_contiguous() and source.is_contiguous() and noise.is_contiguous()):
        return False
    module = _load()
    if module is None:
        return False
    module.stochastic_round_(target, source, noise)
    return True


def update_sf_factored(g: torch.Tensor, y: torch.Tensor, z: torch.Tensor, a: torch.Tensor, c: torch.Tensor,
                       scalars: torch.Tensor, scale: torch.Tensor | None, decay: str,
                       samples: tuple[int, torch.Tensor] | None, atan2: bool = False,
                       noise: tuple[torch.Tensor, int, int] | None = None) -> bool:
    """The Schedule-Free update of a factored 2-D tensor in one pass, in place on ``y`` (the parameter) and ``z``
    (``g``, ``y``, ``z`` all fp32 or all bf16): prodigy_dist.compiled._update_pass in fp32 (``a``, ``c``: the
    square roots of the factors per row and per column; ``scalars``: compiled._scalars; ``scale``: StableAdamW's
    divisor or None; ``decay``: "none", "by_lr" or "raw"; ``atan2``: Adam-atan2, eps=None, with :func:`atan2`'s
    arctangent). bf16 results are rounded to nearest even, or with ``noise = (table, start_y, start_z)``
    stochastically as prodigy_dist.rounding does (``table``: rounding.doubled_table; the starts:
    rounding.table_starts of the y and z streams at the piece's flat offset). With ``samples = (start, out)``, z's
    new values at flat indices start + 11 n are written to ``out`` (g's dtype, one per sample) for the next step's
    statistics. False (nothing written) when it does not apply or the kernels could not be built."""
    return _update_sf(g, y, z, a, c, None, scalars, scale, decay, samples, atan2, noise)


def update_sf_full(g: torch.Tensor, y: torch.Tensor, z: torch.Tensor, v: torch.Tensor, scalars: torch.Tensor,
                   scale: torch.Tensor | None, decay: str, samples: tuple[int, torch.Tensor] | None,
                   atan2: bool = False, noise: tuple[torch.Tensor, int, int] | None = None) -> bool:
    """:func:`update_sf_factored` with the full second moment ``v`` (``factored=False``; g's shape and dtype, viewed
    2-D like g) instead of the factors: the denominator sqrt(v) (+ d eps) rounded like the storage. With ``scale``
    (StableAdamW) v was updated by the RMS pass (:func:`rms_full_sf`); without, it is updated here first."""
    return _update_sf(g, y, z, None, None, v, scalars, scale, decay, samples, atan2, noise)


def update_sf_factored_many(gs: list[torch.Tensor], ys: list[torch.Tensor], zs: list[torch.Tensor],
                            as_: list[torch.Tensor], cs: list[torch.Tensor], scalars: torch.Tensor,
                            scales: torch.Tensor | None, rms: tuple[float, float, list[int]] | None, decay: str,
                            samples: list[tuple[int, torch.Tensor | None]], atan2: bool = False,
                            noise: tuple[torch.Tensor, list[int], list[int]] | None = None) -> bool:
    """:func:`update_sf_factored` for several factored tensors in one call (the rows of all of them split among the
    threads at once, or where a tensor takes its RMS pass tensor after tensor). StableAdamW: ``scales`` (one divisor
    per tensor), or ``rms = (d, d * eps, global element counts)``: each tensor's divisor from its
    :func:`rms_factored` pass right before its update (which then reads g from cache), except where ``scales``
    (given too) holds a finite divisor; neither: none. ``samples``: per tensor (start, out), start -1 for none;
    ``noise``: (table, starts of the y stream, starts of the z stream) per tensor. False (nothing written) unless the
    kernel takes every tensor or when the kernels could not be built."""
    module = _update_module(decay)
    if module is None:
        return False
    d, eps_term, numels = rms if rms is not None else (0.0, 0.0, [0] * len(gs))
    table, starts_y, starts_z = noise if noise is not None else (None, [], [])
    return module.update_sf_many(gs, ys, zs, as_, cs, [], scalars, scales, rms is not None, d, eps_term, numels,
                                 _DECAYS[decay], atan2, [st for st, _ in samples], [out for _, out in samples], table,
                                 starts_y, starts_z)


def update_sf_full_many(gs: list[torch.Tensor], ys: list[torch.Tensor], zs: list[torch.Tensor],
                        vs: list[torch.Tensor], scalars: torch.Tensor, scales: torch.Tensor | None,
                        rms: list[int] | None, decay: str, samples: list[tuple[int, torch.Tensor | None]],
                        atan2: bool = False, noise: tuple[torch.Tensor, list[int], list[int]] | None = None) -> bool:
    """:func:`update_sf_full` for several tensors (2-D views, with the full second moment v of their shape) in one
    call, tensor after tensor, as :func:`update_sf_factored_many`: with ``rms`` (their global element counts) each
    tensor's :func:`rms_full_sf` pass, which writes v, right before its update unless ``scales`` holds a finite
    divisor for it. False (nothing written) unless the kernel takes every tensor, or when the kernels could not be
    built."""
    module = _update_module(decay)
    if module is None:
        return False
    table, starts_y, starts_z = noise if noise is not None else (None, [], [])
    return module.update_sf_many(gs, ys, zs, [], [], vs, scalars, scales, rms is not None, 0.0, 0.0,
                                 rms if rms is not None else [0] * len(gs), _DECAYS[decay], atan2,
                                 [st for st, _ in samples], [out for _, out in samples], table, starts_y, starts_z)


def update_prodigy_factored_many(gs: list[torch.Tensor], ys: list[torch.Tensor], ms: list[torch.Tensor],
                                 as_: list[torch.Tensor], cs: list[torch.Tensor], scalars: torch.Tensor,
                                 scales: torch.Tensor | None, rms_each: list[int] | None, decay: str,
                                 atan2: bool = False, noise: tuple[torch.Tensor, list[int]] | None = None) -> bool:
    """Prodigy mode's update (no Schedule-Free) of several factored 2-D tensors in one call, tensor after tensor (the
    operations of prodigy_dist.compiled._update_pass, in place on y and the first moment m): with StableAdamW, the
    divisors ``scales`` (one per tensor: the RMS passes wrote m before), or ``rms_each`` (the global element counts)
    each tensor's :func:`rms_prodigy_factored` pass right before its update (so m is read from cache); without
    StableAdamW (neither) m is updated here. ``decay``: "none" or "scale" (y * scalars[12]); ``noise``: (table, the
    y stream's start per tensor) for stochastic rounding of bf16. False (nothing written) unless the kernel takes
    every tensor, or when the kernels could not be built."""
    if decay not in ("none", "scale"):
        raise ValueError(f"decay must be 'none' or 'scale' in Prodigy mode, got {decay!r}")
    module = _load()
    if module is None:
        return False
    table, starts_y = noise if noise is not None else (None, [])
    return module.update_prodigy_factored_many(gs, ys, ms, as_, cs, scalars, scales, rms_each is not None,
                                               rms_each if rms_each is not None else [0] * len(gs),
                                               int(decay == "scale"), atan2, table, starts_y)


def _update_sf(g, y, z, a, c, v, scalars, scale, decay, samples, atan2, noise) -> bool:
    # (the C++ function checks the dtypes, devices and layouts: this runs once per tensor and step, and the same
    # checks in Python cost several microseconds)
    module = _update_module(decay)
    if module is None:
        return False
    table, start_y, start_z = noise if noise is not None else (None, 0, 0)
    start, out = samples if samples is not None else (-1, None)
    return module.update_sf(g, y, z, a, c, v, scalars, scale, _DECAYS[decay], atan2, start, out, table, start_y,
                            start_z)


def factors(rs: list[torch.Tensor], cs: list[torch.Tensor], row_parts: list[torch.Tensor],
            col_parts: list[torch.Tensor], inv_r: list[float], inv_c: list[float], n_dc: list[int], dcs: list[int],
            r_totals: list[torch.Tensor | None], beta2: float, alpha: float,
            expansions: tuple[list[torch.Tensor | None], float, list[int]] | None = None
            ) -> list[torch.Tensor] | None:
    """The factored second moments ``rs``, ``cs`` of a bucket's 2-D tensors updated in place with this step's parts,
    and per tensor [sqrt(r / mean r), sqrt(c)] flattened (prodigy_dist.compiled._factors's operations, up to an ulp:
    the sum of r in double, the square roots correctly rounded): r <- beta2 r +
    alpha (row part * inv_r), likewise c; mean r = (``r_totals[i]``, or the sum of r over dim ``dcs[i]``) /
    ``n_dc[i]`` + 1e-30. With ``expansions = (accumulators, eps, global element counts)`` (per tensor the
    accumulators its :func:`statistics` pass left, or None) one more tensor follows: per tensor StableAdamW's divisor
    from them, or NaN where there are none or where their bound says the sum could differ from the RMS pass's by
    fp32 rounding or more (the tensor then takes its RMS pass: :func:`update_sf_factored_many`).

    Why this holds: with f_i the row factor's new moment over d^2 and P_j the column factor's over mean r, the
    update is u_ij = g_ij / (x_ij + eps) with x_ij = sqrt(f_i P_j). Writing t = eps / x, (1 + t)^-2 = 1 - 2t + 3t^2
    - R(t) with 0 <= R(t) <= 4 t^3 (t >= 0), so every power of x separates into a row weight f_i^(-k/2), which the
    statistics pass applies as it reads the row (f_i is known once the row is summed), and a column weight P_j^(-k/2),
    applied here: sum u^2 = S0 - 2 eps S1 + 3 eps^2 S2 - R with 0 <= R <= 4 t_max eps^2 S2, t_max = eps / sqrt(min f
    min P). The sum is taken only where that bound is below 2^-24 of it (eps small against x: gradients not small
    against eps), so the StableAdamW divisor equals the RMS pass's up to the rounding of the sums; the step then
    reads g twice, not three times."""
    module = _load()
    if module is None:
        return None
    accumulators, eps, numels = expansions if expansions is not None else ([], 0.0, [])
    # (the C++ function checks the tensors: the same checks in Python cost more than the arithmetic)
    return module.factors_(rs, cs, row_parts, col_parts, inv_r, inv_c, n_dc, dcs, r_totals, beta2, alpha,
                           accumulators, eps, numels) or None


def table_starts_many(step: int, flat_offsets: list[int], keys: list[int]) -> tuple[list[int], list[int]]:
    """:func:`prodigy_dist.rounding.table_starts_many` (the same values), hashed natively when the kernels are built
    (a microsecond or two per parameter in Python)."""
    module = _load()
    if module is None:
        return rounding.table_starts_many(step, flat_offsets, keys)
    ys, zs = module.table_starts_many(step, flat_offsets, keys, rounding.TABLE_SIZE)
    return ys, zs


def atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """The arctangent of :func:`update_sf_factored`'s Adam-atan2 update, elementwise on fp32 CPU tensors of one
    shape: torch.atan2's values within 2 ulp (its special values exactly). None when the kernels could not
    be built."""
    if y.shape != x.shape or y.dtype != torch.float32 or x.dtype != torch.float32 or y.device.type != "cpu" \
            or x.device.type != "cpu":
        raise ValueError(f"atan2: fp32 CPU tensors of one shape, got {y.dtype} {tuple(y.shape)} on {y.device} and "
                         f"{x.dtype} {tuple(x.shape)} on {x.device}")
    module = _load()
    if module is None:
        return None
    y, x = y.contiguous(), x.contiguous()
    out = torch.empty_like(y)
    module.atan2_fast_(out, y, x)
    return out


_DECAYS = {"none": 0, "by_lr": 1, "raw": 2}
