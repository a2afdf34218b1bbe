// lmshrink: W8A8 products with integer arithmetic, AVX2 (built with int4_avx2.cpp by cpu_kernels.py).
//
// Activations: symmetric int8 codes c in [-128, 127] stored as unsigned u = c + 128, one float32 scale per row
// (per token, measured on the row) or one for the whole input (static), rounded exactly as
// lmshrink.core.actquant.fake_quantize_activations rounds: scale = 2 * max|x| / 255, c = clamp(round(x / scale)) with
// ties to even. Rows are padded to a multiple of 32 columns with u = 128 (c = 0).
// Weights: int8 codes q [N, Kp] (zero past K), one float32 scale t per row, and the row sums of q.
// y[m, n] = (sum_k u q - 128 * sum_k q) * t[n] * s[m] + bias[n]: the integer sum is exact, so y differs from a
// float matmul of the dequantized operands only by the float rounding of the final products.
// Two ways to the integer sum: `seven` (every |q| <= 64): maddubs(u, q) pairs stay within int16
// (2 * 255 * 64 < 32768), one instruction per 32 products; otherwise both are widened to int16 and multiplied by
// madd (exact for any int8 codes, about half as fast).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

inline __m256i dot32(__m256i u, __m256i q, bool seven, __m256i ones) {
  if (seven) return _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), ones);
  const __m256i ulo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(u));
  const __m256i uhi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(u, 1));
  const __m256i qlo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
  const __m256i qhi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1));
  return _mm256_add_epi32(_mm256_madd_epi16(ulo, qlo), _mm256_madd_epi16(uhi, qhi));
}

}  // namespace

// x float32 [..., K] -> (u uint8 [M, Kp], scales float32 [M]); static_scale > 0: that scale for every row.
std::vector<torch::Tensor> quantize_rows_u8(torch::Tensor x, double static_scale, double clip_ratio) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.device().is_cpu() && x.dim() >= 1,
              "quantize_rows_u8: x must be a float32 CPU tensor");
  auto xc = x.contiguous();
  const int64_t K = x.size(-1), M = K > 0 ? x.numel() / K : 0, Kp = (K + 31) / 32 * 32;
  auto codes = torch::full({M, Kp}, 128, torch::dtype(torch::kUInt8));
  auto scales = torch::empty({M}, torch::dtype(torch::kFloat32));
  const float* src = xc.data_ptr<float>();
  uint8_t* dst = codes.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  const float clip = static_cast<float>(clip_ratio);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = src + m * K;
      float scale = static_cast<float>(static_scale);
      if (!(static_scale > 0.0)) {
        __m256 vmax = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + k)));
        float lanes[8];
        _mm256_storeu_ps(lanes, vmax);
        float amax = 0.0f;
        for (float v : lanes) amax = std::max(amax, v);
        for (; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
        amax = amax * clip;
        scale = 2.0f * amax / 255.0f;
        if (!(scale > 0.0f)) scale = 1.0f;
      }
      sp[m] = scale;
      uint8_t* out = dst + m * Kp;
      const __m256 vs = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) {
        __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xr + k), vs),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
        alignas(32) int32_t v[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(v), _mm256_cvtps_epi32(q));
        for (int j = 0; j < 8; ++j) out[k + j] = static_cast<uint8_t>(v[j] + 128);
      }
      for (; k < K; ++k) {
        float q = std::nearbyint(xr[k] / scale);
        q = std::min(std::max(q, -128.0f), 127.0f);
        out[k] = static_cast<uint8_t>(static_cast<int>(q) + 128);
      }
    }
  });
  return {codes, scales};
}

// y float32 [M, N] (see the header); u [M, Kp], q [N, Kp], scales [M], t [N], qsum int32 [N], bias [N] or empty.
torch::Tensor i8_linear(torch::Tensor u, torch::Tensor scales, torch::Tensor q, torch::Tensor t, torch::Tensor qsum,
                        torch::Tensor bias, bool seven) {
  TORCH_CHECK(u.dim() == 2 && u.scalar_type() == torch::kUInt8 && u.is_contiguous() && u.size(1) % 32 == 0,
              "i8_linear: u must be contiguous uint8 [M, Kp], Kp a multiple of 32");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.is_contiguous() && q.size(1) == u.size(1),
              "i8_linear: q must be contiguous int8 [N, Kp] with u's Kp");
  const int64_t M = u.size(0), Kp = u.size(1), N = q.size(0), B = Kp / 32;
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.numel() == M, "i8_linear: scales [M] float32");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.numel() == N && t.is_contiguous(), "i8_linear: t [N] float32");
  TORCH_CHECK(qsum.scalar_type() == torch::kInt32 && qsum.numel() == N && qsum.is_contiguous(),
              "i8_linear: qsum [N] int32");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == torch::kFloat32 && bias.numel() == N && bias.is_contiguous()),
              "i8_linear: bias [N] float32 or empty");
  auto sc = scales.contiguous();
  auto y = torch::empty({M, N}, torch::dtype(torch::kFloat32));
  const uint8_t* up = u.data_ptr<uint8_t>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  const int32_t* qs = qsum.data_ptr<int32_t>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const __m256i ones = _mm256_set1_epi16(1);
  at::parallel_for(0, N, std::max<int64_t>(16, (int64_t{1} << 15) / std::max<int64_t>(Kp, 1)),
                   [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* ur = up + m * Kp;
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) {  // four weight rows share each load of the activations
        __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256()};
        for (int64_t b = 0; b < B; ++b) {
          const __m256i uv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ur + b * 32));
          for (int r = 0; r < 4; ++r) {
            const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + (n + r) * Kp + b * 32));
            acc[r] = _mm256_add_epi32(acc[r], dot32(uv, qv, seven, ones));
          }
        }
        for (int r = 0; r < 4; ++r) {
          const int64_t dot = static_cast<int64_t>(hsum_i32(acc[r])) - 128 * static_cast<int64_t>(qs[n + r]);
          float v = static_cast<float>(dot) * tp[n + r] * sp[m];
          yp[m * N + n + r] = has_bias ? v + bp[n + r] : v;
        }
      }
      for (; n < n1; ++n) {
        __m256i acc = _mm256_setzero_si256();
        for (int64_t b = 0; b < B; ++b) {
          const __m256i uv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ur + b * 32));
          const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + n * Kp + b * 32));
          acc = _mm256_add_epi32(acc, dot32(uv, qv, seven, ones));
        }
        const int64_t dot = static_cast<int64_t>(hsum_i32(acc)) - 128 * static_cast<int64_t>(qs[n]);
        float v = static_cast<float>(dot) * tp[n] * sp[m];
        yp[m * N + n] = has_bias ? v + bp[n] : v;
      }
    }
  });
  return y;
}
