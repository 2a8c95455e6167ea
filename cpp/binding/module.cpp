// kvengine — the Python extension module kvengine._C.  It links libkvengine_ops.so, so importing it registers every
// op (torch.ops.kvengine.*); it also reports build information.
#include <pybind11/pybind11.h>

#include "kvengine/parallel.h"  // cpu_isa

#ifndef KVENGINE_VERSION
#define KVENGINE_VERSION "0.0.0"
#endif

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
#ifdef KVENGINE_CUDA_EMU_BUILT
    d["cuda_emu"] = true;  // libkvengine_emu_ops (tests/cuda_emu) is installed beside this module
#else
    d["cuda_emu"] = false;
#endif
    d["compiler"] = __VERSION__;
    return d;
  });
}
