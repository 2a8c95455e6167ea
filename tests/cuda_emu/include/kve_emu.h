// kvengine CUDA emulator — runs the project's CUDA kernels (cuda/src/*.cu, translated by tests/cuda_emu/translate.py)
// on the CPU, so their logic is tested in CI on machines without a GPU.
//
// Model: one CTA at a time; its threads are fibers (user-space contexts) on the calling OS thread, switched
// cooperatively at every synchronization point (__syncthreads, warp shuffles / votes / __syncwarp, mma, cp.async
// waits).  Between two such points a thread runs alone, so the result of a kernel that is correct under CUDA's rules
// does not depend on the schedule; a kernel that is not (a missing barrier, a warp op some lanes skip) deadlocks,
// aborts with a message, or reads poisoned (NaN) shared memory.  The default schedule is the adversarial one for
// missing barriers: one warp runs until every lane of it waits at __syncthreads (or has exited) before the next warp
// starts, so a warp reads what other warps have not written yet (KVENGINE_EMU_SCHED=thread: round robin over all
// threads instead).  Warps and lanes run in thread order in even CTAs and in reverse order in odd ones, so a race
// shows whichever side of it runs first; KVENGINE_EMU_ORDER=forward|reverse|random fixes one order for all CTAs.
//
// Faithful: thread/warp/block indices, __syncthreads and warp-level semantics (full or partial masks, divergence is
// an error), dynamic and static shared memory (poisoned with 0xFF bytes = NaN at each CTA start), cp.async groups
// (copies land at the latest moment wait_group allows, and must be 16-byte aligned), the fragment layouts of the
// mma.sync instructions used (PTX ISA tables, cross-checked with CuTe's MMA traits); CuTe code (its layouts and
// partitioning) runs as it is, against the CUDA toolkit's host headers.
// Not modelled: timing, real concurrency (so no race detector), memory consistency, fast-math precision
// (__expf is expf), register limits, the actual hardware.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- CUDA types the kernels use -------------------------------------------------------------------------------------
// With KVENGINE_EMU_TOOLKIT (the build found the CUDA toolkit's headers: CUTLASS/CuTe code needs them) the toolkit's
// own host-side types are used (dim3, the vector types, cudaError_t, cudaStream_t, the enums); otherwise ours.
#if defined(KVENGINE_EMU_TOOLKIT)
#include <driver_types.h>  // (not vector_functions.h: it pulls in the toolkit's runtime API declarations)
#define KVE_EMU_REAL_TYPES 1
#else
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
#endif

namespace emu {

[[noreturn]] void fail(const char* fmt, ...);

struct Fiber;

struct WarpState {
  uint32_t gen[32];                     // warp operations each lane has entered
  uint32_t kind[2][32];                 // which operation (an id), per generation parity: lanes in different
  uint32_t mask[2][32];                 // operations or with different masks are divergent code
  alignas(16) unsigned char val[2][32][64];  // payloads, double-buffered by generation parity
};

struct CpCopy {
  void* dst;
  const void* src;
};

struct Cta {
  dim3 block, grid, bid;
  int nthreads = 0;
  int live = 0;           // threads not yet returned
  int bar_count = 0;      // threads waiting at the current __syncthreads
  uint64_t bar_gen = 0;
  std::vector<WarpState> warps;
  unsigned char* dyn = nullptr;
  size_t dyn_size = 0;
  const char* kernel = "?";
};

struct ThreadState {
  int tid = 0;
  bool done = false;
  const char* waiting = nullptr;  // what it waits for (diagnostics)
  bool at_barrier = false;        // waiting in __syncthreads
  std::vector<std::vector<CpCopy>> cp_groups;  // committed cp.async groups, oldest first
  std::vector<CpCopy> cp_open;                 // issued, not yet committed
};

extern Cta* g_cta;
extern ThreadState* g_thread;  // the running thread
extern uint64_t g_progress;    // bumped whenever a thread moves past a synchronization point

void yield();  // back to the scheduler (a waiting thread)

inline int tid() { return g_thread->tid; }
inline int lane() { return g_thread->tid & 31; }
inline int warp() { return g_thread->tid >> 5; }

inline dim3 thread_idx() {
  const int t = tid();
  const unsigned bx = g_cta->block.x, by = g_cta->block.y;
  return dim3(t % bx, (t / bx) % by, t / (bx * by));
}

// ---- CTA barrier ----------------------------------------------------------------------------------------------------
void syncthreads();

// ---- warp operations: every lane in `mask` enters with a payload, waits for the others, reads all payloads -------------
// Returns the slot (payloads of the 32 lanes) of this operation.
unsigned char (*warp_exchange(unsigned mask, uint32_t kind, const void* payload, size_t bytes))[64];

template <typename T>
inline T shfl_any(unsigned mask, T v, int src_lane_of_me, uint32_t kind) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  auto slot = warp_exchange(mask, kind, &v, sizeof(T));
  if (!((mask >> src_lane_of_me) & 1u)) fail("warp shuffle reads lane %d, which is not in the mask 0x%08x",
                                            src_lane_of_me, mask);
  T r;
  std::memcpy(&r, slot[src_lane_of_me], sizeof(T));
  return r;
}

// ---- shared memory ----------------------------------------------------------------------------------------------------
unsigned char* dyn_smem();
// storage of one static __shared__ declaration (keyed by its type and its site in the translated file), poisoned at
// every CTA start; declarations of different kernels may share storage (only one kernel runs at a time)
void* static_smem(const void* key, size_t bytes);
template <typename T, int Site>
inline T& static_shared() {
  static char key;
  return *static_cast<T*>(static_smem(&key, sizeof(T)));
}

// ---- cp.async --------------------------------------------------------------------------------------------------------
void cp_async16(uint32_t smem_offset, const void* gmem);
void cp_async_commit();
void cp_async_wait(int pending);

// ---- ldmatrix (m8n8 .b16, x4): lane 8m + r gives row r of matrix m (16-byte aligned dynamic shared memory offset);
// register m of lane l holds (row l / 4, cols 2(l % 4) + {0, 1}) of matrix m, or with trans (rows 2(l % 4) + {0, 1},
// col l / 4) (the first element in the low half)
void ldmatrix_x4(bool trans, uint32_t (&r)[4], uint32_t smem_offset);

// ---- launch ------------------------------------------------------------------------------------------------------------
struct Cfg {
  dim3 grid, block;
  size_t smem;
  Cfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};

// fn: the kernel's address, to which cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, n) applies
void run_grid(const Cfg& cfg, const char* name, const void* fn, const std::function<void()>& body);
// what cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) set; a launch asking for more
// than max(48 KB, that) dynamic shared memory is refused, as a GPU refuses it
void set_max_dynamic_smem(const void* fn, int bytes);

template <typename F>
struct Launcher {
  F fn;
  Cfg cfg;
  const char* name;
  template <typename... A>
  void operator()(A&&... args) const {
    // parameters are copied once, as the kernel parameter space is; every thread sees the same copies
    auto params = std::make_tuple(std::decay_t<A>(std::forward<A>(args))...);
    F f = fn;
    run_grid(cfg, name, reinterpret_cast<const void*>(fn),
             [&params, f] { std::apply([f](auto&... p) { f(p...); }, params); });
  }
};

template <typename F>
inline Launcher<F> launch(F fn, Cfg cfg, const char* name) {
  return Launcher<F>{fn, cfg, name};
}

// ---- settings of the emulated device ----------------------------------------------------------------------------------
int sm_count();  // KVENGINE_EMU_SMS (default 8): the split planners' view of the GPU
size_t launches();

// ---- mma.sync (PTX fragment layouts; g = lane / 4, t = lane % 4) --------------------------------------------------------
// m16n8k16, f16 or bf16 operands, f32 accumulators.  A (16x16, row): reg r holds rows g + 8·(r & 1), k = 2t + 8·(r >> 1)
// + {0, 1} (the lower k in the low half); B (16x8, col): reg r holds k = 2t + 8r + {0, 1}, column g; C/D: c0, c1 at
// (g, 2t + {0, 1}), c2, c3 at (g + 8, 2t + {0, 1}).
void mma_m16n8k16_f32(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]);
// m16n8k8, tf32 operands (the top 19 bits of each 32-bit register are read), f32 accumulators.  A (16x8, row): a0 at
// (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4); B (8x8, col): b0 at (k = t, column g), b1 (t + 4, g); C/D as
// above.
void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]);
// m16n8k256, .b1 operands, AND + popc, s32 accumulators.  A: reg r holds row g + 8·(r & 1), k = 32t + 128·(r >> 1) + bit;
// B: reg r holds column g, k = 32t + 128r + bit; C/D as above.
void mma_m16n8k256_and_popc(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const int32_t (&c)[4]);

}  // namespace emu
