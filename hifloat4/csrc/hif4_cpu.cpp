// HiF4 CPU kernels: quantize-dequantize, pack and unpack of 64-value groups.
//
// The arithmetic is docs/hif4_spec.md step by step, one group per iteration, groups in
// parallel. Exactness: the scale steps run in double (exact); per-value products
// |x| * R * 2^k run in float for bf16/fp16 inputs (at most 19 significant bits:
// exact) and in double for float inputs (at most 32 bits: exact), so no rounding
// ever happens before a decision. JIT-built by hifloat4/cpu_kernels.py; the torch
// implementation in hifloat4/format.py computes the same bits everywhere else.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace {

constexpr int kGroup = 64;
constexpr int kBytes = 36;
constexpr double kOneSeventh = 0.142578125;  // bf16(1/7)
constexpr double kScaleMin = 0x1p-48;
constexpr double kScaleMax = 49152.0;

// Round a non-negative normal (or zero) double to `bits` fractional significand
// bits, half to even, on its bit pattern (a carry into the exponent is correct).
inline double round_bits(double v, int bits) {
  const int drop = 52 - bits;
  uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  b += (uint64_t{1} << (drop - 1)) - 1 + ((b >> drop) & 1);
  b &= ~((uint64_t{1} << drop) - 1);
  std::memcpy(&v, &b, sizeof v);
  return v;
}

constexpr double kPow2[3] = {1.0, 2.0, 4.0};  // 2^d for d in 0..2

struct Group {
  float step[16];        // S * 2^(d-2) per 4-value block
  uint8_t code[kGroup];  // sign << 3 | n, n in 0..7
  float scale;           // S
  uint8_t b8;            // level-1 bits
  uint16_t b16;          // level-2 bits
  bool nonfinite;        // the group held NaN or Inf
};

inline uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

inline float float_of(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// Branch-free max (std::max returns a reference and compiles to unpredictable branches).
inline uint32_t umax(uint32_t a, uint32_t b) { return b ^ ((a ^ b) & -static_cast<uint32_t>(a > b)); }

template <typename T>
inline void encode(const T* x, Group& g) {
  using Acc = std::conditional_t<std::is_same_v<T, float>, double, float>;
  uint32_t a[kGroup];  // |x| as float bits: for non-negative floats integer order is float order
  uint8_t sign[kGroup];
  int nonfinite = 0;
  for (int i = 0; i < kGroup; ++i) {  // branchless: signs are random
    const uint32_t b = bits_of(static_cast<float>(x[i]));
    const uint32_t mag = b & 0x7FFFFFFFu;
    const int bad = mag >= 0x7F800000u;  // NaN or Inf
    nonfinite |= bad;
    a[i] = bad ? 0u : mag;  // NaN/Inf count as 0 for the group
    sign[i] = static_cast<uint8_t>((b >> 31) << 3);
  }
  g.nonfinite = nonfinite != 0;
  uint32_t m16[16], m8[8], mmax = 0;
  for (int j = 0; j < 16; ++j) m16[j] = umax(umax(a[4 * j], a[4 * j + 1]), umax(a[4 * j + 2], a[4 * j + 3]));
  for (int k = 0; k < 8; ++k) {
    m8[k] = umax(m16[2 * k], m16[2 * k + 1]);
    mmax = umax(mmax, m8[k]);
  }
  const float vmax = float_of(mmax);
  const double s = std::clamp(round_bits(static_cast<double>(vmax) * kOneSeventh, 7), kScaleMin, kScaleMax);
  const double scale = round_bits(s, 2);
  const double recip = round_bits(1.0 / scale, 7);
  g.scale = static_cast<float>(scale);
  g.b8 = 0;
  g.b16 = 0;
  Acc mult[kGroup];
  for (int j = 0; j < 16; ++j) {
    const int l1 = static_cast<double>(float_of(m8[j / 2])) * recip >= 4.0;
    const int l2 = static_cast<double>(float_of(m16[j])) * recip * (l1 ? 0.5 : 1.0) >= 2.0;
    g.b8 |= static_cast<uint8_t>(l1 << (j / 2));
    g.b16 |= static_cast<uint16_t>(l2 << j);
    const int d = l1 + l2;
    const Acc m = static_cast<Acc>(recip * kPow2[2 - d]);
    mult[4 * j] = mult[4 * j + 1] = mult[4 * j + 2] = mult[4 * j + 3] = m;
    g.step[j] = static_cast<float>(scale * kPow2[d] * 0.25);
  }
  for (int i = 0; i < kGroup; ++i) {
    // v >= 0.5 and < 2^20: truncation is floor, and v is exact (see the header)
    const Acc v = static_cast<Acc>(float_of(a[i])) * mult[i] + Acc(0.5);
    const int n = static_cast<int>(std::min(v, Acc(7)));
    g.code[i] = static_cast<uint8_t>(n) | sign[i];
  }
}

// code * step with the code's sign, as float bits (exact: at most 6 significant bits)
inline float decode_float(uint8_t code, float step) {
  return float_of(bits_of(static_cast<float>(code & 7) * step) | (static_cast<uint32_t>(code & 8) << 28));
}

template <typename T>
inline T decode_value(uint8_t code, float step) {
  const float q = decode_float(code, step);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return c10::BFloat16(static_cast<uint16_t>(bits_of(q) >> 16), c10::BFloat16::from_bits());  // exact in bf16
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return static_cast<T>(std::clamp(q, -65504.0f, 65504.0f));  // fp16 saturates
  } else {
    return static_cast<T>(q);
  }
}

template <typename T>
void quantize_impl(const T* x, T* out, int64_t n) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    Group g;
    for (int64_t gi = begin; gi < end; ++gi) {
      const T* xg = x + gi * kGroup;
      T* og = out + gi * kGroup;
      encode(xg, g);
      for (int i = 0; i < kGroup; ++i) og[i] = decode_value<T>(g.code[i], g.step[i / 4]);
      if (g.nonfinite)
        for (int i = 0; i < kGroup; ++i)
          if (!std::isfinite(static_cast<float>(xg[i]))) og[i] = xg[i];
    }
  });
}

template <typename T>
bool pack_impl(const T* x, uint8_t* out, int64_t n) {
  std::atomic<bool> ok{true};
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    Group g;
    for (int64_t gi = begin; gi < end; ++gi) {
      encode(x + gi * kGroup, g);
      if (g.nonfinite) ok = false;
      uint8_t* o = out + gi * kBytes;
      for (int i = 0; i < 32; ++i) o[i] = static_cast<uint8_t>(g.code[2 * i] | (g.code[2 * i + 1] << 4));
      int e;
      const double f = std::frexp(static_cast<double>(g.scale), &e);  // S = f * 2^e
      o[32] = static_cast<uint8_t>(((e - 1 + 48) << 2) | static_cast<int>(f * 8.0 - 4.0));
      o[33] = g.b8;
      o[34] = static_cast<uint8_t>(g.b16 & 0xFF);
      o[35] = static_cast<uint8_t>(g.b16 >> 8);
    }
  });
  return ok;
}

template <typename T>
void unpack_impl(const uint8_t* data, T* out, int64_t n) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) {
      const uint8_t* p = data + gi * kBytes;
      const double scale = std::ldexp(1.0 + (p[32] & 3) * 0.25, (p[32] >> 2) - 48);
      const unsigned b16 = p[34] | (p[35] << 8);
      float step[16];
      for (int j = 0; j < 16; ++j)
        step[j] = static_cast<float>(scale * 0.25 * kPow2[((p[33] >> (j / 2)) & 1) + ((b16 >> j) & 1)]);
      T* og = out + gi * kGroup;
      for (int i = 0; i < 32; ++i) {
        og[2 * i] = decode_value<T>(p[i] & 15, step[i / 2]);
        og[2 * i + 1] = decode_value<T>(p[i] >> 4, step[i / 2]);
      }
    }
  });
}

void check_groups(const torch::Tensor& t, int64_t width, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 2 && t.size(1) == width,
              what, " must be a contiguous CPU tensor of shape (n, ", width, ")");
}

}  // namespace

void quantize_dequantize_groups(torch::Tensor x, torch::Tensor out) {
  check_groups(x, kGroup, "x");
  check_groups(out, kGroup, "out");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.size(0) == x.size(0), "out must match x");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "hif4_quantize", [&] {
    quantize_impl<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0));
  });
}

bool pack_groups(torch::Tensor x, torch::Tensor out) {
  check_groups(x, kGroup, "x");
  check_groups(out, kBytes, "out");
  TORCH_CHECK(out.scalar_type() == at::kByte && out.size(0) == x.size(0), "out must be uint8 (n, 36)");
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "hif4_pack", [&] {
    ok = pack_impl<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<uint8_t>(), x.size(0));
  });
  return ok;
}

void unpack_groups(torch::Tensor data, torch::Tensor out) {
  check_groups(data, kBytes, "data");
  check_groups(out, kGroup, "out");
  TORCH_CHECK(data.scalar_type() == at::kByte && out.size(0) == data.size(0), "data must be uint8 (n, 36)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "hif4_unpack", [&] {
    unpack_impl<scalar_t>(data.data_ptr<uint8_t>(), out.data_ptr<scalar_t>(), data.size(0));
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_dequantize_groups", &quantize_dequantize_groups, "HiF4 fake quantization of (n, 64) groups");
  m.def("pack_groups", &pack_groups, "HiF4 codes of (n, 64) groups into (n, 36) bytes; false if NaN/Inf");
  m.def("unpack_groups", &unpack_groups, "(n, 36) HiF4 bytes to (n, 64) values");
}
