// kvengine — binding: run the engine's CPU parallel loops on torch's intra-op thread pool.
#include <ATen/Parallel.h>

#include "kvengine/parallel.h"

namespace {

void torch_parallel_for(int64_t n, int64_t grain, void* ctx, kvengine::ParallelBody body) {
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { body(ctx, b, e); });
}

struct InstallParallel {
  InstallParallel() { kvengine::set_parallel_for(&torch_parallel_for); }
} install_parallel;

}  // namespace
