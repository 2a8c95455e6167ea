// kvengine — normalized fast Walsh–Hadamard transform on CUDA (see kvengine/fwht.h for the semantics).
//
// Three kernels, by row length n:
//   n in {2, 4}      one thread per row, scalar loads.
//   n in [8, 256]    one warp per 256/n rows: each lane loads 8 contiguous elements (one 16-byte load for 16-bit
//                    types, two for fp32), 3 butterfly stages in registers, log2(n)-3 across lanes with shuffles,
//                    then a direct coalesced store.  No shared memory.
//   n in (256, 32K]  one block per row: the warp step above on each 256-element chunk, written to an fp32 row in
//                    dynamic shared memory; the stages for bits 8.. in phases of <= 4 bits; final 16-byte stores.
// All kernels loop over their work grid-stride, so any row count is safe; in-place (x == y) works because a row is
// read completely (by one thread, one warp, or one block before a __syncthreads) before any of it is written.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "fwht_device.cuh"
#include "kvengine/cuda_ops.h"
#include "kvengine/fwht.h"

namespace kvengine::cuda {
namespace {

using detail::Storage;

constexpr int kWarpKernelThreads = 256;
constexpr int kBlockKernelMaxThreads = 1024;

// ---- kernels -------------------------------------------------------------------------------------------------------

// n in {2, 4}: thread per row.
template <int N, typename T>
__global__ void __launch_bounds__(256) fwht_small_kernel(const T* x, T* y, int64_t rows, int64_t xs, int64_t ys,
                                                         float scale, const int32_t* perm) {
  const int64_t stride = detail::global_thread_count();
  for (int64_t r = detail::global_thread_id(); r < rows; r += stride) {
    float v[N];
    detail::small_fwht<N>(x + r * xs, perm, v);
    T* out = y + r * ys;
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = Storage<T>::from_float(v[i] * scale);
  }
}

// n in [8, 256]: warp per 256/n rows.
template <typename T>
__global__ void __launch_bounds__(kWarpKernelThreads) fwht_warp_kernel(const T* x, T* y, int64_t rows, int log2n,
                                                                       int64_t xs, int64_t ys, float scale,
                                                                       const int32_t* perm, int load_mode,
                                                                       bool vec_store) {
  const int lane = threadIdx.x & 31;
  const int n = 1 << log2n;
  const int rows_per_task = 256 >> log2n;
  const int lane_row = (lane * 8) >> log2n, off = (lane * 8) & (n - 1);
  const int64_t tasks = (rows + rows_per_task - 1) / rows_per_task;
  const int64_t wstride = detail::global_thread_count() >> 5;
  // the loop bound is warp-uniform, so every lane reaches the shuffles
  for (int64_t task = detail::global_thread_id() >> 5; task < tasks; task += wstride) {
    const int64_t r = task * rows_per_task + lane_row;
    const bool active = r < rows;
    float v[8];
    detail::warp_fwht(x + (active ? r : 0) * xs, off, perm, n, log2n, load_mode, active, lane, v);
    if (active) {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] *= scale;
      detail::store8(y + r * ys + off, v, vec_store);
    }
  }
}

// n in (256, 32768]: block per row, fp32 row in dynamic shared memory (n * 4 bytes).
template <typename T>
__global__ void __launch_bounds__(kBlockKernelMaxThreads) fwht_block_kernel(const T* x, T* y, int64_t rows,
                                                                            int log2n, int64_t xs, int64_t ys,
                                                                            float scale, const int32_t* perm,
                                                                            int load_mode, bool vec_store) {
  extern __shared__ float4 fwht_smem[];
  float* s = reinterpret_cast<float*>(fwht_smem);
  const int n = 1 << log2n;
  const int lane = threadIdx.x & 31;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    detail::block_fwht_to_smem(x + r * xs, perm, n, log2n, load_mode, s);
    T* out = y + r * ys;
    // thread i stores elements 8i .. 8i+7 (a warp writes 256 contiguous elements)
    for (int i = threadIdx.x; i < (n >> 3); i += blockDim.x) {
      float v[8];
      detail::smem_load8(s + i * 8, v, lane);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] *= scale;
      detail::store8(out + i * 8, v, vec_store);
    }
    __syncthreads();  // s is overwritten by the next row
  }
}

// ---- launch helpers --------------------------------------------------------------------------------------------------

void check_launch(const char* name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("kvengine::cuda::") + name + ": " + cudaGetErrorString(err));
}

void check_call(cudaError_t err, const char* name) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("kvengine::cuda::") + name + ": " + cudaGetErrorString(err));
}

int sm_count() {
  int dev = 0, sms = 0;
  check_call(cudaGetDevice(&dev), "fwht");
  check_call(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "fwht");
  return sms > 0 ? sms : 1;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// rows of `p` (stride in elements) start 16-byte aligned
bool rows_aligned16(const void* p, int64_t stride, int esize) { return aligned16(p) && (stride * esize) % 16 == 0; }

int64_t grid_for(int64_t work_blocks, int64_t cap) { return work_blocks < 1 ? 1 : (work_blocks < cap ? work_blocks : cap); }

template <typename T>
void launch(const void* xv, void* yv, int64_t rows, int64_t n, int64_t xs, int64_t ys, float scale,
            const int32_t* perm, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  const int esize = static_cast<int>(sizeof(T));
  const int log2n = log2i(n);
  const int sms = sm_count();

  if (n < 8) {
    const int threads = 256;
    const int64_t grid = grid_for((rows + threads - 1) / threads, int64_t(sms) * 8);
    if (n == 2)
      fwht_small_kernel<2, T><<<static_cast<unsigned>(grid), threads, 0, stream>>>(x, y, rows, xs, ys, scale, perm);
    else
      fwht_small_kernel<4, T><<<static_cast<unsigned>(grid), threads, 0, stream>>>(x, y, rows, xs, ys, scale, perm);
    check_launch("fwht");
    return;
  }

  const int load_mode =
      perm ? detail::kLoadGather : (rows_aligned16(x, xs, esize) ? detail::kLoadVector : detail::kLoadScalar);
  const bool vec_store = rows_aligned16(y, ys, esize);

  if (n <= 256) {
    const int64_t rows_per_task = 256 / n;
    const int64_t tasks = (rows + rows_per_task - 1) / rows_per_task;
    const int warps_per_block = kWarpKernelThreads / 32;
    const int64_t grid = grid_for((tasks + warps_per_block - 1) / warps_per_block, int64_t(sms) * 8);
    fwht_warp_kernel<T><<<static_cast<unsigned>(grid), kWarpKernelThreads, 0, stream>>>(
        x, y, rows, log2n, xs, ys, scale, perm, load_mode, vec_store);
    check_launch("fwht");
    return;
  }

  // one block per row; n/8 threads (one 8-element slot each) up to 1024
  const int threads = static_cast<int>(n / 8 < kBlockKernelMaxThreads ? n / 8 : kBlockKernelMaxThreads);
  const size_t smem = static_cast<size_t>(n) * sizeof(float);
  if (smem > 48 * 1024)
    check_call(cudaFuncSetAttribute(fwht_block_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "fwht");
  int per_sm = 0;
  check_call(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fwht_block_kernel<T>, threads, smem), "fwht");
  const int64_t grid = grid_for(rows, int64_t(sms) * (per_sm > 0 ? per_sm : 1));
  fwht_block_kernel<T><<<static_cast<unsigned>(grid), threads, smem, stream>>>(x, y, rows, log2n, xs, ys, scale,
                                                                               perm, load_mode, vec_store);
  check_launch("fwht");
}

}  // namespace

void fwht(const void* x, void* y, DType dtype, int64_t rows, int64_t n, int64_t x_row_stride, int64_t y_row_stride,
          float scale, const int32_t* perm, cudaStream_t stream) {
  if (rows <= 0) return;
  switch (dtype) {
    case DType::F32: launch<float>(x, y, rows, n, x_row_stride, y_row_stride, scale, perm, stream); break;
    case DType::F16: launch<__half>(x, y, rows, n, x_row_stride, y_row_stride, scale, perm, stream); break;
    default: launch<__nv_bfloat16>(x, y, rows, n, x_row_stride, y_row_stride, scale, perm, stream); break;
  }
}

}  // namespace kvengine::cuda
