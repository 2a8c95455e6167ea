// kvengine — the Python extension module kvengine._C.  Loading it registers every op (the TORCH_LIBRARY blocks in
// this library) and installs torch's thread pool as the engine's parallel-for.  It also reports build information.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include "kvengine/parallel.h"

#ifndef KVENGINE_VERSION
#define KVENGINE_VERSION "0.0.0"
#endif

namespace {

void torch_parallel_for(int64_t n, int64_t grain, void* ctx, kvengine::ParallelBody body) {
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { body(ctx, b, e); });
}

struct InstallParallel {
  InstallParallel() { kvengine::set_parallel_for(&torch_parallel_for); }
} install_parallel;

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvengine native extension: importing it registers torch.ops.kvengine.*";
  m.def("build_info", [] {
    pybind11::dict d;
    d["version"] = KVENGINE_VERSION;
    d["torch_version"] = KVENGINE_TORCH_VERSION;
#ifdef KVENGINE_WITH_CUDA
    d["cuda"] = true;
    d["cuda_archs"] = KVENGINE_CUDA_ARCHS;
    d["cutlass_version"] = KVENGINE_CUTLASS_VERSION;
#else
    d["cuda"] = false;
    d["cuda_archs"] = "";
    d["cutlass_version"] = "";
#endif
    d["cpu_isa"] = kvengine::cpu_isa();
    d["compiler"] = __VERSION__;
    return d;
  });
}
