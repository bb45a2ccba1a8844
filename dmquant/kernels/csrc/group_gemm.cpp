// Group-wise int8 GEMM on AVX512-VNNI:
//   y[m, n] = row[m] * sum_g scale[g, n] * sum_{k in g} (a[m, k] - zp) * w[n, k] + bias[n]
// (row: the activations' per-token scales, optional like bias).
//
// a: uint8 activation codes (M, K) with zero point zp; w: int8 weight codes packed (N / 16, K / 4, 16, 4),
// so one 64-byte load holds 4 consecutive inputs of 16 output columns (vpdpbusd's operand layout), or
// codes of 4 bits or fewer as nibbles (N / 32, K / 4, 64), half the bytes, decoded a panel at a time;
// wsum[g, n] = sum_{k in g} w[n, k] turns the unsigned product into the signed one. Each group is
// summed exactly in int32, then converted and scaled into an fp32 accumulator that stays in registers:
// the group scale is applied where it is constant, and the output is written once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kRowChunk = 128;  // rows whose codes stay in L2 while every column panel passes
constexpr int64_t kNibbleRowBytes = 2 << 20;  // codes of the rows one decoded nibble panel serves

inline __m512i broadcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// MR rows x 32 columns (two 16-column blocks `b0`, `b0 + block`) over all K.
struct Epilogue {
  const float* row;   // per-row output scale, or nullptr
  const float* bias;  // per-column bias (already offset to the panel), or nullptr
};

template <int MR>
void tile(const uint8_t* a, int64_t lda, const int8_t* b0, int64_t block, const int32_t* wsum,
          const float* scale, int64_t ldn, int64_t K, int64_t group, int32_t zp, float* c, int64_t ldc,
          Epilogue e) {
  __m512 f[MR][2];
  for (int r = 0; r < MR; ++r) f[r][0] = f[r][1] = _mm512_setzero_ps();
  const __m512i vzp = _mm512_set1_epi32(zp);
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += group, ++g) {
    __m512i acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k0 + group; k += 4) {
      const __m512i w0 = _mm512_loadu_si512(b0 + k * 16);
      const __m512i w1 = _mm512_loadu_si512(b0 + block + k * 16);
      for (int r = 0; r < MR; ++r) {
        const __m512i x = broadcast4(a + r * lda + k);
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], x, w0);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], x, w1);
      }
    }
    const __m512i z0 = _mm512_mullo_epi32(_mm512_loadu_si512(wsum + g * ldn), vzp);
    const __m512i z1 = _mm512_mullo_epi32(_mm512_loadu_si512(wsum + g * ldn + 16), vzp);
    const __m512 s0 = _mm512_loadu_ps(scale + g * ldn);
    const __m512 s1 = _mm512_loadu_ps(scale + g * ldn + 16);
    for (int r = 0; r < MR; ++r) {
      f[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][0], z0)), s0, f[r][0]);
      f[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][1], z1)), s1, f[r][1]);
    }
  }
  const __m512 b0v = e.bias ? _mm512_loadu_ps(e.bias) : _mm512_setzero_ps();
  const __m512 b1v = e.bias ? _mm512_loadu_ps(e.bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < MR; ++r) {
    const __m512 rs = _mm512_set1_ps(e.row ? e.row[r] : 1.0f);
    _mm512_storeu_ps(c + r * ldc, _mm512_fmadd_ps(f[r][0], rs, b0v));
    _mm512_storeu_ps(c + r * ldc + 16, _mm512_fmadd_ps(f[r][1], rs, b1v));
  }
}

template <int MR>
void rows(const uint8_t* a, int64_t lda, int64_t m, const int8_t* b0, int64_t block, const int32_t* wsum,
          const float* scale, int64_t ldn, int64_t K, int64_t group, int32_t zp, float* c, int64_t ldc,
          Epilogue e) {
  auto at = [&](int64_t i) { return Epilogue{e.row ? e.row + i : nullptr, e.bias}; };
  int64_t i = 0;
  for (; i + MR <= m; i += MR)
    tile<MR>(a + i * lda, lda, b0, block, wsum, scale, ldn, K, group, zp, c + i * ldc, ldc, at(i));
  switch (m - i) {  // the last 1-3 rows
    case 3: tile<3>(a + i * lda, lda, b0, block, wsum, scale, ldn, K, group, zp, c + i * ldc, ldc, at(i)); break;
    case 2: tile<2>(a + i * lda, lda, b0, block, wsum, scale, ldn, K, group, zp, c + i * ldc, ldc, at(i)); break;
    case 1: tile<1>(a + i * lda, lda, b0, block, wsum, scale, ldn, K, group, zp, c + i * ldc, ldc, at(i)); break;
    default: break;
  }
}

// A panel of 4-bit codes, low nibble = the first 16 columns' byte, high nibble = the next 16's, each
// stored as code + 8: decoded to the int8 layout (two 16-column blocks of K * 16 bytes) in `out`. Once
// per panel and row chunk, against 128 rows of products per weight.
const int8_t* unpack_panel(const uint8_t* src, int64_t K, int8_t* out) {
  const __m512i low = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  const int64_t block = K * 16;
  for (int64_t i = 0; i < block; i += 64) {
    const __m512i v = _mm512_loadu_si512(src + i);
    _mm512_storeu_si512(out + i, _mm512_sub_epi8(_mm512_and_si512(v, low), eight));
    _mm512_storeu_si512(out + block + i, _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), eight));
  }
  return out;
}

}  // namespace

torch::Tensor group_gemm(torch::Tensor a, int64_t zp, torch::Tensor w, torch::Tensor wsum, torch::Tensor scale,
                         int64_t group, c10::optional<torch::Tensor> row, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(a.dtype() == torch::kUInt8 && a.dim() == 2 && a.is_contiguous(), "a: contiguous uint8 (M, K)");
  const bool nibbles = w.dtype() == torch::kUInt8;
  TORCH_CHECK(w.is_contiguous() && (nibbles ? w.dim() == 3 && w.size(2) == 64
                                            : w.dtype() == torch::kInt8 && w.dim() == 4 && w.size(2) == 16 && w.size(3) == 4),
              "w: contiguous int8 (N / 16, K / 4, 16, 4), or uint8 nibbles (N / 32, K / 4, 64)");
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0) * (nibbles ? 32 : 16);
  TORCH_CHECK(w.size(1) * 4 == K && N % 32 == 0, "w does not match a's K, or N is not a multiple of 32");
  TORCH_CHECK(group > 0 && group % 4 == 0 && K % group == 0, "group must be a multiple of 4 dividing K");
  const int64_t G = K / group;
  TORCH_CHECK(wsum.dtype() == torch::kInt32 && wsum.is_contiguous() && wsum.size(0) == G && wsum.size(1) == N,
              "wsum: contiguous int32 (K / group, N)");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() && scale.size(0) == G && scale.size(1) == N,
              "scale: contiguous float32 (K / group, N)");
  if (row) TORCH_CHECK(row->dtype() == torch::kFloat32 && row->is_contiguous() && row->numel() == M, "row: float32 (M,)");
  if (bias) TORCH_CHECK(bias->dtype() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N, "bias: float32 (N,)");
  const float* pr = row ? row->data_ptr<float>() : nullptr;
  const float* pb = bias ? bias->data_ptr<float>() : nullptr;
  auto out = torch::empty({M, N}, a.options().dtype(torch::kFloat32));
  const uint8_t* pa = a.data_ptr<uint8_t>();
  const int8_t* pw = nibbles ? nullptr : w.data_ptr<int8_t>();
  const uint8_t* pn = nibbles ? w.data_ptr<uint8_t>() : nullptr;
  const int32_t* ps = wsum.data_ptr<int32_t>();
  const float* pc = scale.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t block = K * 16;  // bytes of one 16-column block
  // int8 panels: row chunks outside, so a chunk's codes stay in L2 while every panel passes; nibble
  // panels: each decoded once (into an L2-sized buffer) and then run over all rows
  const int64_t chunk = nibbles ? std::max(kRowChunk, (kNibbleRowBytes / K) / kRowChunk * kRowChunk) : kRowChunk;
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t m = std::min(chunk, M - m0);
    at::parallel_for(0, N / 32, 1, [&](int64_t n0, int64_t n1) {
      std::vector<int8_t> panel(nibbles ? 2 * block : 0);
      for (int64_t nb = n0; nb < n1; ++nb) {
        const int8_t* b0 = nibbles ? unpack_panel(pn + nb * K * 16, K, panel.data()) : pw + nb * 2 * block;
        for (int64_t r0 = 0; r0 < m; r0 += kRowChunk)
          rows<4>(pa + (m0 + r0) * K, K, std::min(kRowChunk, m - r0), b0, block, ps + nb * 32, pc + nb * 32, N, K,
                  group, static_cast<int32_t>(zp), po + (m0 + r0) * N + nb * 32, N,
                  Epilogue{pr ? pr + m0 + r0 : nullptr, pb ? pb + nb * 32 : nullptr});
      }
    });
  }
  return out;
}

// uint8 codes clamp(round(x / scale[m]) + zp, 0, hi): the reference's rounding (IEEE division, ties to
// even) in one pass instead of five; `scale` holds one value per row, or one for all.
torch::Tensor codes(torch::Tensor x, torch::Tensor scale, int64_t zp, int64_t hi) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 (M, K)");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() &&
              (scale.numel() == 1 || scale.numel() == x.size(0)), "scale: float32, one per row or one");
  const int64_t M = x.size(0), K = x.size(1), step = scale.numel() == 1 ? 0 : 1;
  auto out = torch::empty({M, K}, x.options().dtype(torch::kUInt8));
  const float* px = x.data_ptr<float>();
  const float* ps = scale.data_ptr<float>();
  uint8_t* po = out.data_ptr<uint8_t>();
  const __m512 vzp = _mm512_set1_ps(static_cast<float>(zp)), vhi = _mm512_set1_ps(static_cast<float>(hi));
  const __m512 vlo = _mm512_setzero_ps();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const __m512 s = _mm512_set1_ps(ps[m * step]);
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
        __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, px + m * K + k), s);
        v = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vzp);
        v = _mm512_min_ps(_mm512_max_ps(v, vlo), vhi);
        _mm_mask_storeu_epi8(po + m * K + k, mask, _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(v)));
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("codes", &codes, "uint8 activation codes, the reference's rounding",
        py::call_guard<py::gil_scoped_release>());
  m.def("group_gemm", &group_gemm, "group-wise int8 GEMM (AVX512-VNNI)", py::arg("a"), py::arg("zp"), py::arg("w"),
        py::arg("wsum"), py::arg("scale"), py::arg("group"), py::arg("row") = py::none(), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
}
