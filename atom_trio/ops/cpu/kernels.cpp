// Fused kernels of atom_trio's CPU backend: paged decode attention, KV store, add + RMSNorm,
// rotary and SiLU-and-mul. Built and called by kernels.py (read its docstring); plain C++ with
// extern "C" entry points; no torch headers.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using bf16 = uint16_t;

inline float to_float(float x) { return x; }

inline float to_float(bf16 x) {  // bf16 is the top half of a float32
  uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void store(float x, float* out) { *out = x; }

inline void store(float x, bf16* out) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    *out = bf16((bits >> 16) | 0x40);  // a quiet NaN stays NaN
    return;
  }
  *out = bf16((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

#if !defined(__AVX512F__)
// exp for x <= 0 that vectorises (the libm call does not): Cephes' expf,
// relative error ~1e-7, with 2^n built in the exponent bits.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
#endif

// The two loops of one (sequence, KV head): scores of `len` consecutive keys
// (`scores[g * stride + t]`) and the probability-weighted sum of as many values.
// Portable versions, which the compiler vectorises as it can...
template <typename T, int kDim>
struct Rows {
  static void score(const T* q, const T* keys, int64_t len, int64_t group, int64_t runtime_dim, float scale,
                    float* scores, int64_t stride) {
    const int64_t dim = kDim ? kDim : runtime_dim;
    for (int64_t t = 0; t < len; ++t)
      for (int64_t g = 0; g < group; ++g) {
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; ++d) dot += to_float(q[g * dim + d]) * to_float(keys[t * dim + d]);
        scores[g * stride + t] = dot * scale;
      }
  }
  static void accumulate(const float* probs, int64_t stride, const T* values, int64_t len, int64_t group,
                         int64_t runtime_dim, float* acc) {
    const int64_t dim = kDim ? kDim : runtime_dim;
    for (int64_t t = 0; t < len; ++t)
      for (int64_t g = 0; g < group; ++g) {
        const float p = probs[g * stride + t];
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) acc[g * dim + d] += p * to_float(values[t * dim + d]);
      }
  }
};

#if defined(__AVX512F__)
// ...and AVX-512 ones for head sizes that are a multiple of 32, several
// times faster: 16 keys' dot products summed across lanes together (a 4x4
// transpose of partial sums) rather than one by one, and the output sums of
// a tile of kTile query heads kept in registers.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// The lane sums of a[0..15] as one vector; lane i is the sum of a[(i % 4) * 4 + i / 4].
inline __m512 sum_lanes16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
}

template <typename T, int kDim, int kTile>
struct Rows512 {
  static constexpr int kChunks = kDim / 16;

  // q . key for one query head and one key, as float32 lanes still to be summed
  static __m512 partial_dot(const T* q, const T* key) {
#if defined(__AVX512BF16__)
    if constexpr (sizeof(T) == 2) {  // bf16 pairs multiplied and summed into float32 in one instruction
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < kDim / 32; ++c)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + 32 * c),
                               (__m512bh)_mm512_loadu_si512(key + 32 * c));
      return acc;
    }
#endif
    __m512 acc = _mm512_mul_ps(load16(q), load16(key));
    for (int c = 1; c < kChunks; ++c) acc = _mm512_fmadd_ps(load16(q + 16 * c), load16(key + 16 * c), acc);
    return acc;
  }

  static void score(const T* q, const T* keys, int64_t len, int64_t group, int64_t, float scale, float* scores,
                    int64_t stride) {
    const __m512 scale16 = _mm512_set1_ps(scale);
    for (int64_t g = 0; g < group; ++g)
      for (int64_t t0 = 0; t0 < len; t0 += 16) {
        const int n = int(std::min<int64_t>(16, len - t0));
        __m512 partial[16];
        for (int t = 0; t < 16; ++t)  // token t goes where sum_lanes16 puts it in lane t
          partial[(t % 4) * 4 + t / 4] = t < n ? partial_dot(q + g * kDim, keys + (t0 + t) * kDim)
                                               : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(scores + g * stride + t0, __mmask16((1u << n) - 1),
                              _mm512_mul_ps(sum_lanes16(partial), scale16));
      }
  }

  static void accumulate(const float* probs, int64_t stride, const T* values, int64_t len, int64_t group, int64_t,
                         float* acc) {
    for (int64_t g0 = 0; g0 < group; g0 += kTile) {
      __m512 sums[kTile][kChunks];
      for (int g = 0; g < kTile; ++g)
        for (int c = 0; c < kChunks; ++c) sums[g][c] = _mm512_loadu_ps(acc + (g0 + g) * kDim + 16 * c);
      for (int64_t t = 0; t < len; ++t) {
        __m512 v[kChunks];
        for (int c = 0; c < kChunks; ++c) v[c] = load16(values + t * kDim + 16 * c);
        for (int g = 0; g < kTile; ++g) {
          const __m512 p = _mm512_set1_ps(probs[(g0 + g) * stride + t]);
          for (int c = 0; c < kChunks; ++c) sums[g][c] = _mm512_fmadd_ps(p, v[c], sums[g][c]);
        }
      }
      for (int g = 0; g < kTile; ++g)
        for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(acc + (g0 + g) * kDim + 16 * c, sums[g][c]);
    }
  }
};
#endif

#if defined(__AVX512F__)
// Cephes' expf (relative error ~1e-7) on 16 lanes, 2^n applied by vscalefps;
// inputs below -87 give 0-ish, above 88 infinity.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, k);
}
#endif

// In place: row[t] = exp(row[t] - max) / sum.
inline void softmax(float* row, int64_t n) {
#if defined(__AVX512F__)
  __m512 top16 = _mm512_set1_ps(row[0]);
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 live = n - t >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - t)) - 1);
    top16 = _mm512_max_ps(top16, _mm512_mask_loadu_ps(top16, live, row + t));
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(top16));
  __m512 total16 = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 live = n - t >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - t)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, row + t), top)));
    total16 = _mm512_add_ps(total16, e);
    _mm512_mask_storeu_ps(row + t, live, e);
  }
  const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total16));
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 live = n - t >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - t)) - 1);
    _mm512_mask_storeu_ps(row + t, live, _mm512_mul_ps(_mm512_maskz_loadu_ps(live, row + t), inverse));
  }
#else
  float top = row[0];
  for (int64_t t = 1; t < n; ++t) top = std::max(top, row[t]);
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t < n; ++t) {
    row[t] = exp_nonpositive(row[t] - top);
    total += row[t];
  }
  const float inverse = 1.0f / total;
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) row[t] *= inverse;
#endif
}

inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(static_cast<const char*>(p) + i);
}

template <typename T, typename R>
void decode_attention(const T* q, int64_t q_seq_stride, const T* k_cache, const T* v_cache,
                      const int32_t* block_tables, int64_t table_stride, const int32_t* context_lens,
                      T* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t dim,
                      int64_t num_blocks, int64_t block_size, float scale, int num_threads) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t head_stride = num_blocks * block_size * dim;  // one KV head's part of the cache
  int64_t max_context = 1;
  for (int64_t s = 0; s < num_seqs; ++s) max_context = std::max<int64_t>(max_context, context_lens[s]);

#pragma omp parallel num_threads(num_threads)
  {
    // per thread: the group's scores (then probabilities) and output sums
    float* scores = static_cast<float*>(std::malloc(sizeof(float) * group * max_context));
    float* acc = static_cast<float*>(std::malloc(sizeof(float) * group * dim));
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_seqs * num_kv_heads; ++item) {
      const int64_t seq = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t context = context_lens[seq];
      const int32_t* table = block_tables + seq * table_stride;
      const T* queries = q + seq * q_seq_stride + kv_head * group * dim;
      const T* k_head = k_cache + kv_head * head_stride;
      const T* v_head = v_cache + kv_head * head_stride;
      T* o = out + (seq * num_heads + kv_head * group) * dim;
      if (context <= 0) {  // a padding row attends to nothing
        for (int64_t i = 0; i < group * dim; ++i) store(0.0f, o + i);
        continue;
      }

      const int64_t block_bytes = block_size * dim * int64_t(sizeof(T));
      for (int64_t start = 0; start < context; start += block_size) {
        // The blocks are scattered: ask for the next key block and this value
        // block before they are needed, so their misses overlap this work.
        const int64_t offset = int64_t(table[start / block_size]) * block_size * dim;
        if (start + block_size < context)
          prefetch(k_head + int64_t(table[start / block_size + 1]) * block_size * dim, block_bytes);
        prefetch(v_head + offset, block_bytes);
        R::score(queries, k_head + offset, std::min(block_size, context - start), group, dim, scale,
                 scores + start, context);
      }

      for (int64_t g = 0; g < group; ++g) softmax(scores + g * context, context);

      std::fill(acc, acc + group * dim, 0.0f);
      for (int64_t start = 0; start < context; start += block_size)
        R::accumulate(scores + start, context, v_head + int64_t(table[start / block_size]) * block_size * dim,
                      std::min(block_size, context - start), group, dim, acc);
      for (int64_t i = 0; i < group * dim; ++i) store(acc[i], o + i);
    }
    std::free(scores);
    std::free(acc);
  }
}

template <typename T>
void dispatch(const void* q, int64_t q_seq_stride, const void* k_cache, const void* v_cache,
              const int32_t* block_tables, int64_t table_stride, const int32_t* context_lens, void* out,
              int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t dim, int64_t num_blocks,
              int64_t block_size, float scale, int num_threads) {
  auto run = [&](auto kernel) {
    kernel(static_cast<const T*>(q), q_seq_stride, static_cast<const T*>(k_cache),
           static_cast<const T*>(v_cache), block_tables, table_stride, context_lens, static_cast<T*>(out),
           num_seqs, num_heads, num_kv_heads, dim, num_blocks, block_size, scale, num_threads);
  };
#if defined(__AVX512F__)
  // the largest tile of query heads (at most 4; 2 for the wider heads) that divides the group
  const int64_t group = num_heads / num_kv_heads;
  const int tile = group % 4 == 0 ? 4 : group % 3 == 0 ? 3 : group % 2 == 0 ? 2 : 1;
  if (dim == 64) {
    if (tile == 4) return run(decode_attention<T, Rows512<T, 64, 4>>);
    if (tile == 3) return run(decode_attention<T, Rows512<T, 64, 3>>);
    if (tile == 2) return run(decode_attention<T, Rows512<T, 64, 2>>);
    return run(decode_attention<T, Rows512<T, 64, 1>>);
  }
  if (dim == 128) {
    if (tile % 2 == 0) return run(decode_attention<T, Rows512<T, 128, 2>>);
    return run(decode_attention<T, Rows512<T, 128, 1>>);
  }
#endif
  if (dim == 64) return run(decode_attention<T, Rows<T, 64>>);
  if (dim == 128) return run(decode_attention<T, Rows<T, 128>>);
  run(decode_attention<T, Rows<T, 0>>);
}

}  // namespace

// The layers' elementwise ops, one pass each where torch makes two to six
// (each a dispatch that costs more than the work at decode sizes). They round
// where torch's own CPU kernels do, so results match torch's to the last bit
// or, where an exp is involved, to about one unit in the last place.
template <typename T>
inline T round_to(float x) {
  T out;
  store(x, &out);
  return out;
}

#if defined(__AVX512F__)
// 16 floats rounded to T and widened back (the value a T tensor would hold), and stored as T.
inline __m256i to_bf16x16(__m512 x) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(x);
#else
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                                  _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
#endif
}
inline __m512 round16(__m512 x, const float*) { return x; }
inline __m512 round16(__m512 x, const bf16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16x16(x)), 16));
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(bf16* p, __m512 x) { _mm256_storeu_si256((__m256i*)p, to_bf16x16(x)); }
#endif

// out = rms_norm(x + residual) * weight (one rounding, as F.rms_norm); the sum
// (rounded, as torch's add) goes to `sum` when there is a residual. The sum of
// squares runs in this loop's order; torch's follows the vector width it was
// dispatched to (8 or 16 lanes, four accumulators, a cascade), so the scale may
// differ from torch's in its last float32 bit and a bf16 output by one ulp.
template <typename T>
void add_rms_norm(const T* x, int64_t x_stride, const T* residual, int64_t residual_stride, const T* weight,
                  T* out, T* sum, int64_t rows, int64_t dim, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * dim >= 16384)
  for (int64_t i = 0; i < rows; ++i) {
    const T* xi = x + i * x_stride;
    T* oi = out + i * dim;
    if (residual != nullptr) {
      const T* ri = residual + i * residual_stride;
      T* si = sum + i * dim;
      int64_t d = 0;
#if defined(__AVX512F__)
      for (; d + 16 <= dim; d += 16) store16(si + d, _mm512_add_ps(load16(xi + d), load16(ri + d)));
#endif
      for (; d < dim; ++d) si[d] = round_to<T>(to_float(xi[d]) + to_float(ri[d]));
      xi = si;
    }
    float squares = 0.0f;
    int64_t d = 0;
#if defined(__AVX512F__)
    __m512 squares16 = _mm512_setzero_ps();
    for (; d + 16 <= dim; d += 16) squares16 = _mm512_fmadd_ps(load16(xi + d), load16(xi + d), squares16);
    squares = _mm512_reduce_add_ps(squares16);
#endif
    for (; d < dim; ++d) squares += to_float(xi[d]) * to_float(xi[d]);
    const float inverse = 1.0f / std::sqrt(squares / float(dim) + eps);
    d = 0;
#if defined(__AVX512F__)
    for (; d + 16 <= dim; d += 16)
      store16(oi + d, _mm512_mul_ps(_mm512_mul_ps(load16(xi + d), _mm512_set1_ps(inverse)), load16(weight + d)));
#endif
    for (; d < dim; ++d) oi[d] = round_to<T>(to_float(xi[d]) * inverse * to_float(weight[d]));
  }
}

// out = silu(x[:, :d]) * x[:, d:], silu rounded first as torch's two ops do.
template <typename T>
void silu_and_mul(const T* x, int64_t x_stride, T* out, int64_t rows, int64_t d, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * d >= 16384)
  for (int64_t i = 0; i < rows; ++i) {
    const T* gate = x + i * x_stride;
    const T* up = gate + d;
    T* oi = out + i * d;
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= d; j += 16) {
      const __m512 g = load16(gate + j);
      const __m512 exp_minus_g = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
      const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_minus_g));
      store16(oi + j, _mm512_mul_ps(round16(silu, oi), load16(up + j)));
    }
#endif
    for (; j < d; ++j) {
      const float g = to_float(gate[j]);
      oi[j] = round_to<T>(to_float(round_to<T>(g / (1.0f + std::exp(-g)))) * to_float(up[j]));
    }
  }
}

// Rotate-half rotary of query and key heads into out [tokens, q_heads + k_heads, dim]:
// x * [cos, cos] + roll(x) * [-sin, sin], with cos/sin and both products rounded to T
// as the torch path's ops in T do (float32 everywhere for float32).
template <typename T>
void rotary(const int64_t* positions, const T* q, int64_t q_stride, const T* k, int64_t k_stride,
            const float* cos_sin, int64_t cos_sin_stride, T* out, int64_t tokens, int64_t q_heads, int64_t k_heads,
            int64_t dim, int num_threads) {
  const int64_t half = dim / 2;
#pragma omp parallel for num_threads(num_threads) if (tokens * (q_heads + k_heads) * dim >= 16384)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* cos = cos_sin + positions[t] * cos_sin_stride;
    const float* sin = cos + half;
    for (int64_t h = 0; h < q_heads + k_heads; ++h) {
      const T* x = h < q_heads ? q + t * q_stride + h * dim : k + t * k_stride + (h - q_heads) * dim;
      T* o = out + (t * (q_heads + k_heads) + h) * dim;
      int64_t j = 0;
#if defined(__AVX512F__)
      for (; j + 16 <= half; j += 16) {
        const __m512 c = round16(_mm512_loadu_ps(cos + j), o), s = round16(_mm512_loadu_ps(sin + j), o);
        const __m512 x1 = load16(x + j), x2 = load16(x + j + half);
        store16(o + j, _mm512_sub_ps(round16(_mm512_mul_ps(x1, c), o), round16(_mm512_mul_ps(x2, s), o)));
        store16(o + j + half, _mm512_add_ps(round16(_mm512_mul_ps(x2, c), o), round16(_mm512_mul_ps(x1, s), o)));
      }
#endif
      for (; j < half; ++j) {
        const float c = to_float(round_to<T>(cos[j])), s = to_float(round_to<T>(sin[j]));
        const float x1 = to_float(x[j]), x2 = to_float(x[j + half]);
        o[j] = round_to<T>(to_float(round_to<T>(x1 * c)) - to_float(round_to<T>(x2 * s)));
        o[j + half] = round_to<T>(to_float(round_to<T>(x2 * c)) + to_float(round_to<T>(x1 * s)));
      }
    }
  }
}

// Key/value rows [tokens, kv_heads, dim] (token and head strides in elements)
// to their slots of caches [kv_heads, slots, dim]: one copy per row, where
// torch's index_copy_ costs two dispatches of more than the copies.
// Strides in elements; key and value may have different ones (a prefill's rotated keys are a tensor of their
// own, its values a view of the fused QKV projection).
extern "C" void atom_trio_store_kv(const char* key, int64_t k_token_stride, int64_t k_head_stride,
                                   const char* value, int64_t v_token_stride, int64_t v_head_stride,
                                   char* k_cache, char* v_cache, const int64_t* slots, int64_t num_tokens,
                                   int64_t num_kv_heads, int64_t num_slots, int64_t dim, int64_t element_size) {
  const int64_t row = dim * element_size;
  for (int64_t t = 0; t < num_tokens; ++t)
    for (int64_t h = 0; h < num_kv_heads && slots[t] >= 0; ++h) {  // slot -1: a padding row, stored nowhere
      const int64_t dst = (h * num_slots + slots[t]) * row;
      std::memcpy(k_cache + dst, key + (t * k_token_stride + h * k_head_stride) * element_size, row);
      std::memcpy(v_cache + dst, value + (t * v_token_stride + h * v_head_stride) * element_size, row);
    }
}

extern "C" void atom_trio_add_rms_norm(int dtype, const void* x, int64_t x_stride, const void* residual,
                                       int64_t residual_stride, const void* weight, void* out, void* sum,
                                       int64_t rows, int64_t dim, float eps, int num_threads) {
  if (dtype == 0)
    add_rms_norm((const float*)x, x_stride, (const float*)residual, residual_stride, (const float*)weight,
                 (float*)out, (float*)sum, rows, dim, eps, num_threads);
  else
    add_rms_norm((const bf16*)x, x_stride, (const bf16*)residual, residual_stride, (const bf16*)weight, (bf16*)out,
                 (bf16*)sum, rows, dim, eps, num_threads);
}

extern "C" void atom_trio_silu_and_mul(int dtype, const void* x, int64_t x_stride, void* out, int64_t rows, int64_t d,
                                       int num_threads) {
  if (dtype == 0) silu_and_mul((const float*)x, x_stride, (float*)out, rows, d, num_threads);
  else silu_and_mul((const bf16*)x, x_stride, (bf16*)out, rows, d, num_threads);
}

extern "C" void atom_trio_rotary(int dtype, const int64_t* positions, const void* q, int64_t q_stride, const void* k,
                                 int64_t k_stride, const float* cos_sin, int64_t cos_sin_stride, void* out,
                                 int64_t tokens, int64_t q_heads, int64_t k_heads, int64_t dim, int num_threads) {
  if (dtype == 0)
    rotary(positions, (const float*)q, q_stride, (const float*)k, k_stride, cos_sin, cos_sin_stride, (float*)out,
           tokens, q_heads, k_heads, dim, num_threads);
  else
    rotary(positions, (const bf16*)q, q_stride, (const bf16*)k, k_stride, cos_sin, cos_sin_stride, (bf16*)out, tokens,
           q_heads, k_heads, dim, num_threads);
}

extern "C" void atom_trio_decode_attention(
    int dtype, const void* q, int64_t q_seq_stride, const void* k_cache, const void* v_cache,
    const int32_t* block_tables, int64_t table_stride, const int32_t* context_lens, void* out,
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t dim, int64_t num_blocks,
    int64_t block_size, float scale, int num_threads) {
  if (dtype == 0)
    dispatch<float>(q, q_seq_stride, k_cache, v_cache, block_tables, table_stride, context_lens, out,
                    num_seqs, num_heads, num_kv_heads, dim, num_blocks, block_size, scale, num_threads);
  else
    dispatch<bf16>(q, q_seq_stride, k_cache, v_cache, block_tables, table_stride, context_lens, out,
                   num_seqs, num_heads, num_kv_heads, dim, num_blocks, block_size, scale, num_threads);
}
