// kvengine — CPU parallelism hook. The engine is torch-free: it runs its parallel loops through a function that
// the host installs (the torch binding installs at::parallel_for so kvengine shares torch's thread pool).
// Without a host, loops run on std::thread workers (one per hardware thread).
#pragma once
#include <cstdint>
#include <utility>

namespace kvengine {

using ParallelBody = void (*)(void* ctx, int64_t begin, int64_t end);
using ParallelForFn = void (*)(int64_t n, int64_t grain, void* ctx, ParallelBody body);

const char* cpu_isa();  // the vector ISA the CPU kernels were compiled for
void set_parallel_for(ParallelForFn fn);  // nullptr restores the default
void parallel_for_raw(int64_t n, int64_t grain, void* ctx, ParallelBody body);

// f(begin, end) over [0, n) in chunks of at least `grain`.
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  if (n <= grain) { f(int64_t(0), n); return; }
  using Fn = std::remove_reference_t<F>;
  parallel_for_raw(n, grain, const_cast<void*>(static_cast<const void*>(&f)),
                   [](void* ctx, int64_t b, int64_t e) { (*static_cast<Fn*>(ctx))(b, e); });
}

}  // namespace kvengine
