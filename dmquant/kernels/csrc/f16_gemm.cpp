// W4A16 GEMM on AVX512-FP16:
//   y[m, n] = row[m] * col[n] * sum_k a[m, k] * w[n, k] + bias[n],   w[n, k] = (q[n, k] - z[g, n]) * s[g, n]
// a: fp16 activations scaled per row by a power of two (`row`) so |a| <= 1; q: 4-bit codes (0..15) held
// as nibbles; s, z: each group's fp16 scale (divided by the column's power of two `col`, so |w| <= 1)
// and zero point. The products run on vfmadd231ph, 32 lanes a zmm (twice fp32's), summed in fp16 over
// kFlush input pairs at most and then added into fp32: with |a|, |w| <= 1 a partial sum stays below 32,
// where fp16's spacing is 2^-6 at worst. Layouts work in input pairs: a zmm of weights holds 16 columns x
// 2 consecutive inputs, so one 32-bit broadcast of two activations feeds it; the two inputs of a column
// stay in neighbouring lanes until the epilogue adds them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kPanel = 64;   // output columns a panel: 4 zmm of 16 columns x 2 inputs
constexpr int64_t kPairs = 128;  // fp16 values of one input pair of a panel
constexpr int64_t kFlush = 32;   // input pairs summed in fp16 before they join the fp32 sum
constexpr int kRows = 6;         // 6 rows x 4 zmm = 24 fp16 accumulators

// e with big = f 2^e, f in [0.5, 1), kept within [-125, 127] so that 2^e and 2^-e are finite floats
// (a row of denormals then keeps values below 1, a row near FLT_MAX values below 2: both safe in fp16)
inline int scale_exponent(float big) {
  int e = 0;
  std::frexp(big, &e);
  return std::max(-125, std::min(e, 127));
}

// One panel's codes (pairs, 64 bytes: low nibbles the first 64 values of the pair, high nibbles the
// next 64) -> fp16 weights (pairs, 128) = (q - z) * s, with the group's 128 lanes of s and z.
void decode_panel(const uint8_t* src, int64_t pairs, const at::Half* s, const at::Half* z, int64_t group_pairs,
                  _Float16* out) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t g = p / group_pairs;
    const __m512i v = _mm512_loadu_si512(src + p * 64);
    const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    const __m512i parts[4] = {_mm512_cvtepu8_epi16(_mm512_castsi512_si256(lo)),
                              _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(lo, 1)),
                              _mm512_cvtepu8_epi16(_mm512_castsi512_si256(hi)),
                              _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(hi, 1))};
    for (int j = 0; j < 4; ++j) {
      const __m512h zj = _mm512_castsi512_ph(_mm512_loadu_si512(z + g * kPairs + j * 32));
      const __m512h sj = _mm512_castsi512_ph(_mm512_loadu_si512(s + g * kPairs + j * 32));
      const __m512h w = _mm512_mul_ph(_mm512_sub_ph(_mm512_cvtepu16_ph(parts[j]), zj), sj);
      _mm512_storeu_ph(out + p * kPairs + j * 32, w);
    }
  }
}

// MR rows x one panel over all pairs -> y (row stride ldy), the epilogue applied.
template <int MR>
void tile(const at::Half* a, int64_t lda, const _Float16* b, int64_t pairs, const float* row, const float* col,
          const float* bias, float* y, int64_t ldy) {
  alignas(64) float acc[MR][kPairs];
  std::memset(acc, 0, sizeof(acc));
  for (int64_t p0 = 0; p0 < pairs; p0 += kFlush) {
    __m512h c[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 4; ++j) c[r][j] = _mm512_setzero_ph();
    const int64_t p1 = std::min(p0 + kFlush, pairs);
    for (int64_t p = p0; p < p1; ++p) {
      const _Float16* bp = b + p * kPairs;
      const __m512h b0 = _mm512_loadu_ph(bp), b1 = _mm512_loadu_ph(bp + 32);
      const __m512h b2 = _mm512_loadu_ph(bp + 64), b3 = _mm512_loadu_ph(bp + 96);
      for (int r = 0; r < MR; ++r) {
        int32_t two;
        std::memcpy(&two, a + r * lda + 2 * p, 4);
        const __m512h x = _mm512_castsi512_ph(_mm512_set1_epi32(two));
        c[r][0] = _mm512_fmadd_ph(x, b0, c[r][0]);
        c[r][1] = _mm512_fmadd_ph(x, b1, c[r][1]);
        c[r][2] = _mm512_fmadd_ph(x, b2, c[r][2]);
        c[r][3] = _mm512_fmadd_ph(x, b3, c[r][3]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 4; ++j) {
        const __m512i h = _mm512_castph_si512(c[r][j]);
        float* t = acc[r] + j * 32;
        _mm512_store_ps(t, _mm512_add_ps(_mm512_load_ps(t), _mm512_cvtph_ps(_mm512_castsi512_si256(h))));
        _mm512_store_ps(t + 16, _mm512_add_ps(_mm512_load_ps(t + 16), _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1))));
      }
  }
  // lanes (2i, 2i + 1) of a 32-float block are one column's two inputs: add them, then scale
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int r = 0; r < MR; ++r) {
    const __m512 rs = _mm512_set1_ps(row[r]);
    for (int j = 0; j < 4; ++j) {
      const __m512 lo = _mm512_load_ps(acc[r] + j * 32), hi = _mm512_load_ps(acc[r] + j * 32 + 16);
      const __m512 sum = _mm512_add_ps(_mm512_permutex2var_ps(lo, even, hi), _mm512_permutex2var_ps(lo, odd, hi));
      const __m512 scaled = _mm512_mul_ps(_mm512_mul_ps(sum, rs), _mm512_loadu_ps(col + j * 16));
      _mm512_storeu_ps(y + r * ldy + j * 16, bias ? _mm512_add_ps(scaled, _mm512_loadu_ps(bias + j * 16)) : scaled);
    }
  }
}

template <int MR>
void rows(const at::Half* a, int64_t lda, int64_t m, const _Float16* b, int64_t pairs, const float* row,
          const float* col, const float* bias, float* y, int64_t ldy) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) tile<MR>(a + i * lda, lda, b, pairs, row + i, col, bias, y + i * ldy, ldy);
  const auto rest = [&](auto t) { t(a + i * lda, lda, b, pairs, row + i, col, bias, y + i * ldy, ldy); };
  switch (m - i) {  // the last 1-5 rows
    case 5: rest(tile<5>); break;
    case 4: rest(tile<4>); break;
    case 3: rest(tile<3>); break;
    case 2: rest(tile<2>); break;
    case 1: rest(tile<1>); break;
    default: break;
  }
}

}  // namespace

// fp32 rows (M, K) -> (fp16 rows (M, K_pad) scaled by 2^-e[m], zero padded; fp32 2^e[m] (M,)), where
// 2^e[m] is the power of two just above the row's largest magnitude (1 for rows of zeros or non-finite).
std::vector<torch::Tensor> half_rows(torch::Tensor x, int64_t k_pad) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 (M, K)");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(k_pad >= K && k_pad % 2 == 0, "k_pad must be even and at least K");
  auto out = torch::zeros({M, k_pad}, x.options().dtype(torch::kFloat16));
  auto row = torch::empty({M}, x.options());
  const float* px = x.data_ptr<float>();
  at::Half* po = out.data_ptr<at::Half>();
  float* pr = row.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = px + m * K;
      __m512 top = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
        top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, xr + k)));
      }
      const float big = _mm512_reduce_max_ps(top);
      int e = 0;
      if (std::isfinite(big) && big > 0) e = scale_exponent(big);
      pr[m] = std::ldexp(1.0f, e);
      const __m512 inv = _mm512_set1_ps(std::ldexp(1.0f, -e));
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
        const __m256i h = _mm512_cvtps_ph(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, xr + k), inv),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_mask_storeu_epi16(po + m * k_pad + k, mask, h);
      }
    }
  });
  return {out, row};
}

// The fp16 activations of a 2-D convolution (zero padding), one row per output pixel m = (n, oy, ox) with
// the inputs k = (c, i, j) of its window (a weight's (C, kh, kw) order): (M, K_pad), each row scaled by the power of two just above its window's largest magnitude (`row`, (M,)). Pixels
// run along a vector, so every load reads consecutive inputs (stride 1) or gathers (larger strides).
std::vector<torch::Tensor> conv_rows(torch::Tensor x, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                                     std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t k_pad) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 4 && x.is_contiguous(), "x: contiguous float32 (N, C, H, W)");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  const int64_t K = C * kh * kw, M = N * OH * OW, HW = H * W;
  TORCH_CHECK(OH > 0 && OW > 0 && k_pad >= K && k_pad % 2 == 0, "empty output, or k_pad odd or below K");
  auto out = torch::empty({M, k_pad}, x.options().dtype(torch::kFloat16));
  auto row = torch::empty({M}, x.options());
  auto inv = torch::empty({M}, x.options());
  auto peak = torch::empty({N, H, W}, x.options());
  const float* px = x.data_ptr<float>();
  float* pp = peak.data_ptr<float>();
  float* pr = row.data_ptr<float>();
  float* pi = inv.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {  // each pixel's largest |x| over the channels
    for (int64_t n = n0; n < n1; ++n) {
      float* pk = pp + n * HW;
      std::fill(pk, pk + HW, 0.0f);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < HW; ++i) pk[i] = std::max(pk[i], std::fabs(px[(n * C + c) * HW + i]));
    }
  });
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {  // ... and over each window
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t n = m / (OH * OW), oy = m / OW % OH, ox = m % OW;
      float big = 0.0f;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t y = oy * sh - ph + i * dh;
        if (y < 0 || y >= H) continue;
        for (int64_t j = 0; j < kw; ++j) {
          const int64_t xx = ox * sw - pw + j * dw;
          if (xx >= 0 && xx < W) big = std::max(big, pp[(n * H + y) * W + xx]);
        }
      }
      int e = 0;
      if (std::isfinite(big) && big > 0) e = scale_exponent(big);
      pr[m] = std::ldexp(1.0f, e);
      pi[m] = std::ldexp(1.0f, -e);
    }
  });
  at::Half* po = out.data_ptr<at::Half>();
  // value of input k at output pixels (n, oy, ox0 .. ox0 + 15), zero outside the image or past K
  const auto load = [&](int64_t k, int64_t n, int64_t oy, int64_t ox0, __mmask16 lanes) -> __m512 {
    if (k >= K) return _mm512_setzero_ps();
    const int64_t c = k / (kh * kw), i = k / kw % kh, j = k % kw;
    const int64_t y = oy * sh - ph + i * dh;
    if (y < 0 || y >= H) return _mm512_setzero_ps();
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i xs = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(ox0 * sw - pw + j * dw)),
                                        _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(sw))));
    const __mmask16 inside = lanes & _mm512_cmpge_epi32_mask(xs, _mm512_setzero_si512()) &
                             _mm512_cmplt_epi32_mask(xs, _mm512_set1_epi32(static_cast<int32_t>(W)));
    const float* base = px + ((n * C + c) * H + y) * W;
    if (sw == 1) return _mm512_maskz_loadu_ps(inside, base + (ox0 - pw + j * dw));
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside, xs, base, 4);
  };
  // 16 pixels a vector, every pair of their windows, each pair scattered to its 16 rows (a rising
  // column of each, so the rows' cache lines fill as the pairs pass)
  const __m512i rows16 = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(static_cast<int32_t>(k_pad / 2)));
  const int64_t blocks = (OW + 15) / 16;
  at::parallel_for(0, N * OH * blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n = blk / (OH * blocks), oy = blk / blocks % OH, ox0 = blk % blocks * 16;
      const __mmask16 lanes = OW - ox0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (OW - ox0)) - 1);
      const int64_t m = (n * OH + oy) * OW + ox0;
      const __m512 s = _mm512_maskz_loadu_ps(lanes, pi + m);
      const int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      int32_t* dst = reinterpret_cast<int32_t*>(po + m * k_pad);
      for (int64_t p = 0; p < k_pad / 2; ++p) {
        const __m512i a = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(_mm512_mul_ps(load(2 * p, n, oy, ox0, lanes), s), nearest));
        const __m512i b = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(_mm512_mul_ps(load(2 * p + 1, n, oy, ox0, lanes), s), nearest));
        _mm512_mask_i32scatter_epi32(dst + p, lanes, rows16, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)), 4);
      }
    }
  });
  return {out, row};
}

torch::Tensor f16_gemm(torch::Tensor a, torch::Tensor row, torch::Tensor w, torch::Tensor s, torch::Tensor z,
                       int64_t group, torch::Tensor col, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(a.dtype() == torch::kFloat16 && a.dim() == 2 && a.is_contiguous(), "a: contiguous float16 (M, K)");
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 3 && w.size(2) == 64 && w.is_contiguous(),
              "w: contiguous uint8 nibbles (N / 64, K / 2, 64)");
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0) * kPanel, pairs = K / 2;
  TORCH_CHECK(K % (2 * kFlush) == 0 && w.size(1) == pairs, "K must match w and be a multiple of 64");
  TORCH_CHECK(group > 0 && group % 2 == 0, "group must be even");
  const int64_t G = (K + group - 1) / group;
  for (const auto& t : {s, z})
    TORCH_CHECK(t.dtype() == torch::kFloat16 && t.is_contiguous() && t.dim() == 3 && t.size(0) == N / kPanel &&
                t.size(1) == G && t.size(2) == kPairs, "s, z: contiguous float16 (N / 64, ceil(K / group), 128)");
  TORCH_CHECK(row.dtype() == torch::kFloat32 && row.is_contiguous() && row.numel() == M, "row: float32 (M,)");
  TORCH_CHECK(col.dtype() == torch::kFloat32 && col.is_contiguous() && col.numel() == N, "col: float32 (N,)");
  if (bias) TORCH_CHECK(bias->dtype() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N, "bias: float32 (N,)");
  auto out = torch::empty({M, N}, a.options().dtype(torch::kFloat32));
  const at::Half* pa = a.data_ptr<at::Half>();
  const uint8_t* pw = w.data_ptr<uint8_t>();
  const at::Half* pscale = s.data_ptr<at::Half>();
  const at::Half* pz = z.data_ptr<at::Half>();
  const float* pr = row.data_ptr<float>();
  const float* pc = col.data_ptr<float>();
  const float* pb = bias ? bias->data_ptr<float>() : nullptr;
  float* po = out.data_ptr<float>();
  // each panel decoded once into an L2-sized buffer, then run over every row
  at::parallel_for(0, N / kPanel, 1, [&](int64_t n0, int64_t n1) {
    std::vector<_Float16> panel(pairs * kPairs);
    for (int64_t nb = n0; nb < n1; ++nb) {
      decode_panel(pw + nb * pairs * 64, pairs, pscale + nb * G * kPairs, pz + nb * G * kPairs, group / 2, panel.data());
      rows<kRows>(pa, K, M, panel.data(), pairs, pr, pc + nb * kPanel, pb ? pb + nb * kPanel : nullptr,
                  po + nb * kPanel, N);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("half_rows", &half_rows, "fp16 rows scaled per row by a power of two", py::arg("x"), py::arg("k_pad"),
        py::call_guard<py::gil_scoped_release>());
  m.def("conv_rows", &conv_rows, "fp16 windows of a 2-D convolution, in pairs", py::arg("x"), py::arg("kernel"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("k_pad"),
        py::call_guard<py::gil_scoped_release>());
  m.def("f16_gemm", &f16_gemm, "int4 x fp16 GEMM (AVX512-FP16)", py::arg("a"), py::arg("row"), py::arg("w"),
        py::arg("s"), py::arg("z"), py::arg("group"), py::arg("col"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
}
