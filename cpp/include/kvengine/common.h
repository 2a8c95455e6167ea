// kvengine — torch-free engine: common types.
// Every kernel in cpp/ and cuda/ takes raw pointers, sizes, strides (in elements) and, on CUDA, a stream.
// Inputs are validated once, in the binding layer (cpp/binding); the engine assumes valid arguments.
#pragma once
#include <cstdint>
#include <cstring>

namespace kvengine {

enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

inline int dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

enum class QuantMode : int32_t {
  PerChannel = 0,  // groups of `group_size` consecutive tokens share one scale/zero per channel (KIVI keys)
  PerToken = 1,    // groups of `group_size` consecutive channels within one token (KIVI values)
};

// ---- scalar conversions (host) --------------------------------------------------------------
inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float half_to_float(uint16_t h);   // IEEE binary16 -> float (exact)
uint16_t float_to_half(float f);   // round to nearest even, saturating to inf like IEEE

inline float load_as_float(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}
inline void store_from_float(void* p, int64_t i, DType t, float v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::F16: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
    default: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
  }
}
// value rounded to dtype t and back (identity for F32)
inline float round_to(float v, DType t) {
  switch (t) {
    case DType::F32: return v;
    case DType::F16: return half_to_float(float_to_half(v));
    default: return bf16_to_float(float_to_bf16(v));
  }
}

inline bool is_pow2(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }
inline int log2i(int64_t n) { int l = 0; while ((int64_t(1) << l) < n) ++l; return l; }

}  // namespace kvengine
