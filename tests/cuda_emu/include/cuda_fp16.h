// kvengine CUDA emulator: __half as the kernels use it (storage type + round-to-nearest-even conversions).
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

#ifdef KVE_EMU_REAL_TYPES
#include_next <cuda_fp16.h>  // the toolkit's (host-side conversions, and what CUTLASS / libcu++ expect of the type)
#else

struct alignas(2) __half {
  uint16_t x;
};
struct alignas(4) __half2 {
  __half x, y;
};
typedef __half half;
typedef __half2 half2;
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.x, 2);
  return static_cast<float>(v);
}
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // IEEE round to nearest even (GCC on x86-64)
  __half h;
  std::memcpy(&h.x, &v, 2);
  return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
#endif
