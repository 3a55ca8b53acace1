// LUT matmul for palettized Linear weights: y [B, out] = x [B, in] @ W^T (* channel_scale) + bias, where W is
// never materialised. It reads the converted layer's storage as it is:
//   codes  uint8, the packed little-endian bit stream of the code of every d-vector, row-major over
//          (row, in / d): row o starts at bit o * (in / d) * bits (not byte-aligned for 3/5/6/7 bits);
//   lut    [G, 2**bits, d] float32 / float16 / bfloat16, or int8 with lut_scale float32 [G];
//          LUT g serves the out / G consecutive rows g * out / G ...;
//   mask   optional uint8, 1 bit per d-vector in code order (1 = kept, pruned vectors are 0);
//   channel_scale optional: [out], or [out, blocks] (one per in / blocks consecutive weights of a row); bias
//          optional [out].
//
// Paths (one per ISA, chosen at run time; `isa` forces one for tests):
//   AVX-512 / AVX2: per 16 (8) weights, the codes are pulled out of a 16-byte window of the stream by one byte
//     shuffle + one variable shift (the shuffle control depends only on the window's bit offset: 8 plans), the
//     row's LUT sits in 1-4 vector registers and one permute (two + blend for 64 entries; a gather from L1 for
//     larger tables) turns 16 codes into 16 weights, then one FMA per activation row. The weight is decoded once
//     per row and batch block of 8, never written to memory. Pruned vectors: the activation lanes are zeroed by
//     a masked load. Compiled with __attribute__((target)) and picked with __builtin_cpu_supports, so the build
//     runs on any x86-64.
//   partial sums (T-MAC's idea, d >= 4 with few LUTs, portable kernel only): per activation block of d values and
//     LUT g, the K partial sums dot(lut[g][k], x_block) are computed once and each code then costs one table
//     lookup + add instead of d multiply-adds (see `use_partial_sums`).
//   portable: scalar C++ (decode + multiply-add, or the partial sums).
// Threads: at::parallel_for over output rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define IDKM_X86 1
#include <immintrin.h>
#define TARGET_AVX2 __attribute__((target("avx2,fma,bmi2")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2")))
#else
#define IDKM_X86 0
#endif

namespace {

enum Isa : int64_t { kAuto = -1, kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// Everything one call needs, as raw pointers (read-only except y).
struct Problem {
  const float* x;  // [batch, in], row stride ldx
  int64_t ldx, batch;
  float* y;  // [batch, out]
  int64_t out, in, dim, m;  // m = in / dim codes per row
  int bits;
  const uint8_t* codes;
  int64_t codes_nbytes;
  const uint8_t* mask;  // nullptr: no pruning
  int64_t mask_nbytes;
  int64_t groups, rows_per_group, k;  // k = 2**bits
  const void* lut;
  at::ScalarType lut_dtype;
  const float* lut_scale;      // [groups] or nullptr
  const float* channel_scale;  // [out] or nullptr
  const float* block_scale;    // [out, in / scale_block] or nullptr (then channel_scale is nullptr)
  int64_t scale_block;         // weights per block scale (0: no block scales)
  const float* bias;           // [out] or nullptr
  const float* partial;        // partial sums [batch, groups, m, k] or nullptr (T-MAC path)
};

// LUT g as float32 [k * dim] (times lut_scale[g] for int8): a pointer into the LUT itself when it already is
// float32 without a scale, else converted into `buf` (k * dim floats).
const float* group_table(const Problem& p, int64_t g, float* buf) {
  const int64_t n = p.k * p.dim;
  const int64_t off = g * n;
  switch (p.lut_dtype) {
    case at::kFloat:
      if (p.lut_scale == nullptr) return static_cast<const float*>(p.lut) + off;
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<const float*>(p.lut)[off + i] * p.lut_scale[g];
      return buf;
    case at::kHalf:
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(static_cast<const at::Half*>(p.lut)[off + i]);
      break;
    case at::kBFloat16:
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(static_cast<const at::BFloat16*>(p.lut)[off + i]);
      break;
    case at::kChar:
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(static_cast<const int8_t*>(p.lut)[off + i]);
      break;
    default:
      TORCH_CHECK(false, "lut_linear: unsupported lut dtype ", p.lut_dtype);
  }
  if (p.lut_scale != nullptr)
    for (int64_t i = 0; i < n; ++i) buf[i] *= p.lut_scale[g];
  return buf;
}

// Up to 16 bits of a little-endian bit stream from bit `pos` on (bytes past the end read as 0).
inline uint32_t read_bits16(const uint8_t* data, int64_t nbytes, int64_t pos) {
  const int64_t byte = pos >> 3;
  uint32_t v = 0;
  for (int i = 0; i < 3 && byte + i < nbytes; ++i) v |= static_cast<uint32_t>(data[byte + i]) << (8 * i);
  return v >> (pos & 7);
}

inline float finish(const Problem& p, int64_t o, float acc) {
  if (p.channel_scale != nullptr) acc *= p.channel_scale[o];
  if (p.bias != nullptr) acc += p.bias[o];
  return acc;
}

// ---- T-MAC partial sums: partial[b, g, j, c] = dot(lut[g][c], x[b, j*d : (j+1)*d]) ---------------------------
void build_partial_sums(const Problem& p, float* partial) {
  const int64_t per_batch = p.groups * p.m * p.k;
  at::parallel_for(0, p.batch * p.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(p.k * p.dim);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / p.groups, g = bg % p.groups;
      const float* table = group_table(p, g, buf.data());
      const float* xb = p.x + b * p.ldx;
      float* dst = partial + b * per_batch + g * p.m * p.k;
      for (int64_t j = 0; j < p.m; ++j) {
        const float* xs = xb + j * p.dim;
        for (int64_t c = 0; c < p.k; ++c) {
          const float* v = table + c * p.dim;
          float s = 0.f;
          for (int64_t t = 0; t < p.dim; ++t) s += v[t] * xs[t];
          dst[j * p.k + c] = s;
        }
      }
    }
  });
}

// Rows [begin, end) by partial-sum lookups (scalar: one load + add per code).
void rows_partial_sums(const Problem& p, int64_t begin, int64_t end) {
  const int64_t per_batch = p.groups * p.m * p.k;
  const uint32_t kmask = static_cast<uint32_t>(p.k - 1);
  std::vector<uint16_t> codes(p.m);
  for (int64_t o = begin; o < end; ++o) {
    const int64_t g = o / p.rows_per_group;
    const int64_t first = o * p.m;
    for (int64_t j = 0; j < p.m; ++j) {
      const uint32_t c = read_bits16(p.codes, p.codes_nbytes, (first + j) * p.bits) & kmask;
      const bool kept = p.mask == nullptr || (read_bits16(p.mask, p.mask_nbytes, first + j) & 1u);
      codes[j] = kept ? static_cast<uint16_t>(c) : UINT16_MAX;
    }
    for (int64_t b = 0; b < p.batch; ++b) {
      const float* table = p.partial + b * per_batch + g * p.m * p.k;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t j = 0; j < p.m; ++j)
        if (codes[j] != UINT16_MAX) acc[j & 3] += table[j * p.k + codes[j]];
      p.y[b * p.out + o] = finish(p, o, (acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
  }
}

// ---- portable: decode one code at a time, multiply-add ------------------------------------------------------
void rows_portable(const Problem& p, int64_t begin, int64_t end) {
  std::vector<float> buf(p.k * p.dim);
  std::vector<float> acc(p.batch);
  std::vector<float> scaled(p.dim);
  const uint32_t kmask = static_cast<uint32_t>(p.k - 1);
  int64_t current = -1;
  const float* table = nullptr;
  for (int64_t o = begin; o < end; ++o) {
    const int64_t g = o / p.rows_per_group;
    if (g != current) table = group_table(p, g, buf.data()), current = g;
    std::fill(acc.begin(), acc.end(), 0.f);
    const int64_t first = o * p.m;
    const float* bs = p.block_scale == nullptr ? nullptr : p.block_scale + o * (p.in / p.scale_block);
    for (int64_t j = 0; j < p.m; ++j) {
      if (p.mask != nullptr && !(read_bits16(p.mask, p.mask_nbytes, first + j) & 1u)) continue;
      const float* v = table + (read_bits16(p.codes, p.codes_nbytes, (first + j) * p.bits) & kmask) * p.dim;
      if (bs != nullptr) {  // a d-vector may straddle two blocks: scale weight by weight
        for (int64_t t = 0; t < p.dim; ++t) scaled[t] = v[t] * bs[(j * p.dim + t) / p.scale_block];
        v = scaled.data();
      }
      for (int64_t b = 0; b < p.batch; ++b) {
        const float* xs = p.x + b * p.ldx + j * p.dim;
        float s = 0.f;
        for (int64_t t = 0; t < p.dim; ++t) s += v[t] * xs[t];
        acc[b] += s;
      }
    }
    for (int64_t b = 0; b < p.batch; ++b) p.y[b * p.out + o] = finish(p, o, acc[b]);
  }
}

#if IDKM_X86
// Shuffle plans: for a 16-byte window of the code stream starting `s` bits (0..7) before the first code, lane l
// of a vector of `lanes` weights holds code l / d; its bytes go to the lane's low 16 bits (pshufb control), a
// variable right shift aligns it, a mask keeps `bits` bits, then idx = code * d + l % d indexes the LUT.
struct Plans {
  alignas(64) uint8_t ctrl[8][64];
  alignas(64) int32_t shift[8][16];
  alignas(64) int32_t lane_off[16];
  int64_t step_bits;  // bits consumed per vector of `lanes` weights
};

Plans make_plans(int bits, int64_t dim, int lanes) {
  Plans plans{};
  const int64_t per_vec = lanes / dim;
  plans.step_bits = per_vec * bits;
  for (int s = 0; s < 8; ++s)
    for (int l = 0; l < 16; ++l) {
      const int64_t bit = s + (l % lanes) / dim * bits;
      const int byte = static_cast<int>(bit >> 3), sh = static_cast<int>(bit & 7);
      uint8_t* c = plans.ctrl[s] + 4 * l;
      // bytes are within the window (s + 16 * bits <= 135 bits, and a second byte only when the code crosses it)
      c[0] = static_cast<uint8_t>(byte);
      c[1] = (sh + bits > 8) ? static_cast<uint8_t>(byte + 1) : 0x80;
      c[2] = c[3] = 0x80;
      plans.shift[s][l] = sh;
    }
  for (int l = 0; l < 16; ++l) plans.lane_off[l] = static_cast<int32_t>(l % dim);
  return plans;
}

// The 16 bytes of the stream from `byte` on (zeros past the end).
inline __m128i TARGET_AVX2 load_window(const uint8_t* data, int64_t nbytes, int64_t byte) {
  if (byte + 16 <= nbytes) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(data + byte));
  alignas(16) uint8_t tmp[16] = {0};
  if (byte < nbytes) std::memcpy(tmp, data + byte, static_cast<size_t>(nbytes - byte));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
}

// Which of the next `count` (<= 16) d-vectors are kept, from bit `pos` of the mask stream, each bit repeated d
// times (one per weight lane).
inline uint32_t kept_lanes(const Problem& p, int64_t pos, int count) {
  uint32_t bits = read_bits16(p.mask, p.mask_nbytes, pos) & ((1u << count) - 1u);
  if (p.dim == 1) return bits;
  uint32_t lanes = 0;
  for (int i = 0; i < count; ++i)
    if (bits >> i & 1u) lanes |= ((1u << p.dim) - 1u) << (i * p.dim);
  return lanes;
}

// The block scale of each `lanes`-weight vector of row o into `buf` (in / lanes floats; scale_block is a multiple of
// lanes, see vector_dim_ok); nullptr without block scales.
inline const float* vector_scales(const Problem& p, int64_t o, int64_t lanes, std::vector<float>& buf) {
  if (p.block_scale == nullptr) return nullptr;
  const float* bs = p.block_scale + o * (p.in / p.scale_block);
  for (int64_t v = 0; v < p.in / lanes; ++v) buf[v] = bs[v * lanes / p.scale_block];
  return buf.data();
}

// ---- AVX-512 ------------------------------------------------------------------------------------------------
// LUT entries (k * d) -> how 16 indices become 16 weights: one permute of 1 register, a two-register permute,
// a tree of two-register permutes + blends on the next index bits (up to 256 entries in 16 registers), or a
// gather from the table in L1 (more entries).
enum Lookup { kPerm16 = 0, kPerm32 = 1, kPerm64 = 2, kPerm128 = 3, kPerm256 = 4, kGather = 5 };
constexpr int lookup_registers(int lookup) { return lookup == kGather ? 0 : (lookup == kPerm16 ? 1 : 2 << (lookup - 1)); }

template <int LOOKUP>
TARGET_AVX512 inline __m512 lookup16(__m512i idx, const __m512* t, const float* table) {
  if (LOOKUP == kPerm16) return _mm512_permutexvar_ps(idx, t[0]);
  if (LOOKUP == kGather) return _mm512_i32gather_ps(idx, table, 4);
  constexpr int pairs = lookup_registers(LOOKUP) / 2;
  __m512 level[8];
  for (int i = 0; i < pairs; ++i) level[i] = _mm512_permutex2var_ps(t[2 * i], idx, t[2 * i + 1]);
  int n = pairs, bit = 32;
  while (n > 1) {  // blend neighbours on index bit 5, then 6, then 7
    const __mmask16 hi = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(bit));
    for (int i = 0; i < n / 2; ++i) level[i] = _mm512_mask_blend_ps(hi, level[2 * i], level[2 * i + 1]);
    n /= 2, bit *= 2;
  }
  return level[0];
}

// Weights [16] of the vector whose codes start at stream bit `bitpos`, with the window's shuffle control and
// shifts given (they depend only on bitpos % 8). The register tables repeat the LUT up to their capacity, so an
// index may keep the bits of the neighbouring codes above its own (the permutes ignore them): no mask but for the
// gather. For d > 1, idx = code * d + lane % d (shift + or: the low log2(d) bits are free).
template <int LOOKUP, bool DIM1>
TARGET_AVX512 inline __m512 decode16(const Problem& p, int64_t bitpos, __m512i ctrl, __m512i shift, __m512i kmask,
                                     __m128i log2d, __m512i lane_off, const __m512* t, const float* table) {
  const __m512i window = _mm512_broadcast_i32x4(load_window(p.codes, p.codes_nbytes, bitpos >> 3));
  __m512i idx = _mm512_srlv_epi32(_mm512_shuffle_epi8(window, ctrl), shift);
  if (LOOKUP == kGather) idx = _mm512_and_si512(idx, kmask);
  if (!DIM1) idx = _mm512_or_si512(_mm512_sll_epi32(idx, log2d), lane_off);
  return lookup16<LOOKUP>(idx, t, table);
}

constexpr int64_t kPrefetchBytes = 1024;
#ifndef IDKM_LUT_PREFETCH
#define IDKM_LUT_PREFETCH 1
#endif
constexpr bool PREFETCH = IDKM_LUT_PREFETCH;

// vs: nullptr, or the block scale of each 16-weight vector of the row (in / 16 floats).
template <int NB, int LOOKUP, int U, bool MASKED, bool DIM1>
TARGET_AVX512 void row_avx512(const Problem& p, const Plans& plans, const __m512* t, const float* table, int64_t o,
                              int64_t b0, float* result, const float* vs) {
  __m512 acc[U][NB];
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < NB; ++b) acc[u][b] = _mm512_setzero_ps();
  const __m512i kmask = _mm512_set1_epi32(static_cast<int>(p.k - 1));
  const __m512i lane_off = _mm512_load_si512(plans.lane_off);
  const __m128i log2d = _mm_cvtsi32_si128(__builtin_ctzll(static_cast<unsigned long long>(p.dim)));
  const float* x = p.x + b0 * p.ldx;
  const int per_vec = static_cast<int>(16 / p.dim);
  int64_t bitpos = o * p.m * p.bits, mpos = o * p.m, col = 0;
  // a vector's codes fill whole bytes (d = 1 always): the window's bit offset, so its plan, is the row's
  const bool same_plan = plans.step_bits % 8 == 0;
  const int s0 = static_cast<int>(bitpos & 7);
  const __m512i ctrl0 = _mm512_load_si512(plans.ctrl[s0]), shift0 = _mm512_load_si512(plans.shift[s0]);
  for (; col + 16 * U <= p.in; col += 16 * U) {
    // the code stream is read once, front to back: fetch ahead of the hardware prefetcher (DRAM-resident codes)
    if (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(p.codes + (bitpos >> 3) + kPrefetchBytes), _MM_HINT_T0);
    #pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const int s = static_cast<int>(bitpos & 7);
      __m512 w = same_plan
          ? decode16<LOOKUP, DIM1>(p, bitpos, ctrl0, shift0, kmask, log2d, lane_off, t, table)
          : decode16<LOOKUP, DIM1>(p, bitpos, _mm512_load_si512(plans.ctrl[s]), _mm512_load_si512(plans.shift[s]),
                                   kmask, log2d, lane_off, t, table);
      if (vs != nullptr) w = _mm512_mul_ps(w, _mm512_set1_ps(vs[col / 16 + u]));
      if (MASKED) {
        const __mmask16 lm = static_cast<__mmask16>(kept_lanes(p, mpos, per_vec));
        #pragma GCC unroll 8
      for (int b = 0; b < NB; ++b)
          acc[u][b] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(lm, x + b * p.ldx + col + 16 * u), acc[u][b]);
      } else {
        #pragma GCC unroll 8
      for (int b = 0; b < NB; ++b)
          acc[u][b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + b * p.ldx + col + 16 * u), acc[u][b]);
      }
      bitpos += plans.step_bits, mpos += per_vec;
    }
  }
  for (; col < p.in; col += 16, bitpos += plans.step_bits, mpos += per_vec) {  // the rest, lane-masked
    const int s = static_cast<int>(bitpos & 7);
    __m512 w = decode16<LOOKUP, DIM1>(p, bitpos, _mm512_load_si512(plans.ctrl[s]),
                                      _mm512_load_si512(plans.shift[s]), kmask, log2d, lane_off, t, table);
    if (vs != nullptr) w = _mm512_mul_ps(w, _mm512_set1_ps(vs[col / 16]));
    uint32_t lanes = p.in - col >= 16 ? 0xFFFFu : (1u << (p.in - col)) - 1u;
    if (MASKED) lanes &= kept_lanes(p, mpos, static_cast<int>(std::min<int64_t>(per_vec, (p.in - col) / p.dim)));
    const __mmask16 lm = static_cast<__mmask16>(lanes);
    for (int b = 0; b < NB; ++b)
      acc[0][b] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(lm, x + b * p.ldx + col), acc[0][b]);
  }
  for (int b = 0; b < NB; ++b) {
    __m512 sum = acc[0][b];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][b]);
    result[b] = _mm512_reduce_add_ps(sum);
  }
}

// The common case, tight: every row starts on a byte and a vector's codes fill whole bytes (in * bits / d a multiple
// of 8 and 16 / d codes per vector a whole number of bytes: d = 1 with in % 8 == 0, for instance), the row's windows
// stay inside the stream, no pruning mask, no block scales, in % (16 * U) == 0. Pointer increments only, one plan for
// all vectors.
template <int NB, int LOOKUP, int U, bool DIM1>
TARGET_AVX512 void row_avx512_aligned(const Problem& p, const Plans& plans, const __m512* t, const float* table,
                                      int64_t o, int64_t b0, float* result) {
  __m512 acc[U][NB];
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < NB; ++b) acc[u][b] = _mm512_setzero_ps();
  const __m512i kmask = _mm512_set1_epi32(static_cast<int>(p.k - 1));
  const __m512i lane_off = _mm512_load_si512(plans.lane_off);
  const __m128i log2d = _mm_cvtsi32_si128(__builtin_ctzll(static_cast<unsigned long long>(p.dim)));
  const __m512i ctrl = _mm512_load_si512(plans.ctrl[0]), shift = _mm512_load_si512(plans.shift[0]);
  const int64_t step = plans.step_bits >> 3, ldx = p.ldx, in = p.in;
  const uint8_t* cp = p.codes + ((o * p.m * p.bits) >> 3);
  const float* x = p.x + b0 * ldx;
  for (int64_t col = 0; col < in; col += 16 * U, cp += U * step, x += 16 * U) {
    if (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(cp + kPrefetchBytes), _MM_HINT_T0);
    #pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const __m512i window = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp + u * step)));
      __m512i idx = _mm512_srlv_epi32(_mm512_shuffle_epi8(window, ctrl), shift);
      if (LOOKUP == kGather) idx = _mm512_and_si512(idx, kmask);
      if (!DIM1) idx = _mm512_or_si512(_mm512_sll_epi32(idx, log2d), lane_off);
      const __m512 w = lookup16<LOOKUP>(idx, t, table);
      #pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) acc[u][b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + b * ldx + 16 * u), acc[u][b]);
    }
  }
  for (int b = 0; b < NB; ++b) {
    __m512 sum = acc[0][b];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][b]);
    result[b] = _mm512_reduce_add_ps(sum);
  }
}

// LUT g (k * d <= 16 entries) straight into a register, repeated over its 16 lanes, converted from the LUT's dtype
// in-register (per-row LUTs reload it for every row: no scalar conversion loop).
TARGET_AVX512 inline __m512 load_table16(const Problem& p, int64_t g) {
  const int64_t entries = p.k * p.dim, off = g * entries;
  const __mmask16 m = static_cast<__mmask16>(entries >= 16 ? 0xFFFF : (1u << entries) - 1u);
  __m512 v;
  switch (p.lut_dtype) {
    case at::kFloat:
      v = _mm512_maskz_loadu_ps(m, static_cast<const float*>(p.lut) + off);
      break;
    case at::kHalf:
      v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const at::Half*>(p.lut) + off));
      break;
    case at::kBFloat16:
      v = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, static_cast<const at::BFloat16*>(p.lut) + off)), 16));
      break;
    default:  // int8
      v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, static_cast<const int8_t*>(p.lut) + off)));
  }
  if (p.lut_scale != nullptr) v = _mm512_mul_ps(v, _mm512_set1_ps(p.lut_scale[g]));
  if (entries < 16) {
    alignas(64) int32_t rep[16];
    for (int i = 0; i < 16; ++i) rep[i] = static_cast<int32_t>(i % entries);
    v = _mm512_permutexvar_ps(_mm512_load_si512(rep), v);
  }
  return v;
}

// d = 1 with 1, 2 or 4 bits (PER = 8 / bits codes per byte), no mask, in % (16 * PER) == 0: 16 bytes of codes are
// zero-extended to 16 lanes at once (lane j: byte j) and shifted by 0, bits, 2 * bits, ...: shift r gives code
// j * PER + r in lane j (the permute ignores the bits above the code: the register table repeats the LUT). So a
// vector holds every PER-th weight, and x is read from a copy permuted to match (`xp`, built once per call:
// xp[block][r][j] = x[block * 16 * PER + j * PER + r]). 3 vector ops per 16 weights: shift, permute, FMA.
template <int NB, int PER, int U>
TARGET_AVX512 void row_avx512_bytes(const Problem& p, const float* xp, const __m512* t, int64_t o, int64_t b0,
                                    float* result) {
  constexpr int bits = 8 / PER;
  __m512 acc[U][NB];
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < NB; ++b) acc[u][b] = _mm512_setzero_ps();
  const int64_t ldx = p.in, in = p.in;
  const uint8_t* cp = p.codes + o * (in / PER);
  const float* x = xp + b0 * ldx;
  const __m512 table = t[0];
  for (int64_t col = 0; col < in; col += 16 * PER, cp += 16, x += 16 * PER) {
    if (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(cp + kPrefetchBytes), _MM_HINT_T0);
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp)));
    #pragma GCC unroll 8
    for (int r = 0; r < PER; ++r) {
      const __m512 w = _mm512_permutexvar_ps(r == 0 ? bytes : _mm512_srli_epi32(bytes, r * bits), table);
      #pragma GCC unroll 8
      for (int b = 0; b < NB; ++b)
        acc[r % U][b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + b * ldx + 16 * r), acc[r % U][b]);
    }
  }
  for (int b = 0; b < NB; ++b) {
    __m512 sum = acc[0][b];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][b]);
    result[b] = _mm512_reduce_add_ps(sum);
  }
}

template <int PER>
TARGET_AVX512 void rows_avx512_bytes(const Problem& p, const float* xp, int64_t begin, int64_t end) {
  __m512 t[1];
  float result[8];
  int64_t current = -1;
  for (int64_t o = begin; o < end; ++o) {
    const int64_t g = o / p.rows_per_group;
    if (g != current) t[0] = load_table16(p, g), current = g;
    for (int64_t b0 = 0; b0 < p.batch;) {
      const int64_t left = p.batch - b0;
      int nb;
      if (left >= 8) row_avx512_bytes<8, PER, 1>(p, xp, t, o, b0, result), nb = 8;
      else if (left >= 4) row_avx512_bytes<4, PER, 2>(p, xp, t, o, b0, result), nb = 4;
      else if (left >= 2) row_avx512_bytes<2, PER, (PER < 4 ? PER : 4)>(p, xp, t, o, b0, result), nb = 2;
      else row_avx512_bytes<1, PER, PER>(p, xp, t, o, b0, result), nb = 1;  // one FMA chain per shift
      for (int b = 0; b < nb; ++b) p.y[(b0 + b) * p.out + o] = finish(p, o, result[b]);
      b0 += nb;
    }
  }
}

// Whether rows_avx512_bytes takes this problem, and x permuted for it ([batch, in]).
bool bytes_path_applies(const Problem& p) {
  return p.dim == 1 && p.mask == nullptr && p.block_scale == nullptr && (p.bits == 1 || p.bits == 2 || p.bits == 4) &&
         p.in % (16 * (8 / p.bits)) == 0;
}

void permute_for_bytes(const Problem& p, float* xp) {
  const int64_t per = 8 / p.bits, block = 16 * per;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t c0 = 0; c0 < p.in; c0 += block)
      for (int64_t r = 0; r < per; ++r)
        for (int64_t j = 0; j < 16; ++j) xp[b * p.in + c0 + r * 16 + j] = p.x[b * p.ldx + c0 + j * per + r];
}

template <int LOOKUP, bool MASKED, bool DIM1>
TARGET_AVX512 void rows_avx512_lookup(const Problem& p, const Plans& plans, int64_t begin, int64_t end) {
  constexpr int nregs = lookup_registers(LOOKUP);
  std::vector<float> buf(std::max<int64_t>(p.k * p.dim, 16), 0.f);
  std::vector<float> vscale(p.block_scale == nullptr ? 0 : p.in / 16);
  __m512 t[nregs > 0 ? nregs : 1];
  float result[8];
  int64_t current = -1;
  const float* table = nullptr;
  for (int64_t o = begin; o < end; ++o) {
    const int64_t g = o / p.rows_per_group;
    if (g != current) {  // the LUT into registers (entries beyond k * d: zero, never indexed)
      const int64_t entries = p.k * p.dim;
      if (nregs == 1) {  // repeated over the 16 entries of a register (see decode16)
        t[0] = load_table16(p, g);
      } else {
        table = group_table(p, g, buf.data());
        for (int r = 0; r < nregs; ++r) t[r] = _mm512_loadu_ps(table + 16 * r);  // entries = 16 * nregs
      }
      current = g;
    }
    const float* vs = vector_scales(p, o, 16, vscale);
    // the tight loop: rows on byte boundaries, whole bytes per vector, whole unrolled blocks, windows in the stream
    const bool aligned = !MASKED && vs == nullptr && plans.step_bits % 8 == 0 && (p.m * p.bits) % 8 == 0 &&
                         p.in % 64 == 0 &&
                         ((o + 1) * p.m * p.bits) / 8 + 16 <= p.codes_nbytes;
    for (int64_t b0 = 0; b0 < p.batch && aligned;) {
      const int64_t left = p.batch - b0;
      int nb;
      if (left >= 8) row_avx512_aligned<8, LOOKUP, 1, DIM1>(p, plans, t, table, o, b0, result), nb = 8;
      else if (left >= 4) row_avx512_aligned<4, LOOKUP, 2, DIM1>(p, plans, t, table, o, b0, result), nb = 4;
      else if (left >= 2) row_avx512_aligned<2, LOOKUP, 4, DIM1>(p, plans, t, table, o, b0, result), nb = 2;
      else row_avx512_aligned<1, LOOKUP, 4, DIM1>(p, plans, t, table, o, b0, result), nb = 1;
      for (int b = 0; b < nb; ++b) p.y[(b0 + b) * p.out + o] = finish(p, o, result[b]);
      b0 += nb;
    }
    for (int64_t b0 = 0; b0 < p.batch && !aligned;) {
      const int64_t left = p.batch - b0;
      int nb;
      if (left >= 8) row_avx512<8, LOOKUP, 1, MASKED, DIM1>(p, plans, t, table, o, b0, result, vs), nb = 8;
      else if (left >= 4) row_avx512<4, LOOKUP, 2, MASKED, DIM1>(p, plans, t, table, o, b0, result, vs), nb = 4;
      else if (left >= 2) row_avx512<2, LOOKUP, 4, MASKED, DIM1>(p, plans, t, table, o, b0, result, vs), nb = 2;
      else row_avx512<1, LOOKUP, 4, MASKED, DIM1>(p, plans, t, table, o, b0, result, vs), nb = 1;
      for (int b = 0; b < nb; ++b) p.y[(b0 + b) * p.out + o] = finish(p, o, result[b]);
      b0 += nb;
    }
  }
}

template <bool MASKED, bool DIM1>
void rows_avx512_dispatch(const Problem& p, const Plans& plans, int64_t begin, int64_t end) {
  const int64_t entries = p.k * p.dim;
  if (entries <= 16) rows_avx512_lookup<kPerm16, MASKED, DIM1>(p, plans, begin, end);
  else if (entries <= 32) rows_avx512_lookup<kPerm32, MASKED, DIM1>(p, plans, begin, end);
  else if (entries <= 64) rows_avx512_lookup<kPerm64, MASKED, DIM1>(p, plans, begin, end);
  else if (entries <= 128) rows_avx512_lookup<kPerm128, MASKED, DIM1>(p, plans, begin, end);
  else if (entries <= 256) rows_avx512_lookup<kPerm256, MASKED, DIM1>(p, plans, begin, end);
  else rows_avx512_lookup<kGather, MASKED, DIM1>(p, plans, begin, end);
}

void rows_avx512(const Problem& p, const Plans& plans, const float* xp, int64_t begin, int64_t end) {
  if (xp != nullptr) {
    if (p.bits == 4) return rows_avx512_bytes<2>(p, xp, begin, end);
    if (p.bits == 2) return rows_avx512_bytes<4>(p, xp, begin, end);
    return rows_avx512_bytes<8>(p, xp, begin, end);
  }
  if (p.dim == 1) {
    if (p.mask != nullptr) rows_avx512_dispatch<true, true>(p, plans, begin, end);
    else rows_avx512_dispatch<false, true>(p, plans, begin, end);
  } else {
    if (p.mask != nullptr) rows_avx512_dispatch<true, false>(p, plans, begin, end);
    else rows_avx512_dispatch<false, false>(p, plans, begin, end);
  }
}

// ---- AVX2 (8 lanes) -----------------------------------------------------------------------------------------
enum Lookup2 { kPerm8 = 0, kPerm16x2 = 1, kGather8 = 2 };

template <int NB, int LOOKUP>
TARGET_AVX2 void row_avx2(const Problem& p, const Plans& plans, const float* table, int64_t o, int64_t b0,
                          float* result, const float* vs) {
  __m256 acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = _mm256_setzero_ps();
  __m256 t0 = _mm256_setzero_ps(), t1 = t0;
  if (LOOKUP != kGather8) {
    t0 = _mm256_loadu_ps(table);
    if (LOOKUP == kPerm16x2) t1 = _mm256_loadu_ps(table + 8);
  }
  const __m256i kmask = _mm256_set1_epi32(static_cast<int>(p.k - 1));
  const __m256i lane_off = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plans.lane_off));
  const __m128i log2d = _mm_cvtsi32_si128(__builtin_ctzll(static_cast<unsigned long long>(p.dim)));
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const float* x = p.x + b0 * p.ldx;
  int64_t bitpos = o * p.m * p.bits;
  int64_t mpos = o * p.m;
  const int per_vec = static_cast<int>(8 / p.dim);
  for (int64_t col = 0; col < p.in; col += 8, bitpos += plans.step_bits, mpos += per_vec) {
    const int s = static_cast<int>(bitpos & 7);
    const __m256i window = _mm256_broadcastsi128_si256(load_window(p.codes, p.codes_nbytes, bitpos >> 3));
    __m256i idx = _mm256_shuffle_epi8(window, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plans.ctrl[s])));
    idx = _mm256_and_si256(
        _mm256_srlv_epi32(idx, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plans.shift[s]))), kmask);
    idx = _mm256_add_epi32(_mm256_sll_epi32(idx, log2d), lane_off);
    __m256 w;
    if (LOOKUP == kPerm8) {
      w = _mm256_permutevar8x32_ps(t0, idx);
    } else if (LOOKUP == kPerm16x2) {
      const __m256 lo = _mm256_permutevar8x32_ps(t0, idx), hi = _mm256_permutevar8x32_ps(t1, idx);
      w = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign
    } else {
      w = _mm256_i32gather_ps(table, idx, 4);
    }
    if (vs != nullptr) w = _mm256_mul_ps(w, _mm256_set1_ps(vs[col / 8]));
    uint32_t lanes = p.in - col >= 8 ? 0xFFu : (1u << (p.in - col)) - 1u;
    if (p.mask != nullptr) lanes &= kept_lanes(p, mpos, std::min<int64_t>(per_vec, (p.in - col + p.dim - 1) / p.dim));
    const __m256i lm = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(lanes)), lane_bit),
                                          lane_bit);
    for (int b = 0; b < NB; ++b)
      acc[b] = _mm256_fmadd_ps(w, _mm256_maskload_ps(x + b * p.ldx + col, lm), acc[b]);
  }
  for (int b = 0; b < NB; ++b) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[b]), _mm256_extractf128_ps(acc[b], 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    result[b] = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
  }
}

template <int LOOKUP>
TARGET_AVX2 void rows_avx2_lookup(const Problem& p, const Plans& plans, int64_t begin, int64_t end) {
  std::vector<float> buf(std::max<int64_t>(p.k * p.dim, 16), 0.f);
  std::vector<float> vscale(p.block_scale == nullptr ? 0 : p.in / 8);
  float result[8];
  int64_t current = -1;
  const float* table = nullptr;
  for (int64_t o = begin; o < end; ++o) {
    const int64_t g = o / p.rows_per_group;
    const float* vs = vector_scales(p, o, 8, vscale);
    if (g != current) {
      table = group_table(p, g, buf.data());
      if (LOOKUP != kGather8 && table != buf.data()) {  // registers load 8/16 entries: pad the table
        std::memcpy(buf.data(), table, sizeof(float) * p.k * p.dim);
        table = buf.data();
      }
      current = g;
    }
    for (int64_t b0 = 0; b0 < p.batch;) {
      const int64_t left = p.batch - b0;
      int nb;
      if (left >= 8) row_avx2<8, LOOKUP>(p, plans, table, o, b0, result, vs), nb = 8;
      else if (left >= 4) row_avx2<4, LOOKUP>(p, plans, table, o, b0, result, vs), nb = 4;
      else if (left >= 2) row_avx2<2, LOOKUP>(p, plans, table, o, b0, result, vs), nb = 2;
      else row_avx2<1, LOOKUP>(p, plans, table, o, b0, result, vs), nb = 1;
      for (int b = 0; b < nb; ++b) p.y[(b0 + b) * p.out + o] = finish(p, o, result[b]);
      b0 += nb;
    }
  }
}

void rows_avx2(const Problem& p, const Plans& plans, int64_t begin, int64_t end) {
  const int64_t entries = p.k * p.dim;
  if (entries <= 8) rows_avx2_lookup<kPerm8>(p, plans, begin, end);
  else if (entries <= 16) rows_avx2_lookup<kPerm16x2>(p, plans, begin, end);
  else rows_avx2_lookup<kGather8>(p, plans, begin, end);
}
#endif  // IDKM_X86

bool cpu_has(Isa isa) {
#if IDKM_X86
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && cpu_has(kAvx2);
#endif
  return isa == kPortable;
}

// The vector paths handle d in {1, 2, 4, 8} (and 16 for AVX-512): a vector of weights holds whole d-vectors; with
// block scales (scale_block > 0), a vector lies in one block (scale_block a multiple of the lanes).
bool vector_dim_ok(Isa isa, int64_t dim, int64_t scale_block) {
  const int64_t lanes = isa == kAvx512 ? 16 : 8;
  return dim <= lanes && (dim & (dim - 1)) == 0 && scale_block % lanes == 0;
}

// T-MAC partial sums: each code then costs one table lookup instead of d multiply-adds, for a per-call table of
// [B, G, in / d, K] floats, so they pay where d is large and the tables are few next to the codes they serve. The
// scalar portable kernel uses them there; the vector kernels decode in registers instead (their d <= 16 vectors
// cost one permute + one FMA per 16 weights). Partial sums vs register decode on the vector paths for d >= 4 is
// not measured yet (deploy.py measures d = 1).
bool use_partial_sums(const Problem& p, Isa isa) {
  if (p.dim < 4 || p.block_scale != nullptr) return false;
  if (isa == kPortable) return p.batch * p.groups * p.k <= p.out * p.dim / 2;
  return false;
}

int64_t best_isa() {
  if (cpu_has(kAvx512)) return kAvx512;
  if (cpu_has(kAvx2)) return kAvx2;
  return kPortable;
}

at::Tensor lut_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut, int64_t bits,
                          int64_t out_features, int64_t in_features, const c10::optional<at::Tensor>& channel_scale,
                          const c10::optional<at::Tensor>& lut_scale, const c10::optional<at::Tensor>& mask,
                          const c10::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "lut_linear: bits=", bits, " is not allowed; expected 1..8");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "lut_linear: x must be [batch, ", in_features, "], got ",
              x.sizes());
  TORCH_CHECK(lut.dim() == 3 && lut.size(1) == (int64_t{1} << bits), "lut_linear: lut ", lut.sizes(),
              " does not match bits=", bits, ": expected [groups, ", int64_t{1} << bits, ", d]");
  const int64_t groups = lut.size(0), dim = lut.size(2);
  TORCH_CHECK(dim >= 1 && in_features % dim == 0, "lut_linear: d=", dim, " does not divide in_features=",
              in_features);
  TORCH_CHECK(groups >= 1 && out_features % groups == 0, "lut_linear: ", groups,
              " LUT groups do not divide out_features=", out_features);
  const int64_t m = in_features / dim, count = out_features * m;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 1 && codes.numel() == (count * bits + 7) / 8,
              "lut_linear: codes must be packed uint8 [", (count * bits + 7) / 8, "], got ", codes.scalar_type(), " ",
              codes.sizes());
  const bool int8_lut = lut.scalar_type() == at::kChar;
  TORCH_CHECK(int8_lut == lut_scale.has_value(), "lut_linear: an int8 lut needs lut_scale [groups] (and only it)");
  TORCH_CHECK(lut.scalar_type() == at::kFloat || lut.scalar_type() == at::kHalf ||
                  lut.scalar_type() == at::kBFloat16 || int8_lut,
              "lut_linear: lut dtype ", lut.scalar_type(), " is not allowed (float32, float16, bfloat16, int8)");

  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor codes_c = codes.contiguous(), lut_c = lut.contiguous();
  at::Tensor scale_f, cs_f, bias_f, mask_c;
  if (lut_scale) {
    scale_f = lut_scale->to(at::kFloat).contiguous();
    TORCH_CHECK(scale_f.numel() == groups, "lut_linear: lut_scale must be [", groups, "]");
  }
  int64_t scale_blocks = 0;  // 0: one scale per row (or none)
  if (channel_scale) {
    cs_f = channel_scale->to(at::kFloat).contiguous();
    if (channel_scale->dim() == 2) {
      scale_blocks = channel_scale->size(1);
      TORCH_CHECK(channel_scale->size(0) == out_features && scale_blocks >= 1 && in_features % scale_blocks == 0,
                  "lut_linear: channel_scale must be [", out_features, "] or [", out_features,
                  ", blocks] with blocks dividing in_features=", in_features, ", got ", channel_scale->sizes());
    } else {
      TORCH_CHECK(cs_f.numel() == out_features, "lut_linear: channel_scale must be [", out_features, "]");
    }
  }
  if (bias) {
    bias_f = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_f.numel() == out_features, "lut_linear: bias must be [", out_features, "]");
  }
  if (mask) {
    mask_c = mask->contiguous();
    TORCH_CHECK(mask_c.scalar_type() == at::kByte && mask_c.numel() == (count + 7) / 8,
                "lut_linear: mask must be packed uint8 [", (count + 7) / 8, "]");
  }
  at::Tensor y = at::empty({x.size(0), out_features}, xf.options());

  Problem p{};
  p.x = xf.data_ptr<float>();
  p.ldx = in_features;
  p.batch = x.size(0);
  p.y = y.data_ptr<float>();
  p.out = out_features, p.in = in_features, p.dim = dim, p.m = m, p.bits = static_cast<int>(bits);
  p.codes = codes_c.data_ptr<uint8_t>(), p.codes_nbytes = codes_c.numel();
  p.mask = mask ? mask_c.data_ptr<uint8_t>() : nullptr, p.mask_nbytes = mask ? mask_c.numel() : 0;
  p.groups = groups, p.rows_per_group = out_features / groups, p.k = int64_t{1} << bits;
  p.lut = lut_c.data_ptr(), p.lut_dtype = lut_c.scalar_type();
  p.lut_scale = lut_scale ? scale_f.data_ptr<float>() : nullptr;
  p.channel_scale = channel_scale && scale_blocks == 0 ? cs_f.data_ptr<float>() : nullptr;
  p.block_scale = scale_blocks > 0 ? cs_f.data_ptr<float>() : nullptr;
  p.scale_block = scale_blocks > 0 ? in_features / scale_blocks : 0;
  p.bias = bias ? bias_f.data_ptr<float>() : nullptr;
  if (p.batch == 0 || out_features == 0) return y.to(x.scalar_type());

  Isa chosen = static_cast<Isa>(isa < 0 ? best_isa() : isa);
  TORCH_CHECK(chosen >= kPortable && chosen <= kAvx512, "lut_linear: isa=", isa, " is not one of -1, 0, 1, 2");
  TORCH_CHECK(cpu_has(chosen), "lut_linear: this CPU (or build) has no isa=", isa);
  if (chosen != kPortable && !vector_dim_ok(chosen, dim, p.scale_block)) chosen = kPortable;

  at::Tensor partial;
  if (in_features > 0 && use_partial_sums(p, chosen)) {
    partial = at::empty({p.batch, groups, m, p.k}, xf.options());
    build_partial_sums(p, partial.data_ptr<float>());
    p.partial = partial.data_ptr<float>();
  }
#if IDKM_X86
  const Plans plans = make_plans(p.bits, dim, chosen == kAvx512 ? 16 : 8);
  at::Tensor xperm;  // x in the lane order of the byte-wise AVX-512 path
  if (chosen == kAvx512 && p.partial == nullptr && bytes_path_applies(p)) {
    xperm = at::empty({p.batch, in_features}, xf.options());
    permute_for_bytes(p, xperm.data_ptr<float>());
  }
  const float* xp = xperm.defined() ? xperm.data_ptr<float>() : nullptr;
#endif
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(in_features, 1));
  at::parallel_for(0, out_features, grain, [&](int64_t begin, int64_t end) {
    if (p.partial != nullptr) return rows_partial_sums(p, begin, end);
#if IDKM_X86
    if (chosen == kAvx512) return rows_avx512(p, plans, xp, begin, end);
    if (chosen == kAvx2) return rows_avx2(p, plans, begin, end);
#endif
    rows_portable(p, begin, end);
  });
  return y.to(x.scalar_type());
}

at::Tensor lut_linear_meta(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut, int64_t bits,
                           int64_t out_features, int64_t in_features, const c10::optional<at::Tensor>& channel_scale,
                           const c10::optional<at::Tensor>& lut_scale, const c10::optional<at::Tensor>& mask,
                           const c10::optional<at::Tensor>& bias, int64_t isa) {
  return at::empty({x.size(0), out_features}, x.options());
}

std::vector<int64_t> lut_linear_isas() {
  std::vector<int64_t> isas;
  for (Isa isa : {kPortable, kAvx2, kAvx512})
    if (cpu_has(isa)) isas.push_back(isa);
  return isas;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(idkm_plugin, m) {
  m.def(
      "lut_linear(Tensor x, Tensor codes, Tensor lut, int bits, int out_features, int in_features, "
      "Tensor? channel_scale=None, Tensor? lut_scale=None, Tensor? mask=None, Tensor? bias=None, int isa=-1) "
      "-> Tensor");
  m.def("lut_linear_isas() -> int[]", &lut_linear_isas);
}

TORCH_LIBRARY_IMPL(idkm_plugin, CPU, m) { m.impl("lut_linear", &lut_linear_cpu); }

TORCH_LIBRARY_IMPL(idkm_plugin, Meta, m) { m.impl("lut_linear", &lut_linear_meta); }
