// kvengine — binding layer: input checks (every op validates here, once) and dtype/device helpers.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "kvengine/common.h"

#if defined(KVENGINE_WITH_CUDA) && !defined(KVENGINE_CUDA_EMU)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// Registration.  The CUDA emulator build (KVENGINE_CUDA_EMU: tests/cuda_emu, the CUDA kernels run on the CPU) compiles
// this binding a second time with the namespace `kvengine` renamed to `kvengine_emu` and registers the CUDA path of
// every op under torch.ops.kvengine_emu for CPU tensors; the indirection lets the rename reach TORCH_LIBRARY.
#define KVE_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define KVE_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#ifdef KVENGINE_CUDA_EMU
#define KVE_CUDA_KEY CPU
typedef struct CUstream_st* cudaStream_t;  // as in kvengine/cuda_ops.h
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(const c10::Device&) {}
};
}  // namespace c10::cuda
#else
#define KVE_CUDA_KEY CUDA
#endif

namespace kvengine::binding {

// A ValueError naming the argument.
#define KVE_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "kvengine.", __VA_ARGS__)

// Size limits of the kernels: positions / indices held in 32-bit ints, and the CUDA grid's y / z dimensions.
constexpr int64_t kInt32Max = 0x7fffffff;
constexpr int64_t kGridYZMax = 65535;

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK_VALUE(false, "kvengine: unsupported dtype ", t);
  }
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  KVE_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op,
            ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  KVE_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(), " but the other inputs are on ", dev);
}

// Whether t takes the CUDA path (in the emulator build: every tensor, all of which are on the CPU).
inline bool on_cuda(const at::Tensor& t) {
#ifdef KVENGINE_CUDA_EMU
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

inline void check_supported_device(const char* op, const at::Tensor& t) {
#ifdef KVENGINE_CUDA_EMU
  KVE_CHECK(t.is_cpu(), op, ": the CUDA emulator runs on CPU tensors, got ", t.device());
#elif defined(KVENGINE_WITH_CUDA)
  KVE_CHECK(t.is_cpu() || t.is_cuda(), op, ": tensors must be on CPU or CUDA, got ", t.device());
#else
  KVE_CHECK(t.is_cpu(), op, ": this build of kvengine has no CUDA support; tensors must be on CPU, got ",
            t.device(), " (rebuild with KVENGINE_CUDA=ON)");
#endif
}

inline void check_nonempty(const char* op, const char* name, const at::Tensor& t) {
  KVE_CHECK(t.numel() > 0, op, ": ", name, " is empty (shape ", t.sizes(), ")");
}

inline void check_bits(const char* op, int64_t bits) {
  KVE_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, op, ": bits must be 1, 2, 4 or 8, got ", bits);
}

inline QuantMode parse_mode(const char* op, const std::string& mode) {
  if (mode == "per_channel") return QuantMode::PerChannel;
  if (mode == "per_token") return QuantMode::PerToken;
  KVE_CHECK(false, op, ": mode must be 'per_channel' or 'per_token', got '", mode, "'");
  return QuantMode::PerChannel;
}

// x viewed as [-1, *inner] with unit stride along the last dim (a copy only when no such view exists).
// Kernels take the remaining strides; CUDA launchers pick vector or scalar loads from the actual alignment.
inline at::Tensor flatten_lead(const at::Tensor& x, at::IntArrayRef inner) {
  at::Tensor t = x.stride(-1) == 1 ? x : x.contiguous();
  std::vector<int64_t> shape{-1};
  shape.insert(shape.end(), inner.begin(), inner.end());
  t = t.reshape(shape);
  if (t.stride(-1) != 1) t = t.contiguous();
  return t;
}

#ifdef KVENGINE_CUDA_EMU
inline cudaStream_t stream_of(const at::Tensor&) { return nullptr; }
#elif defined(KVENGINE_WITH_CUDA)
inline cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
#endif

}  // namespace kvengine::binding
