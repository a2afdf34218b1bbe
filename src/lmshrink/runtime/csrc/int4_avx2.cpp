// lmshrink: y = x @ W.T for 4-bit grouped weights, fp32 activations, AVX2 + FMA (built by cpu_kernels.py).
//
// Weight layout (packed by lmshrink.runtime.cpu_kernels.pack_codes):
//   codes   int16 [N, B * 8], B = ceil(K / 32) blocks of 32 columns per row. Word l (0..7) of block b holds the codes
//           of columns 32b + 8i + l in its bits 4i..4i+3 (i = 0..3); columns past K hold code 0.
//   scales  float32 or float16 [N, G] and zeros uint8 [N, G]: group g covers blocks [g * bpg, (g + 1) * bpg)
//           (the last one may be shorter). W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g].
// Per row n: y = sum_g scale_g * (sum_{k in g} q_k x_k) - sum_g scale_g * zero_g * (sum_{k in g} x_k).
// A block is widened to 8 lanes of 32 bits; code i of every lane is (lane & (15 << 4i)) = q * 16^i, an exact float,
// so the activations are stored pre-multiplied by 16^-i (exact powers of two) instead of shifting the codes.
// Everything is accumulated in float32 with FMA; only the summation order differs from a dense fp32 matmul.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// group scales are float32, or float16 (IEEE half, widened by F16C) when they are exactly representable
inline float scale_at(const float* s, int64_t g) { return s[g]; }
inline float scale_at(const uint16_t* s, int64_t g) { return _cvtsh_ss(s[g]); }
inline __m256 scale8(const float* s) { return _mm256_loadu_ps(s); }
inline __m256 scale8(const uint16_t* s) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
}

struct Args {
  const uint16_t* codes;  // [N, B * 8]
  const void* scales;     // [N, G] float32, or float16 when half
  const uint8_t* zeros;   // [N, G]
  const float* xp;        // [M, B * 32] activations, pre-scaled per code position, zero past K (float32 kernel)
  const int8_t* xq;       // [M, B * 32] activations rounded to int8, in the unpack order (int8 kernel, below)
  const float* xd;        // [M, B] their block scales (int8 kernel)
  const float* xg;        // [M, G8] activation sums per group, zero past G
  const float* bias;      // [N] or null
  float* y;               // [M, N]
  int64_t n_out, blocks, groups, groups8, bpg;
  bool half;
};

// Row n of y for MR rows of x: sum_g scale_g * (group sums in tot) - the zero-point term (from the per-group
// activation sums, eight groups at a time, then the rest) + bias.
template <int MR, typename S>
inline void finish_rows(const Args& a, const S* s, const uint8_t* z, const float* const* xgrow, const __m256* tot,
                        int64_t m0, int64_t n) {
  __m256 zt[MR];
  for (int m = 0; m < MR; ++m) zt[m] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= a.groups; g += 8) {
    const __m128i zb = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + g));
    const __m256 sz = _mm256_mul_ps(scale8(s + g), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(zb)));
    for (int m = 0; m < MR; ++m) zt[m] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xgrow[m] + g), zt[m]);
  }
  float zr[MR] = {};
  for (; g < a.groups; ++g) {
    const float sz = scale_at(s, g) * static_cast<float>(z[g]);
    for (int m = 0; m < MR; ++m) zr[m] += sz * xgrow[m][g];
  }
  const float bn = a.bias ? a.bias[n] : 0.0f;
  for (int m = 0; m < MR; ++m) a.y[(m0 + m) * a.n_out + n] = (hsum(tot[m]) - (hsum(zt[m]) + zr[m])) + bn;
}

// MR rows of x (1..4) against output rows [n0, n1); S: the scales' type.
template <int MR, typename S>
void rows_kernel(const Args& a, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NA = MR <= 2 ? 2 : 1;  // partial sums per x row (shorter FMA chains when few rows)
  const __m256i mask0 = _mm256_set1_epi32(0x000F), mask1 = _mm256_set1_epi32(0x00F0),
                mask2 = _mm256_set1_epi32(0x0F00), mask3 = _mm256_set1_epi32(0xF000);
  const int64_t xstride = a.blocks * 32;
  const float* xrow[MR];
  const float* xgrow[MR];
  for (int m = 0; m < MR; ++m) {
    xrow[m] = a.xp + (m0 + m) * xstride;
    xgrow[m] = a.xg + (m0 + m) * a.groups8;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* c = a.codes + n * a.blocks * 8;
    const S* s = static_cast<const S*>(a.scales) + n * a.groups;
    const uint8_t* z = a.zeros + n * a.groups;
    __m256 tot[MR];
    for (int m = 0; m < MR; ++m) tot[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < a.groups; ++g) {
      const int64_t b0 = g * a.bpg, b1 = std::min(b0 + a.bpg, a.blocks);
      __m256 acc[MR][NA];
      for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NA; ++j) acc[m][j] = _mm256_setzero_ps();
      for (int64_t b = b0; b < b1; ++b) {
        const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + b * 8)));
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask0));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask1));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask2));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask3));
        for (int m = 0; m < MR; ++m) {
          const float* xb = xrow[m] + b * 32;
          acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[m][0]);
          acc[m][NA - 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), acc[m][NA - 1]);
          acc[m][0] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), acc[m][0]);
          acc[m][NA - 1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), acc[m][NA - 1]);
        }
      }
      const __m256 sv = _mm256_set1_ps(scale_at(s, g));
      for (int m = 0; m < MR; ++m) {
        const __m256 sum = NA == 2 ? _mm256_add_ps(acc[m][0], acc[m][NA - 1]) : acc[m][0];
        tot[m] = _mm256_fmadd_ps(sv, sum, tot[m]);
      }
    }
    finish_rows<MR, S>(a, s, z, xgrow, tot, m0, n);
  }
}

// The int8-activation kernel (see int4_linear_q8 below for the rounding and the activation layout).
template <int MR, typename S>
void rows_kernel_q8(const Args& a, int64_t m0, int64_t n0, int64_t n1) {
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xrow[MR];
  const float* drow[MR];
  const float* xgrow[MR];
  for (int m = 0; m < MR; ++m) {
    xrow[m] = a.xq + (m0 + m) * a.blocks * 32;
    drow[m] = a.xd + (m0 + m) * a.blocks;
    xgrow[m] = a.xg + (m0 + m) * a.groups8;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* c = a.codes + n * a.blocks * 8;
    const S* s = static_cast<const S*>(a.scales) + n * a.groups;
    const uint8_t* z = a.zeros + n * a.groups;
    __m256 tot[MR];
    for (int m = 0; m < MR; ++m) tot[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < a.groups; ++g) {
      const int64_t b0 = g * a.bpg, b1 = std::min(b0 + a.bpg, a.blocks);
      __m256 acc[MR];
      for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t b = b0; b < b1; ++b) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + b * 8));
        const __m256i w = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(v, nib)),
                                                  _mm_and_si128(_mm_srli_epi16(v, 4), nib), 1);
        for (int m = 0; m < MR; ++m) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xrow[m] + b * 32));
          const __m256i sum = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_broadcast_ss(drow[m] + b), acc[m]);
        }
      }
      const __m256 sv = _mm256_set1_ps(scale_at(s, g));
      for (int m = 0; m < MR; ++m) tot[m] = _mm256_fmadd_ps(sv, acc[m], tot[m]);
    }
    finish_rows<MR, S>(a, s, z, xgrow, tot, m0, n);
  }
}

template <typename S, bool Q8, int MR>
inline void rows(const Args& a, int64_t m0, int64_t n0, int64_t n1) {
  if constexpr (Q8) rows_kernel_q8<MR, S>(a, m0, n0, n1);
  else rows_kernel<MR, S>(a, m0, n0, n1);
}

template <typename S, bool Q8>
void run_rows_as(const Args& a, int64_t m0, int64_t mr, int64_t n0, int64_t n1) {
  switch (mr) {
    case 1: rows<S, Q8, 1>(a, m0, n0, n1); break;
    case 2: rows<S, Q8, 2>(a, m0, n0, n1); break;
    case 3: rows<S, Q8, 3>(a, m0, n0, n1); break;
    default: rows<S, Q8, 4>(a, m0, n0, n1); break;
  }
}

// MR = mr (1..4) rows of x from m0 against output rows [n0, n1): float32 (q8 false) or int8 activations
void run_rows(const Args& a, int64_t m0, int64_t mr, int64_t n0, int64_t n1, bool q8) {
  if (a.half) {
    if (q8) run_rows_as<uint16_t, true>(a, m0, mr, n0, n1);
    else run_rows_as<uint16_t, false>(a, m0, mr, n0, n1);
  } else {
    if (q8) run_rows_as<float, true>(a, m0, mr, n0, n1);
    else run_rows_as<float, false>(a, m0, mr, n0, n1);
  }
}

bool check_scales(const torch::Tensor& scales, int64_t N, int64_t groups) {
  TORCH_CHECK(scales.dim() == 2 && (scales.scalar_type() == torch::kFloat32 ||
                                    scales.scalar_type() == torch::kFloat16) &&
                  scales.is_contiguous() && scales.size(0) == N && scales.size(1) == groups && groups > 0,
              "int4 kernel: scales must be contiguous float32 or float16 [N, groups]");
  return scales.scalar_type() == torch::kFloat16;
}

struct Shape {
  int64_t K, M, N, B, G8;
  bool half, has_bias;
};

// The checks both int4 kernels make on their arguments (error messages start with ``name``).
Shape check_linear(const char* name, const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                   const torch::Tensor& zeros, const torch::Tensor& bias, int64_t groups, int64_t blocks_per_group) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              name, ": x must be a float32 CPU tensor");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt16 && codes.is_contiguous(),
              name, ": codes must be contiguous int16 [N, blocks*8]");
  const int64_t K = x.size(-1), M = K > 0 ? x.numel() / K : 0, N = codes.size(0);
  TORCH_CHECK(codes.size(1) % 8 == 0, name, ": codes width must be a multiple of 8");
  const int64_t B = codes.size(1) / 8;
  TORCH_CHECK(K <= B * 32 && K > (B - 1) * 32, name, ": x has ", K, " columns, the codes hold ", B * 32);
  const bool half = check_scales(scales, N, groups);
  TORCH_CHECK(zeros.dim() == 2 && zeros.scalar_type() == torch::kUInt8 && zeros.is_contiguous() &&
                  zeros.size(0) == N && zeros.size(1) == groups,
              name, ": zeros must be contiguous uint8 [N, groups]");
  TORCH_CHECK(blocks_per_group > 0 && groups * blocks_per_group >= B && (groups - 1) * blocks_per_group < B,
              name, ": ", groups, " groups of ", blocks_per_group, " blocks do not cover ", B, " blocks");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == torch::kFloat32 && bias.is_contiguous() && bias.numel() == N),
              name, ": bias must be contiguous float32 [N]");
  return Shape{K, M, N, B, (groups + 7) / 8 * 8, half, has_bias};
}

// y [..., N] from prepared activations: xp (float32 kernel) or xq + xd (int8 kernel), and the group sums xg.
torch::Tensor launch(const Shape& sh, const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                     const torch::Tensor& zeros, const torch::Tensor& bias, int64_t groups, int64_t blocks_per_group,
                     const float* xp, const int8_t* xq, const float* xd, const float* xg) {
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = sh.N;
  auto y = torch::empty(out_shape, x.options());
  Args a{reinterpret_cast<const uint16_t*>(codes.data_ptr<int16_t>()), scales.data_ptr(), zeros.data_ptr<uint8_t>(),
         xp, xq, xd, xg, sh.has_bias ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), sh.N, sh.B, groups,
         sh.G8, blocks_per_group, sh.half};
  const bool q8 = xq != nullptr;
  // rows of W in chunks worth at least ~64K weights each
  const int64_t grain = std::max<int64_t>(8, (int64_t{1} << 16) / (sh.B * 32));
  at::parallel_for(0, sh.N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < sh.M; m0 += 4) run_rows(a, m0, std::min<int64_t>(4, sh.M - m0), n0, n1, q8);
  });
  return y;
}

}  // namespace

// x [..., K] float32; codes int16 [N, B*8]; scales float32 or float16 [N, G]; zeros uint8 [N, G]; bias float32 [N]
// or empty.
// Returns [..., N] float32.
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros,
                          torch::Tensor bias, int64_t groups, int64_t blocks_per_group) {
  const Shape sh = check_linear("int4_linear", x, codes, scales, zeros, bias, groups, blocks_per_group);
  const int64_t K = sh.K, M = sh.M, B = sh.B, G8 = sh.G8;

  // activations: pre-scaled copy (x * 16^-i for code position i of a block, zero past K) and per-group sums, in
  // buffers this thread keeps between calls
  auto xc = x.contiguous();
  thread_local std::vector<float> xp_buf, xg_buf;
  xp_buf.assign(static_cast<size_t>(M * B * 32), 0.0f);
  xg_buf.assign(static_cast<size_t>(M * G8), 0.0f);
  {
    const float* src = xc.data_ptr<float>();
    float* dst = xp_buf.data();
    float* gs = xg_buf.data();
    static const float pos_scale[4] = {1.0f, 1.0f / 16, 1.0f / 256, 1.0f / 4096};
    const int64_t gw = blocks_per_group * 32;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = src + m * K;
      float* pr = dst + m * B * 32;
      float* gr = gs + m * G8;
      for (int64_t k = 0; k < K; ++k) {
        pr[k] = xr[k] * pos_scale[(k >> 3) & 3];
        gr[k / gw] += xr[k];
      }
    }
  }
  return launch(sh, x, codes, scales, zeros, bias, groups, blocks_per_group, xp_buf.data(), nullptr, nullptr,
                xg_buf.data());
}

// The float32 weight [N, K] = (q - zero) * scale of the same layout (a subtraction, then a product, as
// lmshrink.quant.grids.dequantize computes it: bit for bit the same values).
torch::Tensor int4_dequantize(torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros, int64_t K,
                              int64_t groups, int64_t blocks_per_group) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt16 && codes.is_contiguous() &&
                  codes.size(1) % 8 == 0,
              "int4_dequantize: codes must be contiguous int16 [N, blocks*8]");
  const int64_t N = codes.size(0), B = codes.size(1) / 8;
  TORCH_CHECK(K <= B * 32 && K > (B - 1) * 32, "int4_dequantize: ", K, " columns, the codes hold ", B * 32);
  const bool half = check_scales(scales, N, groups);
  TORCH_CHECK(zeros.scalar_type() == torch::kUInt8 && zeros.is_contiguous() && zeros.size(0) == N &&
                  zeros.size(1) == groups,
              "int4_dequantize: zeros must be contiguous uint8 [N, groups]");
  TORCH_CHECK(blocks_per_group > 0 && groups * blocks_per_group >= B && (groups - 1) * blocks_per_group < B,
              "int4_dequantize: ", groups, " groups of ", blocks_per_group, " blocks do not cover ", B, " blocks");
  auto out = torch::empty({N, K}, scales.options().dtype(torch::kFloat32));
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(codes.data_ptr<int16_t>());
  const float* sp = half ? nullptr : scales.data_ptr<float>();
  const uint16_t* hp = half ? reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()) : nullptr;
  const uint8_t* zp = zeros.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t full = K / 32;  // blocks entirely inside K
  const __m256i mask = _mm256_set1_epi32(15);
  at::parallel_for(0, N, std::max<int64_t>(1, (int64_t{1} << 16) / (B * 32)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* c = cp + n * B * 8;
      float* o = op + n * K;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t g = b / blocks_per_group;
        const float sc = half ? _cvtsh_ss(hp[n * groups + g]) : sp[n * groups + g];
        const float zf = static_cast<float>(zp[n * groups + g]);
        if (b < full) {
          const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + b * 8)));
          const __m256 sv = _mm256_set1_ps(sc), zv = _mm256_set1_ps(zf);
          for (int i = 0; i < 4; ++i) {
            const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4 * i), mask));
            _mm256_storeu_ps(o + b * 32 + 8 * i, _mm256_mul_ps(_mm256_sub_ps(q, zv), sv));
          }
        } else {
          for (int64_t k = b * 32; k < K; ++k) {
            const int64_t j = k - b * 32;
            const int q = (c[b * 8 + (j & 7)] >> (4 * (j >> 3))) & 15;
            o[k] = (static_cast<float>(q) - zf) * sc;
          }
        }
      }
    }
  });
  return out;
}

// ---- int8 activations (the llama.cpp q8_0 scheme) ------------------------------------------------------------
// Each row of x is rounded per block of 32 columns to int8 with one float32 scale (d = max|x| / 127, round to nearest
// even): x^ = d * xq. A block's 32 codes (u8, 0..15) and its 32 xq (s8) meet in one maddubs + madd (16-bit pair sums
// are at most 2 * 15 * 127, no saturation), and the block's 8 int32 lane sums are converted once and scaled by d.
// The result is exactly x^ @ W.T up to float32 summation order, with the zero-point term taken from x^ too.
// The codes keep int4_linear's layout; the activations are stored in the byte order that layout unpacks to:
// (v & 0x0F0F) gives, per 16-bit word l, columns l and 16 + l; ((v >> 4) & 0x0F0F) columns 8 + l and 24 + l.
// (The kernel itself, rows_kernel_q8, sits beside int4_linear's above.)

namespace {

// byte position p (0..31) of an unpacked block -> its column within the block
inline int q8_column(int p) {
  const int half = p >> 4, r = p & 15;
  return (r >> 1) + 8 * (half + 2 * (r & 1));
}

}  // namespace

// As int4_linear, with x rounded to int8 per block of 32 columns (see above). Returns [..., N] float32.
torch::Tensor int4_linear_q8(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros,
                             torch::Tensor bias, int64_t groups, int64_t blocks_per_group) {
  const Shape sh = check_linear("int4_linear_q8", x, codes, scales, zeros, bias, groups, blocks_per_group);
  const int64_t K = sh.K, M = sh.M, B = sh.B, G8 = sh.G8;
  auto xc = x.contiguous();
  thread_local std::vector<int8_t> xq_buf;
  thread_local std::vector<float> xd_buf, xg_buf;
  xq_buf.assign(static_cast<size_t>(M * B * 32), 0);
  xd_buf.assign(static_cast<size_t>(M * B), 0.0f);
  xg_buf.assign(static_cast<size_t>(M * G8), 0.0f);
  {
    const float* src = xc.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = src + m * K;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t k0 = b * 32, width = std::min<int64_t>(32, K - k0);
        float amax = 0.0f;
        for (int64_t j = 0; j < width; ++j) amax = std::max(amax, std::fabs(xr[k0 + j]));
        const float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int8_t* qb = xq_buf.data() + (m * B + b) * 32;
        int sum = 0;
        for (int p = 0; p < 32; ++p) {
          const int j = q8_column(p);
          const int q = j < width ? static_cast<int>(std::nearbyint(xr[k0 + j] * id)) : 0;
          qb[p] = static_cast<int8_t>(q);
          sum += q;
        }
        xd_buf[m * B + b] = d;
        xg_buf[m * G8 + b / blocks_per_group] += d * static_cast<float>(sum);
      }
    }
  }
  return launch(sh, x, codes, scales, zeros, bias, groups, blocks_per_group, nullptr, xq_buf.data(), xd_buf.data(),
                xg_buf.data());
}

// y = x^ @ W^.T for a weight stored as q8_0 blocks (int8 codes [N, B * 32], zero past K, and one float32 scale per
// row and block [N, B]: W^ = d_w * q) and x rounded the same way per block of 32 (x^ = d_x * xq, as int4_linear_q8
// rounds it). Products of two signed bytes through maddubs(|q|, sign(xq, q)) (pair sums at most 2 * 127 * 127).
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "q8_linear: x must be a float32 CPU tensor");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8 && codes.is_contiguous() &&
                  codes.size(1) % 32 == 0,
              "q8_linear: codes must be contiguous int8 [N, blocks*32]");
  const int64_t K = x.size(-1), M = K > 0 ? x.numel() / K : 0, N = codes.size(0), B = codes.size(1) / 32;
  TORCH_CHECK(K <= B * 32 && K > (B - 1) * 32, "q8_linear: x has ", K, " columns, the codes hold ", B * 32);
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() &&
                  scales.size(0) == N && scales.size(1) == B,
              "q8_linear: scales must be contiguous float32 [N, blocks]");
  auto xc = x.contiguous();
  std::vector<int8_t> xq(static_cast<size_t>(M * B * 32), 0);
  std::vector<float> xd(static_cast<size_t>(M * B), 0.0f);
  const float* src = xc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < B; ++b) {
      const float* xr = src + m * K + b * 32;
      const int64_t width = std::min<int64_t>(32, K - b * 32);
      float amax = 0.0f;
      for (int64_t j = 0; j < width; ++j) amax = std::max(amax, std::fabs(xr[j]));
      const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
      for (int64_t j = 0; j < width; ++j)
        xq[(m * B + b) * 32 + j] = static_cast<int8_t>(static_cast<int>(std::nearbyint(xr[j] * id)));
      xd[m * B + b] = amax / 127.0f;
    }
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  auto y = torch::empty(out_shape, x.options());
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const __m256i ones = _mm256_set1_epi16(1);
  at::parallel_for(0, N, std::max<int64_t>(8, (int64_t{1} << 16) / (B * 32)), [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xr = xq.data() + m * B * 32;
      const float* dr = xd.data() + m * B;
      for (int64_t n = n0; n < n1; ++n) {
        const int8_t* c = cp + n * B * 32;
        const float* s = sp + n * B;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t b = 0; b < B; ++b) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + b * 32));
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + b * 32));
          const __m256i prod = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
          const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod, ones));
          acc = _mm256_fmadd_ps(sum, _mm256_set1_ps(s[b] * dr[b]), acc);
        }
        yp[m * N + n] = hsum(acc);
      }
    }
  });
  return y;
}

// int8_avx2.cpp
std::vector<torch::Tensor> quantize_rows_u8(torch::Tensor x, double static_scale, double clip_ratio);
torch::Tensor i8_linear(torch::Tensor u, torch::Tensor scales, torch::Tensor q, torch::Tensor t, torch::Tensor qsum,
                        torch::Tensor bias, bool seven);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_linear", &int4_linear, "y = x @ W.T for lmshrink's 4-bit AVX2 layout (see int4_avx2.cpp)");
  m.def("int4_dequantize", &int4_dequantize, "the float32 weight (q - zero) * scale of that layout");
  m.def("int4_linear_q8", &int4_linear_q8, "int4_linear with activations rounded to int8 per block of 32 (q8_0)");
  m.def("q8_linear", &q8_linear, "y = x^ @ W^.T for q8_0 weight blocks and x rounded to int8 per block of 32");
  m.def("quantize_rows_u8", &quantize_rows_u8, "symmetric int8 activation codes + 128, per row or one scale");
  m.def("i8_linear", &i8_linear, "y = x^ @ W^.T for int8 activation codes + 128 and int8 weights per row");
}
