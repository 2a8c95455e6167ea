// kvengine CUDA emulator — scheduler, fibers, synchronization and mma semantics (see include/kve_emu.h).
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <exception>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "kve_emu.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define KVE_EMU_ASAN 1  // tell AddressSanitizer about every stack switch (the emulator runs under ASan in CI)
#endif

#if !defined(__x86_64__)
#error "the kvengine CUDA emulator switches fibers with x86-64 code"
#endif

// switch(&save_sp, new_sp): save the callee-saved registers, MXCSR and the x87 control word on this stack, store the
// stack pointer, load the other stack's and restore its registers.  A new stack starts in kve_emu_trampoline, which
// calls r13(r12).
extern "C" void kve_emu_switch(void** save_sp, void* new_sp);
extern "C" void kve_emu_trampoline();
asm(R"(
.pushsection .text
.globl kve_emu_switch
.type kve_emu_switch,@function
kve_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size kve_emu_switch,.-kve_emu_switch
.globl kve_emu_trampoline
.type kve_emu_trampoline,@function
kve_emu_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
.size kve_emu_trampoline,.-kve_emu_trampoline
.popsection
)");

namespace emu {

Cta* g_cta = nullptr;
ThreadState* g_thread = nullptr;
uint64_t g_progress = 0;

namespace {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr size_t kStack = 512 * 1024;  // per thread; a guard page below it
constexpr int kMaxThreads = 1024;

struct Stack {
  unsigned char* base = nullptr;  // guard page, then the usable part
  size_t size = 0;
};

std::mutex g_mutex;
std::vector<Stack> g_stacks;
void* g_sched_sp = nullptr;
std::vector<void*> g_sp;           // saved stack pointer of each thread's fiber
std::vector<ThreadState> g_threads;
std::exception_ptr g_error;
const std::function<void()>* g_body = nullptr;
size_t g_launches = 0;

struct StaticSmem {
  unsigned char* ptr;
  size_t bytes;
};
std::unordered_map<const void*, StaticSmem> g_static;
std::mutex g_attr_mutex;
std::unordered_map<const void*, int> g_max_dyn_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel

std::string where() {
  char buf[256];
  if (!g_cta) return "";
  std::snprintf(buf, sizeof buf, "%s, block (%u,%u,%u), thread %d: ", g_cta->kernel, g_cta->bid.x, g_cta->bid.y,
                g_cta->bid.z, g_thread ? g_thread->tid : -1);
  return buf;
}

void* make_stack(Stack& s, void (*fn)(void*), void* arg) {
  if (!s.base) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("kvengine CUDA emulator: cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);  // overflow -> SIGSEGV, not silent corruption
    s.base = static_cast<unsigned char*>(p) + page;
    s.size = kStack;
  }
  uintptr_t top = (reinterpret_cast<uintptr_t>(s.base) + s.size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = reinterpret_cast<uint64_t>(&kve_emu_trampoline);  // `ret` lands here with rsp 16-byte aligned
  *--sp = 0;                                               // rbp
  *--sp = 0;                                               // rbx
  *--sp = reinterpret_cast<uint64_t>(arg);                 // r12
  *--sp = reinterpret_cast<uint64_t>(fn);                  // r13
  *--sp = 0;                                               // r14
  *--sp = 0;                                               // r15
  uint32_t mx;
  uint16_t cw;
  asm volatile("stmxcsr %0" : "=m"(mx));
  asm volatile("fnstcw %0" : "=m"(cw));
  *--sp = uint64_t(mx) | (uint64_t(cw) << 32);
  return sp;
}

const void* g_sched_bottom = nullptr;  // the scheduler's stack (learnt at each switch into a fiber, for ASan)
size_t g_sched_size = 0;

// scheduler -> fiber t, back when it yields or exits
void to_fiber(int t) {
#ifdef KVE_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, g_stacks[t].base, g_stacks[t].size);
#endif
  kve_emu_switch(&g_sched_sp, g_sp[t]);
#ifdef KVE_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// running fiber -> scheduler (dying: the fiber is never resumed)
void to_scheduler(bool dying) {
#ifdef KVE_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(dying ? nullptr : &fake, g_sched_bottom, g_sched_size);
#endif
  kve_emu_switch(&g_sp[g_thread->tid], g_sched_sp);
#ifdef KVE_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, &g_sched_bottom, &g_sched_size);
#endif
  (void)dying;
}

void open_barrier(Cta& c) {
  c.bar_count = 0;
  ++c.bar_gen;
  for (auto& t : g_threads) t.at_barrier = false;
}

void thread_exit() {
  ThreadState& t = *g_thread;
  cp_async_wait(0);
  if (!t.cp_open.empty()) {  // issued, never committed: the copies still land
    for (auto& c : t.cp_open) std::memcpy(c.dst, c.src, 16);
    t.cp_open.clear();
  }
  t.done = true;
  ++g_progress;
  Cta& c = *g_cta;
  --c.live;
  if (c.bar_count > 0 && c.bar_count == c.live) open_barrier(c);  // the others wait for a thread that exited
}

void fiber_main(void* arg) {
  ThreadState* t = static_cast<ThreadState*>(arg);
#ifdef KVE_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
#endif
  try {
    (*g_body)();
  } catch (...) {
    if (!g_error) g_error = std::current_exception();
  }
  (void)t;
  thread_exit();
  to_scheduler(true);
  std::abort();  // never resumed
}

std::vector<int> schedule_order(int n) {
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  const char* e = std::getenv("KVENGINE_EMU_ORDER");
  if (e && std::string(e) == "reverse") {
    std::reverse(order.begin(), order.end());
  } else if (e && std::string(e) == "random") {
    static std::mt19937 rng(12345);
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

bool greedy_warps() {
  const char* e = std::getenv("KVENGINE_EMU_SCHED");
  return !(e && std::string(e) == "thread");
}

// one scheduling pass over the threads in `order`; true if any of them moved
bool run_threads(const std::vector<int>& order) {
  const uint64_t before = g_progress;
  for (int t : order) {
    if (g_threads[t].done || g_threads[t].at_barrier) continue;
    g_thread = &g_threads[t];
    to_fiber(t);
    g_thread = nullptr;
    if (g_error) return true;
  }
  return g_progress != before;
}

void deadlock(const Cta& c) {
  std::string msg = std::string("kvengine CUDA emulator: deadlock in ") + c.kernel + ", block (" +
                    std::to_string(c.bid.x) + "," + std::to_string(c.bid.y) + "," + std::to_string(c.bid.z) + "):";
  int shown = 0;
  for (auto& th : g_threads) {
    if (th.done || shown >= 8) continue;
    msg += " thread " + std::to_string(th.tid) + " waits at " + (th.waiting ? th.waiting : "?") + ";";
    ++shown;
  }
  g_error = std::make_exception_ptr(Failure(msg));
}

void run_cta(Cta& c, const std::vector<int>& order) {
  const int n = c.nthreads;
  g_threads.assign(n, ThreadState{});
  g_sp.assign(n, nullptr);
  for (int t = 0; t < n; ++t) {
    g_threads[t].tid = t;
    g_sp[t] = make_stack(g_stacks[t], &fiber_main, &g_threads[t]);
  }
  c.live = n;
  c.bar_count = 0;
  c.bar_gen = 0;
  c.warps.assign((n + 31) / 32, WarpState{});
  // warps in the order of their first thread in `order`, lanes in `order` within each warp
  std::vector<std::vector<int>> warps;
  std::vector<int> slot((n + 31) / 32, -1);
  for (int t : order) {
    if (slot[t >> 5] < 0) {
      slot[t >> 5] = static_cast<int>(warps.size());
      warps.emplace_back();
    }
    warps[slot[t >> 5]].push_back(t);
  }
  const bool greedy = greedy_warps();
  while (c.live > 0) {
    const uint64_t before = g_progress;
    if (greedy) {
      for (const auto& w : warps) {  // this warp runs until all of it waits at the barrier or has exited
        while (run_threads(w)) {
          if (g_error) return;
        }
        if (g_error) return;
      }
    } else {
      run_threads(order);
      if (g_error) return;
    }
    if (c.live > 0 && g_progress == before) return deadlock(c);
  }
}

}  // namespace

void fail(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  throw Failure("kvengine CUDA emulator: " + where() + buf);
}

void yield() { to_scheduler(false); }

void syncthreads() {
  Cta& c = *g_cta;
  const uint64_t g = c.bar_gen;
  ++g_progress;
  if (++c.bar_count == c.live) {
    open_barrier(c);
    return;
  }
  g_thread->waiting = "__syncthreads";
  g_thread->at_barrier = true;  // not scheduled again until the barrier opens
  while (c.bar_gen == g) yield();
  g_thread->waiting = nullptr;
}

unsigned char (*warp_exchange(unsigned mask, uint32_t kind, const void* payload, size_t bytes))[64] {
  Cta& c = *g_cta;
  const int l = lane(), w = warp();
  const int warp_lanes = std::min(32, c.nthreads - 32 * w);
  const unsigned valid = warp_lanes == 32 ? 0xffffffffu : ((1u << warp_lanes) - 1u);
  if (!((mask >> l) & 1u)) fail("a warp operation with mask 0x%08x called by lane %d, which is not in it", mask, l);
  if (mask & ~valid) fail("warp operation mask 0x%08x names lanes past the block's last thread", mask);
  WarpState& ws = c.warps[w];
  const uint32_t g = ++ws.gen[l];
  const int par = g & 1;
  std::memcpy(ws.val[par][l], payload, bytes);
  ws.kind[par][l] = kind;
  ws.mask[par][l] = mask;
  ++g_progress;
  for (;;) {
    bool all = true;
    for (int j = 0; j < 32; ++j) {
      if (!((mask >> j) & 1u)) continue;
      if (ws.gen[j] < g) {
        if (g_threads[32 * w + j].done)
          fail("lane %d waits in a warp operation (mask 0x%08x) that lane %d exited without entering", l, mask, j);
        all = false;
        break;
      }
    }
    if (all) break;
    g_thread->waiting = "a warp operation";
    yield();
  }
  g_thread->waiting = nullptr;
  for (int j = 0; j < 32; ++j) {
    if (!((mask >> j) & 1u)) continue;  // a lane already in g + 1 keeps generation g's entries in the other parity
    if (ws.kind[par][j] != kind || ws.mask[par][j] != mask)
      fail("lanes %d and %d are in different warp operations (kinds %u/%u, masks 0x%08x/0x%08x): divergent code", l,
           j, kind, ws.kind[par][j], mask, ws.mask[par][j]);
  }
  return ws.val[par];
}

unsigned char* dyn_smem() {
  if (!g_cta) fail("dynamic shared memory used outside a kernel");
  return g_cta->dyn;
}

void* static_smem(const void* key, size_t bytes) {
  auto it = g_static.find(key);
  if (it == g_static.end()) {
    auto* p = static_cast<unsigned char*>(::operator new(bytes, std::align_val_t(128)));
    std::memset(p, 0xFF, bytes);
    it = g_static.emplace(key, StaticSmem{p, bytes}).first;
  }
  return it->second.ptr;
}

void cp_async16(uint32_t off, const void* gmem) {
  Cta& c = *g_cta;
  if (static_cast<size_t>(off) + 16 > c.dyn_size)
    fail("cp.async to shared offset %u, past the %zu bytes of dynamic shared memory", off, c.dyn_size);
  unsigned char* dst = c.dyn + off;
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(gmem)) & 15)
    fail("cp.async of 16 bytes needs 16-byte aligned addresses (shared offset %u, global %p)", off, gmem);
  g_thread->cp_open.push_back({dst, gmem});
}

void cp_async_commit() {
  g_thread->cp_groups.push_back(std::move(g_thread->cp_open));
  g_thread->cp_open.clear();
}

void cp_async_wait(int pending) {
  auto& gs = g_thread->cp_groups;
  while (static_cast<int>(gs.size()) > pending) {  // the oldest groups land now (the latest moment allowed)
    for (auto& cp : gs.front()) std::memcpy(cp.dst, cp.src, 16);
    gs.erase(gs.begin());
  }
}

void ldmatrix_x4(bool trans, uint32_t (&r)[4], uint32_t off) {
  Cta& c = *g_cta;
  if (off & 15) fail("ldmatrix row address at shared offset %u is not 16-byte aligned", off);
  if (static_cast<size_t>(off) + 16 > c.dyn_size)
    fail("ldmatrix row at shared offset %u, past the %zu bytes of dynamic shared memory", off, c.dyn_size);
  auto slot = warp_exchange(0xffffffffu, trans ? 0x6c646d74u : 0x6c646d6eu, &off, sizeof off);
  const int l = lane();
  for (int m = 0; m < 4; ++m) {
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      const int row = trans ? 2 * (l & 3) + h : l >> 2, col = trans ? l >> 2 : 2 * (l & 3) + h;
      uint32_t a;
      std::memcpy(&a, slot[8 * m + row], 4);
      std::memcpy(&e[h], c.dyn + a + 2 * col, 2);
    }
    r[m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
}

int sm_count() {
  const char* e = std::getenv("KVENGINE_EMU_SMS");
  const int v = e ? std::atoi(e) : 8;
  return v > 0 ? v : 8;
}

size_t launches() { return g_launches; }

void set_max_dynamic_smem(const void* fn, int bytes) {
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  g_max_dyn_smem[fn] = bytes;
}

void run_grid(const Cfg& cfg, const char* name, const void* fn, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_cta) throw std::runtime_error("kvengine CUDA emulator: a kernel launched from inside a kernel");
  const int n = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  if (n < 1 || n > kMaxThreads)
    throw std::runtime_error(std::string("kvengine CUDA emulator: ") + name + " launched with " + std::to_string(n) +
                             " threads per block (1..1024)");
  if (cfg.grid.x < 1 || cfg.grid.y < 1 || cfg.grid.z < 1 || cfg.grid.y > 65535 || cfg.grid.z > 65535 ||
      cfg.grid.x > 0x7fffffffu)
    throw std::runtime_error(std::string("kvengine CUDA emulator: ") + name + " launched with an invalid grid");
  if (cfg.smem > 227 * 1024)
    throw std::runtime_error(std::string("kvengine CUDA emulator: ") + name + " asks for " +
                             std::to_string(cfg.smem) + " bytes of dynamic shared memory (> 227 KB)");
  if (cfg.smem > 48 * 1024) {  // a GPU refuses this launch unless the kernel's limit was raised first
    size_t limit = 48 * 1024;
    {
      std::lock_guard<std::mutex> lock(g_attr_mutex);
      const auto it = g_max_dyn_smem.find(fn);
      if (it != g_max_dyn_smem.end() && static_cast<size_t>(it->second) > limit) limit = it->second;
    }
    if (cfg.smem > limit)
      throw std::runtime_error(std::string("kvengine CUDA emulator: ") + name + " asks for " +
                               std::to_string(cfg.smem) + " bytes of dynamic shared memory but its limit is " +
                               std::to_string(limit) + " (cudaFuncSetAttribute(kernel, "
                               "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) raises it above 48 KB)");
  }
  if (g_stacks.size() < static_cast<size_t>(n)) g_stacks.resize(n);
  // exactly the bytes asked for (an overflow hits AddressSanitizer's redzone in the sanitizer build)
  struct Free {
    void operator()(unsigned char* p) const { ::operator delete(p, std::align_val_t(128)); }
  };
  std::unique_ptr<unsigned char, Free> dyn_buf(
      static_cast<unsigned char*>(::operator new(cfg.smem ? cfg.smem : 1, std::align_val_t(128))));
  unsigned char* dyn = dyn_buf.get();
  Cta c;
  c.block = cfg.block;
  c.grid = cfg.grid;
  c.nthreads = n;
  c.dyn = dyn;
  c.dyn_size = cfg.smem;
  c.kernel = name;
  const std::vector<int> order = schedule_order(n);
  std::vector<int> reversed(order.rbegin(), order.rend());
  const char* oe = std::getenv("KVENGINE_EMU_ORDER");
  const bool alternate = !oe || !*oe || std::string(oe) == "alternate";  // the default: even CTAs as `order`,
  uint64_t cta_index = 0;                                                // odd ones reversed
  g_body = &body;
  g_error = nullptr;
  g_cta = &c;
  for (unsigned z = 0; z < cfg.grid.z && !g_error; ++z)
    for (unsigned y = 0; y < cfg.grid.y && !g_error; ++y)
      for (unsigned x = 0; x < cfg.grid.x && !g_error; ++x) {
        c.bid = dim3(x, y, z);
        std::memset(dyn, 0xFF, cfg.smem);  // poison: every float read before it is written is NaN
        for (auto& kv : g_static) std::memset(kv.second.ptr, 0xFF, kv.second.bytes);
        run_cta(c, alternate && (cta_index++ & 1) ? reversed : order);
      }
  g_cta = nullptr;
  g_thread = nullptr;
  g_body = nullptr;
  ++g_launches;
  if (g_error) {
    std::exception_ptr e = g_error;
    g_error = nullptr;
    std::rethrow_exception(e);
  }
}

// ---- mma ---------------------------------------------------------------------------------------------------------------
namespace {
struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  uint32_t c[4];
};
inline float h2f(uint16_t h, bool bf16) {
  if (bf16) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
}
}  // namespace

void mma_m16n8k16_f32(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  MmaIn in;
  std::memcpy(in.a, a, 16);
  std::memcpy(in.b, b, 8);
  std::memcpy(in.c, c, 16);
  auto slot = warp_exchange(0xffffffffu, bf16 ? 0x6d6d6201u : 0x6d6d6601u, &in, sizeof in);
  const int l = lane(), g = l >> 2, t = l & 3;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int m = g + 8 * (e >> 1), n = 2 * t + (e & 1);
    double acc = 0.0;
    for (int k = 0; k < 16; ++k) {
      const MmaIn& la = *reinterpret_cast<const MmaIn*>(slot[(m & 7) * 4 + ((k & 7) >> 1)]);
      const MmaIn& lb = *reinterpret_cast<const MmaIn*>(slot[n * 4 + ((k & 7) >> 1)]);
      const uint32_t ra = la.a[(m >> 3) + 2 * (k >> 3)], rb = lb.b[k >> 3];
      const uint16_t ha = static_cast<uint16_t>(ra >> (16 * (k & 1))), hb = static_cast<uint16_t>(rb >> (16 * (k & 1)));
      acc += static_cast<double>(h2f(ha, bf16)) * static_cast<double>(h2f(hb, bf16));
    }
    out[e] = static_cast<float>(static_cast<double>(c[e]) + acc);
  }
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  MmaIn in;
  std::memcpy(in.a, a, 16);
  std::memcpy(in.b, b, 8);
  std::memcpy(in.c, c, 16);
  auto slot = warp_exchange(0xffffffffu, 0x6d6d7432u, &in, sizeof in);
  const int l = lane(), g = l >> 2, t = l & 3;
  auto tf32 = [](uint32_t u) {
    u &= 0xffffe000u;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int m = g + 8 * (e >> 1), n = 2 * t + (e & 1);
    double acc = 0.0;
    for (int k = 0; k < 8; ++k) {
      const MmaIn& la = *reinterpret_cast<const MmaIn*>(slot[(m & 7) * 4 + (k & 3)]);
      const MmaIn& lb = *reinterpret_cast<const MmaIn*>(slot[n * 4 + (k & 3)]);
      acc += static_cast<double>(tf32(la.a[(m >> 3) + 2 * (k >> 2)])) * static_cast<double>(tf32(lb.b[k >> 2]));
    }
    out[e] = static_cast<float>(static_cast<double>(c[e]) + acc);
  }
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

void mma_m16n8k256_and_popc(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const int32_t (&c)[4]) {
  MmaIn in;
  std::memcpy(in.a, a, 16);
  std::memcpy(in.b, b, 8);
  std::memcpy(in.c, c, 16);
  auto slot = warp_exchange(0xffffffffu, 0x6d6d6231u, &in, sizeof in);
  const int l = lane(), g = l >> 2, t = l & 3;
  int32_t out[4];
  for (int e = 0; e < 4; ++e) {
    const int m = g + 8 * (e >> 1), n = 2 * t + (e & 1);
    int32_t s = 0;
    for (int w = 0; w < 8; ++w) {  // 32-bit word w of the 256-bit k range
      const MmaIn& la = *reinterpret_cast<const MmaIn*>(slot[(m & 7) * 4 + (w & 3)]);
      const MmaIn& lb = *reinterpret_cast<const MmaIn*>(slot[n * 4 + (w & 3)]);
      s += __builtin_popcount(la.a[(m >> 3) + 2 * (w >> 2)] & lb.b[w >> 2]);
    }
    out[e] = c[e] + s;
  }
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

}  // namespace emu

#ifdef KVENGINE_EMU_TOOLKIT
// the runtime API functions the launchers call, as definitions of the toolkit's extern "C" declarations
#include "cuda_runtime.h"
#include "kve_emu_runtime_api.inc"
#endif
