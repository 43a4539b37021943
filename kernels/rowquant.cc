// greenroute's batched 8-bit-weight GEMM as an onnxruntime custom operator (domain
// "greenroute", op "RowQuantMatMul"). Each activation row is quantized symmetrically to
// integers in [-L, L] with its own scale (L, the attribute "levels": 127 for int8, up to 32767),
// multiplied by int8 weights with one scale per output channel, and accumulated exactly in
// int32:
//
//   m = max(max|x|, 1e-8)   q = rint(x * (L / m))   sx = m / L           (per row)
//   acc[n] = sum_k q[k] * W[n, k]                                         (exact int32)
//   y[n] = float(acc[n]) * (sx * sw[n])                                   (float32)
//
// Inputs:  X float [..., K]; W int8 [N, Kp] (output channel major, K zero-padded to Kp, a
//          multiple of 64); SW float [N]; WSUM int32 [N] (sum_k W[n, k], the offset paths').
// Outputs: one per entry of the "splits" attribute (columns of W in order), each [..., n_i]:
//          projections that read one activation (q/k/v, gate/up) share one quantization.
// L * 127 * Kp must stay below 2^31 (the build picks L from K); the operator refuses otherwise.
//
// Why our own: onnxruntime's AVX2 int8 kernels either saturate (u8 x s8 pairs in vpmaddubsw
// overflow int16) or split every weight into low and high bytes and scale badly with rows.
// Paths, chosen at run time from the CPU:
//   avx2:        int16 activations (any L) x int8 weights widened to int16 once per step for
//                all the tile's rows; vpmaddwd's int32 pair sums cannot saturate. An int8 row
//                costs what a 15-bit one does here, so the build gives AVX2 the finer one.
//   avx-vnni, avx-512 vnni: L = 127: vpdpbusd on a + 128, the weight sums subtracted;
//                L > 127: vpdpwssd on int16 activations and widened weights.
// Register tiles of 4 rows (and a 1-row path of 4 columns for one-row decode steps). Integer
// sums do not depend on order, so a row's result is the same whatever M is and whichever rows
// share the call. Work is split by column blocks on onnxruntime's own thread pool
// (KernelContext_ParallelFor); the library starts no threads.
//
// GREENROUTE_KERNEL_ISA=scalar|avx2|avxvnni|avx512vnni forces a path (never one the CPU lacks);
// greenroute_kernel_isa() says which one runs.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

// GCC 12's own _mm512_extracti64x4_epi64 trips -W(maybe-)uninitialized (_mm256_undefined_si256)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {

constexpr int64_t kPad = 64;        // W's K is padded to a multiple of this
constexpr int64_t kBlockCols = 64;  // columns per parallel task

enum class Isa { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3 };

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvxVnni: return "avxvnni";
    case Isa::kAvx512Vnni: return "avx512vnni";
    default: return "scalar";
  }
}

Isa DetectIsa() {
  Isa best = Isa::kScalar;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avxvnni")) best = Isa::kAvxVnni;
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"))
    best = Isa::kAvx512Vnni;
#endif
  const char* force = std::getenv("GREENROUTE_KERNEL_ISA");
  if (force != nullptr && *force != '\0') {
    for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvxVnni, Isa::kAvx512Vnni}) {
      // a path the CPU lacks is never taken: an AVX-VNNI request on an AVX-512 VNNI CPU
      // without AVX-VNNI falls back to avx2
      if (std::string(force) == IsaName(isa)) {
        bool ok = isa <= best && !(isa == Isa::kAvxVnni
#if defined(__x86_64__)
                                   && !__builtin_cpu_supports("avxvnni")
#endif
                                  );
        return ok ? isa : (isa == Isa::kAvxVnni && best >= Isa::kAvx2 ? Isa::kAvx2 : best);
      }
    }
  }
  return best;
}

Isa ActiveIsa() {
  static const Isa isa = DetectIsa();
  return isa;
}

// ---- activation rows, in the layout a path reads, one scale per row ----
//   int16 q (scalar, avx2, and the VNNI paths when L > 127) or uint8 q + 128 (VNNI, L = 127)

enum class Layout { kInt16, kUint8 };

Layout LayoutFor(Isa isa, int64_t levels) {
  return (isa == Isa::kAvxVnni || isa == Isa::kAvx512Vnni) && levels <= 127 ? Layout::kUint8
                                                                           : Layout::kInt16;
}

size_t ElementBytes(Layout l) { return l == Layout::kInt16 ? 2 : 1; }

inline void StoreScalar(Layout l, void* q, int64_t i, int v) {
  if (l == Layout::kInt16) {
    static_cast<int16_t*>(q)[i] = static_cast<int16_t>(v);
  } else {
    static_cast<uint8_t*>(q)[i] = static_cast<uint8_t>(v + 128);
  }
}

// The row's scale, computed exactly as numpy does in models/build/pipeline/rowquant.py.
inline float RowInv(float amax, float levels, float* sx) {
  const float m = std::max(amax, 1e-8f);
  *sx = m / levels;
  return levels / m;
}

void QuantizeRowScalar(const float* x, int64_t k, int64_t kp, float levels, Layout l, void* q,
                       float* sx) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float inv = RowInv(amax, levels, sx);
  for (int64_t i = 0; i < k; ++i)
    StoreScalar(l, q, i, static_cast<int>(std::nearbyintf(x[i] * inv)));  // half to even
  for (int64_t i = k; i < kp; ++i) StoreScalar(l, q, i, 0);  // padding meets zero weights
}

// x[0..8) * inv rounded half to even, as numpy's rint, to int32
__attribute__((target("avx2,fma"))) inline __m256i Cvt8(const float* x, __m256 inv) {
  return _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), inv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

__attribute__((target("avx2,fma"))) void QuantizeRowAvx2(const float* x, int64_t k, int64_t kp,
                                                         float levels, Layout l, void* q,
                                                         float* sx) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8)
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.f;
  for (float v : lanes) amax = std::max(amax, v);
  for (; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  const __m256 inv = _mm256_set1_ps(RowInv(amax, levels, sx));
  i = 0;
  if (l == Layout::kInt16) {
    int16_t* out = static_cast<int16_t*>(q);
    for (; i + 16 <= k; i += 16) {
      const __m256i p = _mm256_permute4x64_epi64(
          _mm256_packs_epi32(Cvt8(x + i, inv), Cvt8(x + i + 8, inv)), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), p);
    }
  } else {
    uint8_t* out = static_cast<uint8_t*>(q);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i offset = _mm256_set1_epi8(static_cast<char>(0x80));
    for (; i + 32 <= k; i += 32) {
      const __m256i a = _mm256_packs_epi32(Cvt8(x + i, inv), Cvt8(x + i + 8, inv));
      const __m256i b = _mm256_packs_epi32(Cvt8(x + i + 16, inv), Cvt8(x + i + 24, inv));
      const __m256i p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_xor_si256(p, offset));
    }
  }
  const float inv1 = _mm256_cvtss_f32(inv);
  for (; i < k; ++i) StoreScalar(l, q, i, static_cast<int>(std::nearbyintf(x[i] * inv1)));
  for (; i < kp; ++i) StoreScalar(l, q, i, 0);
}

// ---- the tiles: R rows x C columns over all of K, int32 sums into acc[r * C + c] ----

void TileScalar(const void* qv, int64_t kp, const int8_t* w, int r, int c, int32_t* acc) {
  const int16_t* q = static_cast<const int16_t*>(qv);
  for (int i = 0; i < r; ++i)
    for (int j = 0; j < c; ++j) {
      int32_t s = 0;
      for (int64_t t = 0; t < kp; ++t) s += int32_t(q[i * kp + t]) * int32_t(w[j * kp + t]);
      acc[i * c + j] = s;
    }
}

// The 8 int32 lanes of each of n vectors summed, four vectors at a time.
__attribute__((target("avx2,fma"))) inline void Reduce256(const __m256i* v, int n,
                                                           int32_t* out) {
  for (int g = 0; g < n; g += 4) {
    const __m256i z = _mm256_setzero_si256();
    const __m256i a = v[g], b = g + 1 < n ? v[g + 1] : z, c = g + 2 < n ? v[g + 2] : z,
                  d = g + 3 < n ? v[g + 3] : z;
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    alignas(16) int32_t lanes[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(lanes),
                    _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)));
    for (int j = 0; j < 4 && g + j < n; ++j) out[g + j] = lanes[j];
  }
}

template <int N>
__attribute__((target("avx512f,avx512bw"))) inline void Reduce512(const __m512i* v,
                                                                  int32_t* out) {
  __m256i half[N];
  for (int i = 0; i < N; ++i)
    half[i] = _mm256_add_epi32(_mm512_castsi512_si256(v[i]), _mm512_extracti64x4_epi64(v[i], 1));
  Reduce256(half, N, out);
}

// AVX2: int16 activations x int8 weights widened to int16 once per step (shared by the R
// rows); vpmaddwd adds pairs of exact products into int32.
template <int R, int C>
__attribute__((target("avx2,fma"))) void TileAvx2(const void* qv, int64_t kp, const int8_t* w,
                                                   int32_t* acc) {
  const int16_t* q = static_cast<const int16_t*>(qv);
  __m256i sum[R * C];
  for (auto& v : sum) v = _mm256_setzero_si256();
  for (int64_t t = 0; t < kp; t += 16) {
    __m256i b[C];
    for (int j = 0; j < C; ++j)
      b[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * kp + t)));
    for (int i = 0; i < R; ++i) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * kp + t));
      for (int j = 0; j < C; ++j)
        sum[i * C + j] = _mm256_add_epi32(sum[i * C + j], _mm256_madd_epi16(a, b[j]));
    }
  }
  Reduce256(sum, R * C, acc);
}

// AVX-VNNI, int16 activations: vpdpwssd (vpmaddwd and the add in one instruction).
template <int R, int C>
__attribute__((target("avx2,fma,avxvnni"))) void TileAvxVnni16(const void* qv, int64_t kp,
                                                                const int8_t* w, int32_t* acc) {
  const int16_t* q = static_cast<const int16_t*>(qv);
  __m256i sum[R * C];
  for (auto& v : sum) v = _mm256_setzero_si256();
  for (int64_t t = 0; t < kp; t += 16) {
    __m256i b[C];
    for (int j = 0; j < C; ++j)
      b[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * kp + t)));
    for (int i = 0; i < R; ++i) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * kp + t));
      for (int j = 0; j < C; ++j) sum[i * C + j] = _mm256_dpwssd_avx_epi32(sum[i * C + j], a, b[j]);
    }
  }
  Reduce256(sum, R * C, acc);
}

// AVX-VNNI, uint8 activations (a + 128): vpdpbusd.
template <int R, int C>
__attribute__((target("avx2,fma,avxvnni"))) void TileAvxVnni8(const void* qv, int64_t kp,
                                                               const int8_t* w, int32_t* acc) {
  const uint8_t* q = static_cast<const uint8_t*>(qv);
  __m256i sum[R * C];
  for (auto& v : sum) v = _mm256_setzero_si256();
  for (int64_t t = 0; t < kp; t += 32) {
    __m256i b[C];
    for (int j = 0; j < C; ++j)
      b[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * kp + t));
    for (int i = 0; i < R; ++i) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * kp + t));
      for (int j = 0; j < C; ++j) sum[i * C + j] = _mm256_dpbusd_avx_epi32(sum[i * C + j], a, b[j]);
    }
  }
  Reduce256(sum, R * C, acc);
}

// AVX-512 VNNI, int16 activations: vpdpwssd on 32 values a step.
template <int R, int C>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void TileAvx512Vnni16(
    const void* qv, int64_t kp, const int8_t* w, int32_t* acc) {
  const int16_t* q = static_cast<const int16_t*>(qv);
  __m512i sum[R * C];
  for (auto& v : sum) v = _mm512_setzero_si512();
  for (int64_t t = 0; t < kp; t += 32) {
    __m512i b[C];
    for (int j = 0; j < C; ++j)
      b[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * kp + t)));
    for (int i = 0; i < R; ++i) {
      const __m512i a = _mm512_loadu_si512(q + i * kp + t);
      for (int j = 0; j < C; ++j) sum[i * C + j] = _mm512_dpwssd_epi32(sum[i * C + j], a, b[j]);
    }
  }
  Reduce512<R * C>(sum, acc);
}

// AVX-512 VNNI, uint8 activations (a + 128): vpdpbusd on 64 values a step.
template <int R, int C>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void TileAvx512Vnni8(
    const void* qv, int64_t kp, const int8_t* w, int32_t* acc) {
  const uint8_t* q = static_cast<const uint8_t*>(qv);
  __m512i sum[R * C];
  for (auto& v : sum) v = _mm512_setzero_si512();
  for (int64_t t = 0; t < kp; t += 64) {
    __m512i b[C];
    for (int j = 0; j < C; ++j) b[j] = _mm512_loadu_si512(w + j * kp + t);
    for (int i = 0; i < R; ++i) {
      const __m512i a = _mm512_loadu_si512(q + i * kp + t);
      for (int j = 0; j < C; ++j) sum[i * C + j] = _mm512_dpbusd_epi32(sum[i * C + j], a, b[j]);
    }
  }
  Reduce512<R * C>(sum, acc);
}

using TileFn = void (*)(const void*, int64_t, const int8_t*, int32_t*);
using QuantizeFn = void (*)(const float*, int64_t, int64_t, float, Layout, void*, float*);

// fn[r][c]: a tile of r rows (1..4) and c columns; nullptr where a path has no such tile
struct Tiles {
  TileFn fn[5][5] = {};
  int cols_for_rows[5] = {0, 1, 1, 1, 1};  // the widest tile's columns for each row count
};

#define GR_TILES(NAME, C1, CN)                                                   \
  {                                                                            \
    t.fn[1][C1] = NAME<1, C1>; t.fn[1][1] = NAME<1, 1>;                        \
    t.fn[2][CN] = NAME<2, CN>; t.fn[2][1] = NAME<2, 1>;                        \
    t.fn[3][CN] = NAME<3, CN>; t.fn[3][1] = NAME<3, 1>;                        \
    t.fn[4][CN] = NAME<4, CN>; t.fn[4][1] = NAME<4, 1>;                        \
    t.cols_for_rows[1] = C1;                                                   \
    t.cols_for_rows[2] = t.cols_for_rows[3] = t.cols_for_rows[4] = CN;         \
  }

// Register budgets: 16 ymm (R*C sums + C weights + 1 row + a temporary), 32 zmm.
Tiles MakeTiles(Isa isa, Layout layout) {
  Tiles t;
  const bool u8 = layout == Layout::kUint8;
  switch (isa) {
    case Isa::kAvx2: GR_TILES(TileAvx2, 4, 3) break;
    case Isa::kAvxVnni:
      if (u8) GR_TILES(TileAvxVnni8, 4, 3) else GR_TILES(TileAvxVnni16, 4, 3)
      break;
    case Isa::kAvx512Vnni:
      if (u8) GR_TILES(TileAvx512Vnni8, 4, 4) else GR_TILES(TileAvx512Vnni16, 4, 4)
      break;
    default: break;
  }
  return t;
}

struct Job {
  const Tiles* tiles;
  bool offset;       // uint8 rows: subtract 128 * WSUM
  const uint8_t* q;  // rows in the layout, each kp elements
  size_t row_bytes;
  const float* sx;
  const int8_t* w;
  const float* sw;
  const int32_t* wsum;
  int64_t m, kp;
  // one parallel task each: columns [col, col + cols) of W, in output `out` (whose first
  // column is W's `first` and whose rows are `ldy` wide); fixed per node, laid out once
  struct Block { int64_t out, ldy, col, cols, first; };
  const std::vector<Block>* blocks;
  float* const* y;  // this call's outputs
};

void RunBlock(void* data, size_t index) {
  const Job& job = *static_cast<const Job*>(data);
  const Job::Block& blk = (*job.blocks)[index];
  float* const y = job.y[blk.out];
  int32_t acc[16];
  for (int64_t r0 = 0; r0 < job.m; r0 += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, job.m - r0));
    const void* q = job.q + r0 * job.row_bytes;
    for (int64_t c = blk.col; c < blk.col + blk.cols;) {
      int cols = job.tiles->cols_for_rows[rows];
      if (c + cols > blk.col + blk.cols) cols = 1;
      const int8_t* w = job.w + c * job.kp;
      if (const TileFn fn = job.tiles->fn[rows][cols]) {
        fn(q, job.kp, w, acc);
      } else {
        TileScalar(q, job.kp, w, rows, cols, acc);
      }
      for (int i = 0; i < rows; ++i) {
        float* yr = y + (r0 + i) * blk.ldy + (c - blk.first);
        const float sx = job.sx[r0 + i];
        for (int j = 0; j < cols; ++j) {
          const int32_t s = acc[i * cols + j] - (job.offset ? 128 * job.wsum[c + j] : 0);
          yr[j] = static_cast<float>(s) * (sx * job.sw[c + j]);
        }
      }
      c += cols;
    }
  }
}

struct RowQuantKernel {
  RowQuantKernel(const OrtApi& api, const OrtKernelInfo* info) : api_(api) {
    size_t n = 0;
    OrtStatus* st = api_.KernelInfoGetAttributeArray_int64(info, "splits", nullptr, &n);
    if (st != nullptr) api_.ReleaseStatus(st);
    splits_.resize(n);
    if (n > 0) {
      Ort::ThrowOnError(
          api_.KernelInfoGetAttributeArray_int64(info, "splits", splits_.data(), &n));
    }
    st = api_.KernelInfoGetAttribute_int64(info, "levels", &levels_);
    if (st != nullptr) api_.ReleaseStatus(st);  // absent: int8 activations
    if (levels_ < 1 || levels_ > 32767)
      ORT_CXX_API_THROW("RowQuantMatMul: levels must be in 1..32767", ORT_INVALID_ARGUMENT);
    isa_ = ActiveIsa();
    layout_ = isa_ == Isa::kScalar ? Layout::kInt16 : LayoutFor(isa_, levels_);
    tiles_ = MakeTiles(isa_, layout_);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto x = ctx.GetInput(0), w = ctx.GetInput(1), sw = ctx.GetInput(2), wsum = ctx.GetInput(3);
    const std::vector<int64_t> xs = x.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> ws = w.GetTensorTypeAndShapeInfo().GetShape();
    if (xs.empty() || ws.size() != 2) ORT_CXX_API_THROW("RowQuantMatMul: bad ranks", ORT_FAIL);
    const int64_t k = xs.back(), n = ws[0], kp = ws[1];
    if (kp % kPad != 0 || kp < k || kp - k >= kPad)
      ORT_CXX_API_THROW("RowQuantMatMul: W's K is not X's K padded to 64", ORT_FAIL);
    if (levels_ * 127 * kp >= (int64_t{1} << 31))
      ORT_CXX_API_THROW("RowQuantMatMul: levels x 127 x K could overflow int32", ORT_FAIL);
    std::vector<int64_t> splits = splits_.empty() ? std::vector<int64_t>{n} : splits_;
    int64_t total = 0;
    for (int64_t s : splits) total += s;
    if (total != n || ctx.GetOutputCount() != splits.size())
      ORT_CXX_API_THROW("RowQuantMatMul: splits do not cover W's rows", ORT_FAIL);
    int64_t m = 1;
    for (size_t i = 0; i + 1 < xs.size(); ++i) m *= xs[i];

    Job job;
    job.tiles = &tiles_;
    job.offset = layout_ == Layout::kUint8;
    job.m = m;
    job.kp = kp;
    job.w = w.GetTensorData<int8_t>();
    job.sw = sw.GetTensorData<float>();
    job.wsum = wsum.GetTensorData<int32_t>();
    // scratch per calling thread: a session may run on several threads at once
    thread_local std::vector<uint8_t> q;
    thread_local std::vector<float> sx;
    thread_local std::vector<float*> ys;
    ys.resize(splits.size());
    std::vector<int64_t> shape(xs.begin(), xs.end());
    for (size_t o = 0; o < splits.size(); ++o) {
      shape.back() = splits[o];
      ys[o] = ctx.GetOutput(o, shape).GetTensorMutableData<float>();
    }
    job.y = ys.data();
    job.blocks = &BlocksFor(splits);
    if (m == 0) return;

    job.row_bytes = static_cast<size_t>(kp) * ElementBytes(layout_);
    q.resize(static_cast<size_t>(m) * job.row_bytes);
    sx.resize(static_cast<size_t>(m));
    const float* xd = x.GetTensorData<float>();
    const QuantizeFn quantize = isa_ == Isa::kScalar ? QuantizeRowScalar : QuantizeRowAvx2;
    for (int64_t r = 0; r < m; ++r) {
      quantize(xd + r * k, k, kp, static_cast<float>(levels_), layout_,
               q.data() + r * job.row_bytes, &sx[r]);
    }
    job.q = q.data();
    job.sx = sx.data();
    Ort::ThrowOnError(
        api_.KernelContext_ParallelFor(context, RunBlock, job.blocks->size(), 0, &job));
  }

 private:
  // The node's column blocks: its weights (and so its splits) never change, so they are laid
  // out on the first call and reused by every later one.
  const std::vector<Job::Block>& BlocksFor(const std::vector<int64_t>& splits) {
    std::call_once(blocks_once_, [&] {
      int64_t first = 0;
      for (size_t o = 0; o < splits.size(); ++o) {
        for (int64_t c = 0; c < splits[o]; c += kBlockCols)
          blocks_.push_back({static_cast<int64_t>(o), splits[o], first + c,
                             std::min(kBlockCols, splits[o] - c), first});
        first += splits[o];
      }
    });
    return blocks_;
  }

  const OrtApi& api_;
  std::vector<int64_t> splits_;
  int64_t levels_ = 127;  // the activations' largest quantized magnitude
  Isa isa_;
  Layout layout_;
  Tiles tiles_;
  std::once_flag blocks_once_;
  std::vector<Job::Block> blocks_;
};

struct RowQuantOp : Ort::CustomOpBase<RowQuantOp, RowQuantKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const {
    return new RowQuantKernel(api, info);
  }
  const char* GetName() const { return "RowQuantMatMul"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case 0: case 2: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      case 1: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    }
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const {
    return OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_VARIADIC;
  }
  int GetVariadicOutputMinArity() const { return 1; }
  bool GetVariadicOutputHomogeneity() const { return true; }
};

}  // namespace

OrtCustomOp* GreenrouteAttentionOp();  // kernels/attention.cc

extern "C" {

// Which path this process runs ("avx2", "avxvnni", "avx512vnni" or "scalar").
__attribute__((visibility("default"))) const char* greenroute_kernel_isa() {
  return IsaName(ActiveIsa());
}

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // an onnxruntime older than our headers
    const OrtApi* old = api_base->GetApi(1);
    return old->CreateStatus(ORT_FAIL, "greenroute kernels need onnxruntime API 21 or newer");
  }
  Ort::InitApi(api);
  static RowQuantOp op;
  static std::once_flag once;
  static Ort::CustomOpDomain* domain = nullptr;
  std::call_once(once, [] {
    domain = new Ort::CustomOpDomain("greenroute");
    domain->Add(&op);
    domain->Add(GreenrouteAttentionOp());
  });
  return api->AddCustomOpDomain(options, *domain);
}

}  // extern "C"
