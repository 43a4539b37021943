// greenroute's batched verify attention as an onnxruntime custom operator (domain "greenroute",
// op "BatchedGroupQueryAttention"): onnxruntime's GroupQueryAttention with a shared KV buffer,
// for several new positions per row at batch > 1 (which GroupQueryAttention refuses: "batch_size
// must be 1 when sequence_length > 1 and past context is given"). The speculative rung's target
// verifies every row's drafts in one forward with it.
//
// Inputs (GroupQueryAttention's, packed QKV, rotary inside):
//   0 qkv           float [B, S, (H + 2 Hkv) D]   this forward's S new positions of each row
//   1 past_key      float [B, Hkv, T, D]          a row's first L_b positions are its past
//   2 past_value    float [B, Hkv, T, D]
//   3 seqlens_k     int32 [B]                     L_b + S - 1 (the row's mask count - 1)
//   4 total_len     int32 [1]                     T (unused: the buffer's length is T)
//   5 cos_cache     float [P, R / 2]              rotary tables (non-interleaved halves)
//   6 sin_cache     float [P, R / 2]
//   7 new_counts    int32 [B]                     n_b <= S: the row's real new positions (a
//                                                 shorter row's others are padding, a row
//                                                 taking no part has 0); seqlens_k = L_b + n_b - 1
// Outputs: 0 out float [B, S, H D] (zeros at padding); 1 present_key, 2 present_value [B, Hkv,
// T, D]: the past with each row's n_b new positions written at L_b .. L_b + n_b - 1, nothing
// else touched (bind them to the past's buffer and nothing is copied; otherwise the past is
// copied first).
// Attributes: num_heads (H), kv_num_heads (Hkv), scale (0: 1 / sqrt(D)).
//
// Row b's new position L_b + s (s < n_b) attends to its positions 0 .. L_b + s (causal), in float32:
// scores q . k * scale, softmax (max subtracted), the weighted sum of V. Work is split by
// (row, KV head) on onnxruntime's own thread pool; AVX2 + FMA where the CPU has them.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

bool HasAvx2() {
#if defined(__x86_64__)
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}

float DotScalar(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void AxpyScalar(float w, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

void ExpScalar(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) float DotAvx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  s0 = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float s = _mm_cvtss_f32(h);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

__attribute__((target("avx2,fma"))) void AxpyAvx2(float w, const float* x, float* y, int64_t n) {
  const __m256 vw = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vw, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += w * x[i];
}

// e^x for x <= 0 (softmax after the max is subtracted): x = n ln2 + r, |r| <= ln2 / 2, e^r by
// its Taylor polynomial to r^7 (relative error below 2e-7), times 2^n through the exponent bits.
__attribute__((target("avx2,fma"))) __m256 Exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) void ExpAvx2(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, Exp256(_mm256_loadu_ps(x + i)));
  if (i < n) {
    float tail[8] = {-87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f};
    std::memcpy(tail, x + i, static_cast<size_t>(n - i) * sizeof(float));
    _mm256_storeu_ps(tail, Exp256(_mm256_loadu_ps(tail)));
    std::memcpy(x + i, tail, static_cast<size_t>(n - i) * sizeof(float));
  }
}
constexpr int64_t kMaxFastD = 64;  // the fast paths keep a row of D floats in 8 registers

// scores[i * ld + t] = q_i . k_t * scale for nq queries (rows of q, D floats each) and n keys:
// four queries a key at a time, each key's D floats read once for the four, the four sums
// reduced together (no horizontal add per dot). D is a multiple of 8, at most kMaxFastD.
__attribute__((target("avx2,fma"))) void ScoresAvx2(const float* q, int64_t nq, const float* k,
                                                   int64_t n, int64_t d, float scale,
                                                   float* scores, int64_t ld) {
  for (int64_t i0 = 0; i0 < nq; i0 += 4) {
    const int64_t m = std::min<int64_t>(4, nq - i0);
    const float* qs[4];
    for (int64_t i = 0; i < 4; ++i) qs[i] = q + (i0 + std::min(i, m - 1)) * d;
    for (int64_t t = 0; t < n; ++t) {
      const float* kt = k + t * d;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t c = 0; c < d; c += 8) {
        const __m256 kv = _mm256_loadu_ps(kt + c);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qs[0] + c), kv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qs[1] + c), kv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(qs[2] + c), kv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(qs[3] + c), kv, a3);
      }
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
      alignas(16) float sum[4];
      _mm_store_ps(sum, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h),
                                              _mm256_extractf128_ps(h, 1)),
                                   _mm_set1_ps(scale)));
      for (int64_t i = 0; i < m; ++i) scores[(i0 + i) * ld + t] = sum[i];
    }
  }
}

// out = sum_t p[t] * v_t over n rows of D floats, the sum held in registers.
__attribute__((target("avx2,fma"))) void WeightedSumAvx2(const float* p, int64_t n,
                                                        const float* v, int64_t d, float* out) {
  __m256 acc[kMaxFastD / 8];
  const int64_t blocks = d / 8;
  for (int64_t b = 0; b < blocks; ++b) acc[b] = _mm256_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const __m256 w = _mm256_set1_ps(p[t]);
    const float* vt = v + t * d;
    for (int64_t b = 0; b < blocks; ++b)
      acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 8 * b), acc[b]);
  }
  for (int64_t b = 0; b < blocks; ++b) _mm256_storeu_ps(out + 8 * b, acc[b]);
}
#endif

using ScoresFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float, float*,
                          int64_t);
using WeightedSumFn = void (*)(const float*, int64_t, const float*, int64_t, float*);

struct Math {
  float (*dot)(const float*, const float*, int64_t);
  void (*axpy)(float, const float*, float*, int64_t);
  void (*exp)(float*, int64_t);
  ScoresFn scores = nullptr;  // the fast path (AVX2 + FMA), used where D fits it
  WeightedSumFn weighted_sum = nullptr;
};

// GREENROUTE_KERNEL_ISA=scalar (as for RowQuantMatMul) forces the portable path a CPU without
// AVX2 + FMA runs; GREENROUTE_ATTENTION_BLOCKED=0 the AVX2 per-dot path (head sizes the blocked
// one does not take).
Math PickMath() {
  const char* isa = std::getenv("GREENROUTE_KERNEL_ISA");
  const char* blocked = std::getenv("GREENROUTE_ATTENTION_BLOCKED");
#if defined(__x86_64__)
  if (HasAvx2() && !(isa != nullptr && std::string(isa) == "scalar")) {
    if (blocked != nullptr && std::string(blocked) == "0") return {DotAvx2, AxpyAvx2, ExpAvx2};
    return {DotAvx2, AxpyAvx2, ExpAvx2, ScoresAvx2, WeightedSumAvx2};
  }
#endif
  (void)isa;
  (void)blocked;
  return {DotScalar, AxpyScalar, ExpScalar};
}

// Rotate the first `rot` dimensions of `x` (non-interleaved halves) at one position.
void Rotate(const float* x, float* out, int64_t d, int64_t rot, const float* cos,
            const float* sin) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    out[i] = a * cos[i] - b * sin[i];
    out[i + half] = b * cos[i] + a * sin[i];
  }
  for (int64_t i = rot; i < d; ++i) out[i] = x[i];
}

struct Job {
  Math math;
  const float* qkv;
  const float *past_k, *past_v;
  float *k, *v, *out;
  const int32_t *seqlens, *counts;
  const float *cos, *sin;
  int64_t b, s, h, hkv, d, t, rot, positions;
  float scale;
  bool copy_past;
};

// Every query head of the group at once, once the row's new K/V are in place: all the group's
// rotated queries against every key of the row (four queries a key), then each query's softmax
// over its causal prefix and its weighted sum of V.
void FastHead(const Job& j, int64_t row, int64_t kvh, int64_t past, int64_t count,
              const float* k, const float* v) {
  const int64_t group = j.h / j.hkv, width = (j.h + 2 * j.hkv) * j.d, half = j.rot / 2;
  const int64_t nq = group * count, n = past + count;
  thread_local std::vector<float> q, scores;
  q.resize(static_cast<size_t>(nq * j.d));
  scores.resize(static_cast<size_t>(nq * n));
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t s = 0; s < count; ++s) {
      const int64_t p = past + s;
      const float* x = j.qkv + (row * j.s + s) * width + (kvh * group + g) * j.d;
      Rotate(x, q.data() + (g * count + s) * j.d, j.d, j.rot, j.cos + p * half,
             j.sin + p * half);
    }
  }
  j.math.scores(q.data(), nq, k, n, j.d, j.scale, scores.data(), n);
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t s = 0; s < count; ++s) {
      float* sc = scores.data() + (g * count + s) * n;
      const int64_t m = past + s + 1;  // causal: its own position and those before
      const float top = *std::max_element(sc, sc + m);
      for (int64_t i = 0; i < m; ++i) sc[i] -= top;
      j.math.exp(sc, m);
      float sum = 0.f;
      for (int64_t i = 0; i < m; ++i) sum += sc[i];
      const float inv = 1.f / sum;
      for (int64_t i = 0; i < m; ++i) sc[i] *= inv;
      j.math.weighted_sum(sc, m, v, j.d, j.out + (row * j.s + s) * j.h * j.d +
                                             (kvh * group + g) * j.d);
    }
  }
}

// One (row, KV head): write the row's new K/V, then every query head of the group attends.
void RunHead(void* data, size_t index) {
  const Job& j = *static_cast<const Job*>(data);
  const int64_t row = static_cast<int64_t>(index) / j.hkv, kvh = static_cast<int64_t>(index) % j.hkv;
  const int64_t count = j.counts[row], past = j.seqlens[row] + 1 - count;  // checked before
  const int64_t group = j.h / j.hkv, width = (j.h + 2 * j.hkv) * j.d;
  const int64_t head = (row * j.hkv + kvh) * j.t * j.d;
  float* k = j.k + head;
  float* v = j.v + head;
  for (int64_t s = count; s < j.s; ++s)  // padding: no K/V, a zero output
    for (int64_t qh = kvh * (j.h / j.hkv); qh < (kvh + 1) * (j.h / j.hkv); ++qh)
      std::fill_n(j.out + (row * j.s + s) * j.h * j.d + qh * j.d, j.d, 0.f);
  if (j.copy_past && past > 0) {
    std::memcpy(k, j.past_k + head, static_cast<size_t>(past * j.d) * sizeof(float));
    std::memcpy(v, j.past_v + head, static_cast<size_t>(past * j.d) * sizeof(float));
  }
  const int64_t half = j.rot / 2;
  for (int64_t s = 0; s < count; ++s) {
    const float* x = j.qkv + (row * j.s + s) * width;
    const int64_t p = past + s;
    Rotate(x + (j.h + kvh) * j.d, k + p * j.d, j.d, j.rot, j.cos + p * half, j.sin + p * half);
    std::memcpy(v + p * j.d, x + (j.h + j.hkv + kvh) * j.d, static_cast<size_t>(j.d) * sizeof(float));
  }
  if (j.math.scores != nullptr && j.d % 8 == 0 && j.d <= kMaxFastD) {
    FastHead(j, row, kvh, past, count, k, v);
    return;
  }
  thread_local std::vector<float> q, scores;
  q.resize(static_cast<size_t>(j.d));
  scores.resize(static_cast<size_t>(past + count));
  for (int64_t g = 0; g < group; ++g) {
    const int64_t qh = kvh * group + g;
    for (int64_t s = 0; s < count; ++s) {
      const int64_t p = past + s, n = p + 1;
      const float* x = j.qkv + (row * j.s + s) * width + qh * j.d;
      Rotate(x, q.data(), j.d, j.rot, j.cos + p * half, j.sin + p * half);
      float top = -INFINITY;
      for (int64_t i = 0; i < n; ++i) {
        scores[i] = j.math.dot(q.data(), k + i * j.d, j.d) * j.scale;
        top = std::max(top, scores[i]);
      }
      for (int64_t i = 0; i < n; ++i) scores[i] -= top;
      j.math.exp(scores.data(), n);
      float sum = 0.f;
      for (int64_t i = 0; i < n; ++i) sum += scores[i];
      float* o = j.out + (row * j.s + s) * j.h * j.d + qh * j.d;
      std::fill(o, o + j.d, 0.f);
      const float inv = 1.f / sum;
      for (int64_t i = 0; i < n; ++i) j.math.axpy(scores[i] * inv, v + i * j.d, o, j.d);
    }
  }
}

struct AttentionKernel {
  AttentionKernel(const OrtApi& api, const OrtKernelInfo* info) : api_(api), math_(PickMath()) {
    Ort::ThrowOnError(api_.KernelInfoGetAttribute_int64(info, "num_heads", &h_));
    Ort::ThrowOnError(api_.KernelInfoGetAttribute_int64(info, "kv_num_heads", &hkv_));
    OrtStatus* st = api_.KernelInfoGetAttribute_float(info, "scale", &scale_);
    if (st != nullptr) api_.ReleaseStatus(st);  // absent: 1 / sqrt(D)
    if (h_ < 1 || hkv_ < 1 || h_ % hkv_ != 0)
      ORT_CXX_API_THROW("BatchedGroupQueryAttention: num_heads must be a multiple of "
                        "kv_num_heads", ORT_INVALID_ARGUMENT);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto qkv = ctx.GetInput(0), pk = ctx.GetInput(1), pv = ctx.GetInput(2);
    auto seqlens = ctx.GetInput(3), cos = ctx.GetInput(5), sin = ctx.GetInput(6);
    auto counts = ctx.GetInput(7);
    const auto qs = qkv.GetTensorTypeAndShapeInfo().GetShape();
    const auto ks = pk.GetTensorTypeAndShapeInfo().GetShape();
    const auto cs = cos.GetTensorTypeAndShapeInfo().GetShape();
    if (qs.size() != 3 || ks.size() != 4 || cs.size() != 2)
      ORT_CXX_API_THROW("BatchedGroupQueryAttention: bad ranks", ORT_INVALID_ARGUMENT);
    Job j{};
    j.math = math_;
    j.b = qs[0], j.s = qs[1], j.h = h_, j.hkv = hkv_, j.d = ks[3], j.t = ks[2];
    j.rot = cs[1] * 2, j.positions = cs[0];
    if (ks[0] != j.b || ks[1] != hkv_ || qs[2] != (h_ + 2 * hkv_) * j.d || j.rot > j.d ||
        pv.GetTensorTypeAndShapeInfo().GetShape() != ks)
      ORT_CXX_API_THROW("BatchedGroupQueryAttention: shapes disagree (packed QKV, "
                        "[B, kv_heads, T, D] past)", ORT_INVALID_ARGUMENT);
    if (seqlens.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(j.b) ||
        counts.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(j.b))
      ORT_CXX_API_THROW("BatchedGroupQueryAttention: seqlens_k and new_counts need one entry "
                        "per row", ORT_INVALID_ARGUMENT);
    j.seqlens = seqlens.GetTensorData<int32_t>();
    j.counts = counts.GetTensorData<int32_t>();
    for (int64_t r = 0; r < j.b; ++r) {
      const int64_t n = j.counts[r], past = j.seqlens[r] + 1 - n;
      if (n < 0 || n > j.s || past < 0 || past + n > j.t || past + n > j.positions)
        ORT_CXX_API_THROW("BatchedGroupQueryAttention: a row's positions exceed its buffer",
                          ORT_INVALID_ARGUMENT);
    }
    j.scale = scale_ != 0.f ? scale_ : 1.f / std::sqrt(static_cast<float>(j.d));
    j.qkv = qkv.GetTensorData<float>();
    j.past_k = pk.GetTensorData<float>();
    j.past_v = pv.GetTensorData<float>();
    j.cos = cos.GetTensorData<float>();
    j.sin = sin.GetTensorData<float>();
    j.out = ctx.GetOutput(0, {j.b, j.s, h_ * j.d}).GetTensorMutableData<float>();
    j.k = ctx.GetOutput(1, ks).GetTensorMutableData<float>();
    j.v = ctx.GetOutput(2, ks).GetTensorMutableData<float>();
    j.copy_past = j.k != j.past_k || j.v != j.past_v;
    Ort::ThrowOnError(api_.KernelContext_ParallelFor(context, RunHead,
                                                     static_cast<size_t>(j.b * hkv_), 0, &j));
  }

 private:
  const OrtApi& api_;
  Math math_;
  int64_t h_ = 0, hkv_ = 0;
  float scale_ = 0.f;
};

struct AttentionOp : Ort::CustomOpBase<AttentionOp, AttentionKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const {
    return new AttentionKernel(api, info);
  }
  const char* GetName() const { return "BatchedGroupQueryAttention"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 3 || i == 4 || i == 7 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32
                            : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

}  // namespace

// The operator, for rowquant.cc's RegisterCustomOps to add to the "greenroute" domain.
OrtCustomOp* GreenrouteAttentionOp() {
  static AttentionOp op;
  return &op;
}
