// kvengine — host scalar conversions and the default CPU parallel-for.
#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "kvengine/common.h"
#include "kvengine/parallel.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace kvengine {

float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400u));
      u = sign | ((127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (u >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (u < 0x38800000u) {  // subnormal or zero in half
    float a;
    std::memcpy(&a, &u, 4);
    // scale so that the half subnormal unit (2^-24) becomes 1, round to nearest even via float addition
    const float r = a * 16777216.0f;  // exact
    const float rr = std::nearbyint(r);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(rr));
  }
  const uint32_t man = u & 0x7fffffu;
  uint32_t h = ((u >> 23) - 112) << 10 | (man >> 13);
  const uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
#endif
}

namespace {
std::atomic<ParallelForFn> g_parallel_for{nullptr};

void default_parallel_for(int64_t n, int64_t grain, void* ctx, ParallelBody body) {
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t chunks = std::min<int64_t>(hw, (n + grain - 1) / grain);
  if (chunks <= 1) { body(ctx, 0, n); return; }
  std::vector<std::thread> workers;
  const int64_t per = (n + chunks - 1) / chunks;
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t b = c * per, e = std::min(n, b + per);
    if (b < e) workers.emplace_back([=] { body(ctx, b, e); });
  }
  body(ctx, 0, std::min(n, per));
  for (auto& w : workers) w.join();
}
}  // namespace

const char* cpu_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

void set_parallel_for(ParallelForFn fn) { g_parallel_for.store(fn); }

void parallel_for_raw(int64_t n, int64_t grain, void* ctx, ParallelBody body) {
  ParallelForFn fn = g_parallel_for.load();
  (fn ? fn : default_parallel_for)(n, std::max<int64_t>(1, grain), ctx, body);
}

}  // namespace kvengine
