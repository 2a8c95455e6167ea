// kvengine — C++ microbenchmarks of the torch-free engine (CPU): fwht vs memcpy, quantize_pack,
// quant_decode_attention (exact, and with qk_int8) vs a plain fp32 attention over the same tokens, binary attention
// at decode (split path vs the tile path).  Runs on std::thread workers (kvengine's default parallel-for), so numbers
// are comparable with each other, not with torch's pool.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "kvengine/attention.h"
#include "kvengine/binary_attention.h"
#include "kvengine/fwht.h"
#include "kvengine/quant.h"

using namespace kvengine;

static std::vector<float> randn(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

static void BM_memcpy(benchmark::State& st) {
  const int64_t n = st.range(0), rows = (int64_t(32) << 20) / (n * 4);
  auto x = randn(size_t(rows * n), 1);
  std::vector<float> y(x.size());
  for (auto _ : st) {
    std::memcpy(y.data(), x.data(), x.size() * 4);
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(st.iterations() * int64_t(x.size()) * 8);
}
BENCHMARK(BM_memcpy)->Arg(128)->UseRealTime();

static void BM_fwht(benchmark::State& st) {
  const int64_t n = st.range(0), rows = (int64_t(32) << 20) / (n * 4);
  auto x = randn(size_t(rows * n), 1);
  for (auto _ : st) {
    fwht_cpu(x.data(), x.data(), DType::F32, rows, n, n, n, 1.0f / std::sqrt(float(n)), nullptr);  // in place
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(st.iterations() * rows * n * 8);
}
BENCHMARK(BM_fwht)->Arg(64)->Arg(128)->Arg(256)->Arg(1024)->Arg(8192)->UseRealTime();

static void BM_quantize_pack(benchmark::State& st) {
  const int64_t T = 8192, D = 128, batch = 8;
  const int bits = int(st.range(0));
  const bool rotate = st.range(1) != 0;
  auto x = randn(size_t(batch * T * D), 2);
  std::vector<uint8_t> codes(size_t(batch * T * D * bits / 8));
  std::vector<uint16_t> s(size_t(batch * T * D / 32)), z(s.size());
  QuantParams qp;
  qp.bits = bits;
  qp.group_size = 32;
  qp.mode = QuantMode::PerChannel;
  qp.meta_dtype = DType::F16;
  RotateParams rp;
  rp.enabled = rotate;
  rp.scale = 1.0f / std::sqrt(float(D));
  for (auto _ : st) {
    quantize_pack_cpu(x.data(), DType::F32, batch, T, D, T * D, D, qp, rp, codes.data(), s.data(), z.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(st.iterations() * int64_t(x.size()) * 4);
}
BENCHMARK(BM_quantize_pack)->Args({2, 0})->Args({4, 0})->Args({2, 1})->UseRealTime();

// decode step: B=1, Hkv=8, GQA 4:1, D=128, context N; packed INT2/INT4 vs fp32 single-pass attention
struct DecodeSetup {
  int64_t H = 8, g = 4, D = 128, N, G = 32;
  int bits;
  std::vector<float> q, out, fp;
  std::vector<uint8_t> kc, vc;
  std::vector<uint16_t> ks, kz, vs, vz;
  int32_t lens[3];
  DecodeAttentionArgs a;
  DecodeSetup(int64_t n, int b) : N(n), bits(b) {
    auto k = randn(size_t(H * N * D), 3), v = randn(size_t(H * N * D), 4);
    q = randn(size_t(H * g * D), 5);
    out.resize(q.size());
    fp.assign(size_t(H * 8 * D), 0.f);
    kc.resize(size_t(H * N * D * bits / 8));
    vc.resize(kc.size());
    ks.resize(size_t(H * N / G * D));
    kz.resize(ks.size());
    vs.resize(size_t(H * N * D / 32));
    vz.resize(vs.size());
    QuantParams qp;
    qp.bits = bits;
    qp.group_size = int(G);
    qp.meta_dtype = DType::F16;
    qp.mode = QuantMode::PerChannel;
    quantize_pack_cpu(k.data(), DType::F32, H, N, D, N * D, D, qp, RotateParams{}, kc.data(), ks.data(), kz.data());
    qp.mode = QuantMode::PerToken;
    quantize_pack_cpu(v.data(), DType::F32, H, N, D, N * D, D, qp, RotateParams{}, vc.data(), vs.data(), vz.data());
    lens[0] = 0;
    lens[1] = int32_t(N);
    lens[2] = 0;
    a.q = q.data();
    a.q_stride_b = H * g * D;
    a.q_stride_h = D;
    a.q_stride_t = D;
    a.out = out.data();
    a.B = 1;
    a.Hq = H * g;
    a.Hkv = H;
    a.D = D;
    a.softmax_scale = 1.0f / std::sqrt(float(D));
    a.k_codes = kc.data();
    a.k_scale = ks.data();
    a.k_zero = kz.data();
    a.v_codes = vc.data();
    a.v_scale = vs.data();
    a.v_zero = vz.data();
    a.meta_dtype = DType::F16;
    a.bits_k = a.bits_v = bits;
    a.k_group = int(G);
    a.v_group = 32;
    a.q_cap = N;
    a.k_fp = fp.data();
    a.v_fp = fp.data();
    a.f_cap = 8;
    a.lens = lens;
  }
};

// args: context, bits, qk_int8 (the packed keys scored with int8 queries)
static void BM_quant_decode_attention(benchmark::State& st) {
  DecodeSetup s(st.range(0), int(st.range(1)));
  s.a.qk_int8 = st.range(2) != 0;
  for (auto _ : st) {
    quant_decode_attention_cpu(s.a);
    benchmark::ClobberMemory();
  }
  // seconds per token and KV head (the console prints e.g. "44n"; JSON carries seconds)
  st.counters["s_per_token_head"] =
      benchmark::Counter(double(s.N * s.H), benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_quant_decode_attention)
    ->Args({4096, 2, 0})->Args({4096, 2, 1})->Args({32768, 2, 0})->Args({32768, 2, 1})->Args({32768, 4, 0})
    ->Args({32768, 4, 1})->UseRealTime();

// the same decode step over fp32 K/V held as the engine's full-precision segment (the fp baseline, same code path)
static void BM_fp32_decode_attention(benchmark::State& st) {
  const int64_t N = st.range(0);
  DecodeSetup s(32, 2);
  std::vector<float> k = randn(size_t(s.H * N * s.D), 6), v = randn(size_t(s.H * N * s.D), 7);
  s.lens[0] = 0;
  s.lens[1] = 0;
  s.lens[2] = int32_t(N);
  s.a.k_fp = k.data();
  s.a.v_fp = v.data();
  s.a.f_cap = N;
  for (auto _ : st) {
    quant_decode_attention_cpu(s.a);
    benchmark::ClobberMemory();
  }
  // seconds per token and KV head (the console prints e.g. "44n"; JSON carries seconds)
  st.counters["s_per_token_head"] =
      benchmark::Counter(double(N * s.H), benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_fp32_decode_attention)->Arg(4096)->Arg(32768)->UseRealTime();

// binary attention decode over a cache of 1-bit keys: one query token, 32 query / 8 KV heads, D = 128, fp32 V;
// path 1 = the split path (the default for decode), 0 = the tile path forced (KVENGINE_BINARY_CPU_SPLIT=0)
static void BM_binary_attention_decode(benchmark::State& st) {
  const int64_t N = st.range(0), H = 8, g = 4, D = 128;
  auto k = randn(size_t(H * N * D), 8), v = randn(size_t(H * N * D), 9), q = randn(size_t(H * g * D), 10);
  std::vector<uint32_t> bits(size_t(H * N * D / 32));
  std::vector<float> scale(size_t(H * N)), out(q.size());
  sign_pack_cpu(k.data(), DType::F32, H, N, D, N * D, D, true, bits.data(), scale.data());
  BinaryAttentionArgs a;
  a.q = q.data();
  a.q_stride_b = H * g * D;
  a.q_stride_h = D;
  a.q_stride_t = D;
  a.k_bits = bits.data();
  a.k_scale = scale.data();
  a.v = v.data();
  a.v_stride_b = H * N * D;
  a.v_stride_h = N * D;
  a.v_stride_t = D;
  a.out = out.data();
  a.B = 1;
  a.Hq = H * g;
  a.Hkv = H;
  a.Lq = 1;
  a.Lk = N;
  a.D = D;
  a.softmax_scale = 1.0f / std::sqrt(float(D));
  setenv("KVENGINE_BINARY_CPU_SPLIT", st.range(1) ? "1" : "0", 1);
  for (auto _ : st) {
    binary_attention_cpu(a);
    benchmark::ClobberMemory();
  }
  unsetenv("KVENGINE_BINARY_CPU_SPLIT");
  st.SetBytesProcessed(st.iterations() * (int64_t(v.size()) * 4 + int64_t(bits.size()) * 4 + int64_t(scale.size()) * 4));
}
BENCHMARK(BM_binary_attention_decode)->Args({4096, 1})->Args({4096, 0})->Args({32768, 1})->Args({32768, 0})->UseRealTime();

BENCHMARK_MAIN();
