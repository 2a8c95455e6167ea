// kvengine — one decode step of a C++ inference engine over a compressed KV cache, with the torch-free engine only.
//
//   kv_decode [bits] [dump_dir]
//
// Two sequences (B = 2) of different lengths, 8 query heads over 2 KV heads (GQA), head_dim 128, random keys with
// two outlier channels, the query heads of each GQA group leaning towards one earlier key (peaked attention).
// The cache is laid out the way quant_decode_attention reads it (kvengine/attention.h): 4 sink tokens and a recent
// window in full precision, the middle packed: keys FWHT-rotated and quantized per channel (RotateKV + KIVI), values
// per token, `bits` (2 or 4) bits, groups of 32, fp16 scales/zeros.
// Then (1) dense decode attention over the whole cache and (2) Spotlight-style retrieval: 128-bit LSH codes of the
// keys and queries, Hamming top-64 per KV head (sinks and recent window always kept), attention over those only.
// Prints the packed size, the outputs' error against exact attention and the attention mass the selection holds.
// With dump_dir, writes every input and output as raw little-endian arrays + manifest.txt ("name dtype dim0 ..."),
// which tests/test_cpp_package.py checks against the torch ops and the pure-PyTorch reference.
#include <kvengine/attention.h>
#include <kvengine/fwht.h>
#include <kvengine/parallel.h>
#include <kvengine/quant.h>
#include <kvengine/retrieval.h>

#ifdef KVENGINE_EXAMPLE_CUDA
#include <cuda_runtime.h>
#include <kvengine/cuda_ops.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

using namespace kvengine;

namespace {

constexpr int64_t B = 2, Hq = 8, Hkv = 2, D = 128;
constexpr int64_t kSink = 4, kQCap = 512, kFCap = 44;    // packed capacity (a multiple of the group), fp capacity
constexpr int64_t kL = kSink + kQCap + kFCap - kSink;    // logical positions a sequence can hold (556)
constexpr int64_t kGroup = 32, kNbits = 128, kTopk = 64, kRecent = 16;
const int32_t kQuant[B] = {512, 480};                    // packed tokens per sequence
const int32_t kRes[B] = {36, 21};                        // recent full-precision tokens per sequence

struct Dump {
  std::string dir;
  std::ofstream manifest;
  explicit Dump(std::string d) : dir(std::move(d)) {
    if (!dir.empty()) manifest.open(dir + "/manifest.txt");
  }
  template <class T>
  void operator()(const char* name, const char* dtype, const std::vector<T>& v, std::vector<int64_t> shape) {
    if (dir.empty()) return;
    std::ofstream(dir + "/" + name + ".bin", std::ios::binary)
        .write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * sizeof(T)));
    manifest << name << ' ' << dtype;
    for (int64_t s : shape) manifest << ' ' << s;
    manifest << '\n';
  }
};

// exact attention (fp64 math) of one query row over positions `pos` of one KV head ([L, D] rows); returns the
// attention weights
std::vector<double> attend_exact(const float* q, const float* k, const float* v, const std::vector<int64_t>& pos,
                                 float* out) {
  std::vector<double> s(pos.size());
  double m = -INFINITY, sum = 0;
  for (size_t i = 0; i < pos.size(); ++i) {
    double d = 0;
    for (int64_t c = 0; c < D; ++c) d += double(q[c]) * k[pos[i] * D + c];
    s[i] = d / std::sqrt(double(D));
    m = std::max(m, s[i]);
  }
  for (auto& x : s) sum += (x = std::exp(x - m));
  for (int64_t c = 0; c < D; ++c) {
    double o = 0;
    for (size_t i = 0; i < pos.size(); ++i) o += s[i] * v[pos[i] * D + c];
    out[c] = float(o / sum);
  }
  for (auto& x : s) x /= sum;
  return s;
}

double rel_err(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) num += (a[i] - ref[i]) * double(a[i] - ref[i]), den += double(ref[i]) * ref[i];
  return std::sqrt(num / den);
}


double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - b[i]));
  return m;
}

#ifdef KVENGINE_EXAMPLE_CUDA
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// a device copy of a host vector, freed with the object
template <class T>
struct DeviceBuffer {
  T* p = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) {
    check(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc");
  }
  explicit DeviceBuffer(const std::vector<T>& h) : DeviceBuffer(h.size()) {
    check(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(p); }
  std::vector<T> host() const {
    std::vector<T> h(n);
    check(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return h;
  }
};

template <class T>
size_t count_diff(const std::vector<T>& a, const std::vector<T>& b) {
  size_t d = 0;
  for (size_t i = 0; i < a.size(); ++i) d += a[i] != b[i];
  return d;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const int bits = argc > 1 ? std::atoi(argv[1]) : 4;
  if (bits != 2 && bits != 4) {
    std::fprintf(stderr, "usage: kv_decode [2|4] [dump_dir]\n");
    return 2;
  }
  Dump dump(argc > 2 ? argv[2] : "");
  std::mt19937 rng(20261207);
  std::normal_distribution<float> nd;

  // logical keys/values [B, Hkv, kL, D] (positions past a sequence's length are never read); outlier key channels
  std::vector<float> k(B * Hkv * kL * D), v(k.size()), q(B * Hq * D);
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  for (auto& x : q) x = nd(rng);
  for (int64_t i = 0; i < int64_t(k.size()); ++i)
    if (i % D == 7 || i % D == 90) k[i] = k[i] * 2.0f + 10.0f;  // large, nearly constant channels
  int64_t n_tok[B];
  for (int64_t b = 0; b < B; ++b) n_tok[b] = kSink + kQuant[b] + kRes[b];
  // the query heads of each GQA group lean towards one earlier key of their KV head: peaked attention, as in a model
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t p = int64_t(rng() % uint32_t(n_tok[b]));
      const float* kp = &k[((b * Hkv + h) * kL + p) * D];
      for (int64_t hq = h * (Hq / Hkv); hq < (h + 1) * (Hq / Hkv); ++hq)
        for (int64_t c = 0; c < D; ++c) q[(b * Hq + hq) * D + c] += 0.6f * kp[c];
    }

  // ---- build the cache ----
  const float rot = 1.0f / std::sqrt(float(D));
  QuantParams kq{bits, int(kGroup), QuantMode::PerChannel, DType::F16, 0};
  QuantParams vq{bits, int(kGroup), QuantMode::PerToken, DType::F16, 0};
  RotateParams kr{true, rot, nullptr}, vr{};
  const int64_t BH = B * Hkv, row_bytes = D * bits / 8;
  std::vector<uint8_t> k_codes(BH * kQCap * row_bytes), v_codes(k_codes.size());
  std::vector<uint16_t> k_scale(BH * (kQCap / kGroup) * D), k_zero(k_scale.size());
  std::vector<uint16_t> v_scale(BH * kQCap * (D / kGroup)), v_zero(v_scale.size());
  // the packed segment is logical positions [kSink, kSink + kQCap) of each (b, h): batch stride kL·D
  quantize_pack_cpu(k.data() + kSink * D, DType::F32, BH, kQCap, D, kL * D, D, kq, kr, k_codes.data(),
                    k_scale.data(), k_zero.data());
  quantize_pack_cpu(v.data() + kSink * D, DType::F32, BH, kQCap, D, kL * D, D, vq, vr, v_codes.data(),
                    v_scale.data(), v_zero.data());
  // full-precision slots: sinks, then the recent tokens; keys rotated like the packed ones (q is rotated too)
  std::vector<float> k_fp(BH * kFCap * D, 0.0f), v_fp(k_fp.size(), 0.0f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t s = 0; s < kSink + kRes[b]; ++s) {
        const int64_t p = s < kSink ? s : kSink + kQuant[b] + (s - kSink);
        const float* src = &k[((b * Hkv + h) * kL + p) * D];
        std::copy(src, src + D, &k_fp[((b * Hkv + h) * kFCap + s) * D]);
        std::copy(&v[((b * Hkv + h) * kL + p) * D], &v[((b * Hkv + h) * kL + p) * D] + D,
                  &v_fp[((b * Hkv + h) * kFCap + s) * D]);
      }
  fwht_cpu(k_fp.data(), k_fp.data(), DType::F32, BH * kFCap, D, D, D, rot, nullptr);  // in place
  std::vector<int32_t> lens(B * 3);
  for (int64_t b = 0; b < B; ++b) lens[b * 3] = kSink, lens[b * 3 + 1] = kQuant[b], lens[b * 3 + 2] = kRes[b];
  std::vector<float> q_rot(q.size());
  fwht_cpu(q.data(), q_rot.data(), DType::F32, B * Hq, D, D, D, rot, nullptr);

  // ---- (1) dense decode attention over the packed cache ----
  DecodeAttentionArgs a;
  a.q = q_rot.data();
  a.q_stride_b = Hq * D, a.q_stride_h = D, a.q_stride_t = D;
  std::vector<float> out(B * Hq * D), out_sparse(out.size());
  a.out = out.data();
  a.dtype = DType::F32;
  a.B = B, a.Hq = Hq, a.Hkv = Hkv, a.Tq = 1, a.D = D;
  a.softmax_scale = 1.0f / std::sqrt(float(D));
  a.k_codes = k_codes.data(), a.k_scale = k_scale.data(), a.k_zero = k_zero.data();
  a.v_codes = v_codes.data(), a.v_scale = v_scale.data(), a.v_zero = v_zero.data();
  a.meta_dtype = DType::F16;
  a.bits_k = a.bits_v = bits;
  a.k_group = a.v_group = int(kGroup);
  a.q_cap = kQCap;
  a.k_fp = k_fp.data(), a.v_fp = v_fp.data(), a.f_cap = kFCap;
  a.lens = lens.data();
  quant_decode_attention_cpu(a);

  // ---- (2) retrieval: LSH codes, Hamming top-k, attention over the selected positions ----
  const int64_t W = kNbits / 32;
  std::vector<float> proj(D * kNbits);  // random hyperplanes [D, nbits]
  for (auto& x : proj) x = nd(rng);
  auto project = [&](const std::vector<float>& x, int64_t rows) {
    std::vector<float> f(rows * kNbits, 0.0f);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < D; ++c)
        for (int64_t j = 0; j < kNbits; ++j) f[r * kNbits + j] += x[r * D + c] * proj[c * kNbits + j];
    return f;
  };
  const std::vector<float> fk = project(k, BH * kL), fq = project(q, B * Hq);
  std::vector<uint32_t> kc(BH * kL * W), qc(B * Hq * W);
  hash_sign_pack_cpu(fk.data(), BH * kL, kNbits, kNbits, kc.data());
  hash_sign_pack_cpu(fq.data(), B * Hq, kNbits, kNbits, qc.data());
  std::vector<int32_t> seq_lens(B), idx(BH * kTopk), score(idx.size());
  for (int64_t b = 0; b < B; ++b) seq_lens[b] = int32_t(n_tok[b]);
  HammingTopkArgs t;
  t.q_codes = qc.data(), t.q_stride_b = Hq * W, t.q_stride_h = W;
  t.k_codes = kc.data(), t.k_stride_b = Hkv * kL * W, t.k_stride_h = kL * W;
  t.seq_lens = seq_lens.data();
  t.B = B, t.Hq = Hq, t.Hkv = Hkv, t.N = kL, t.W = W;
  t.k = kTopk, t.sinks = kSink, t.recent = kRecent;
  t.indices = idx.data(), t.scores = score.data();
  hamming_topk_cpu(t);
  a.out = out_sparse.data();
  a.sparse = true, a.indices = idx.data(), a.n_idx = kTopk;
  quant_decode_attention_cpu(a);

  // ---- exact fp32 attention (unrotated, unquantized) for comparison ----
  std::vector<float> ref(out.size()), ref_sparse(out.size());
  const int64_t g = Hq / Hkv;
  double mass = 0;  // attention mass of the selected tokens, summed over query rows
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hq = 0; hq < Hq; ++hq) {
      const int64_t h = hq / g, off = (b * Hkv + h) * kL * D;
      std::vector<int64_t> all(n_tok[b]), sel;
      for (int64_t p = 0; p < n_tok[b]; ++p) all[p] = p;
      for (int64_t i = 0; i < kTopk; ++i)
        if (idx[(b * Hkv + h) * kTopk + i] >= 0) sel.push_back(idx[(b * Hkv + h) * kTopk + i]);
      const std::vector<double> w = attend_exact(&q[(b * Hq + hq) * D], &k[off], &v[off], all, &ref[(b * Hq + hq) * D]);
      for (int64_t p : sel) mass += w[p];
      attend_exact(&q[(b * Hq + hq) * D], &k[off], &v[off], sel, &ref_sparse[(b * Hq + hq) * D]);
    }

  // the packed segment: codes + fp16 scales/zeros, against 16 bits per value in fp16
  const double packed_bytes = double(k_codes.size() + v_codes.size()) + 2.0 * (k_scale.size() + k_zero.size() +
                                                                             v_scale.size() + v_zero.size());
  const double values = 2.0 * BH * kQCap * D;
  std::printf("kvengine torch-free CPU engine (%s): B=%lld Hq=%lld Hkv=%lld D=%lld, contexts %lld / %lld tokens\n",
              cpu_isa(), (long long)B, (long long)Hq, (long long)Hkv, (long long)D, (long long)n_tok[0],
              (long long)n_tok[1]);
  std::printf("packed segment: INT%d keys (FWHT-rotated, per channel) and values (per token), groups of %lld, fp16 "
              "scales/zeros: %.2f bits per value (fp16: 16), %.1f KiB\n", bits, (long long)kGroup,
              packed_bytes * 8 / values, packed_bytes / 1024);
  std::printf("dense decode attention: rel. error vs exact attention %.4f\n", rel_err(out, ref));
  std::printf("retrieval top-%lld (%lld sinks + %lld recent kept, %lld-bit LSH): the selected tokens hold %.3f of "
              "the exact attention mass (mean over query rows); rel. error vs exact attention over them %.4f\n",
              (long long)kTopk, (long long)kSink, (long long)kRecent, (long long)kNbits, mass / double(B * Hq),
              rel_err(out_sparse, ref_sparse));

  dump("q", "float32", q, {B, Hq, 1, D});
  dump("k", "float32", k, {B, Hkv, kL, D});
  dump("v", "float32", v, {B, Hkv, kL, D});
  dump("k_codes", "uint8", k_codes, {B, Hkv, kQCap, row_bytes});
  dump("k_scale", "float16", k_scale, {B, Hkv, kQCap / kGroup, D});
  dump("k_zero", "float16", k_zero, {B, Hkv, kQCap / kGroup, D});
  dump("v_codes", "uint8", v_codes, {B, Hkv, kQCap, row_bytes});
  dump("v_scale", "float16", v_scale, {B, Hkv, kQCap, D / kGroup});
  dump("v_zero", "float16", v_zero, {B, Hkv, kQCap, D / kGroup});
  dump("k_fp", "float32", k_fp, {B, Hkv, kFCap, D});
  dump("v_fp", "float32", v_fp, {B, Hkv, kFCap, D});
  dump("lens", "int32", lens, {B, 3});
  dump("out", "float32", out, {B, Hq, 1, D});
  dump("proj", "float32", proj, {D, kNbits});
  dump("k_hash", "int32", kc, {B, Hkv, kL, W});
  dump("q_hash", "int32", qc, {B, Hq, W});
  dump("seq_lens", "int32", seq_lens, {B});
  dump("indices", "int32", idx, {B, Hkv, kTopk});
  dump("scores", "int32", score, {B, Hkv, kTopk});
  dump("out_sparse", "float32", out_sparse, {B, Hq, 1, D});

#ifdef KVENGINE_EXAMPLE_CUDA
  // ---- the same step on the GPU with the CUDA launchers (kvengine/cuda_ops.h), checked against the CPU engine ----
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::printf("CUDA: no device here, the GPU path did not run\n");
    return 0;
  }
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  cudaStream_t st;
  check(cudaStreamCreate(&st), "cudaStreamCreate");
  bool ok = true;
  DeviceBuffer<float> dk(k), dv(v), dq(q), dq_rot(q.size());
  // the packed segment, quantized on the GPU: bit for bit the CPU's (the quantization contract)
  DeviceBuffer<uint8_t> dk_codes(k_codes.size()), dv_codes(v_codes.size());
  DeviceBuffer<uint16_t> dk_scale(k_scale.size()), dk_zero(k_zero.size()), dv_scale(v_scale.size()),
      dv_zero(v_zero.size());
  if (cuda::quantize_pack_fused_supported(DType::F32, D, kq)) {
    cuda::quantize_pack(dk.p + kSink * D, DType::F32, BH, kQCap, D, kL * D, D, kq, kr, dk_codes.p, dk_scale.p,
                        dk_zero.p, st);
  } else {  // too wide for the fused kernel: rotate into a temporary, then quantize (identical results)
    DeviceBuffer<float> tmp(BH * kQCap * D);
    for (int64_t r = 0; r < BH; ++r)
      cuda::fwht(dk.p + (r * kL + kSink) * D, tmp.p + r * kQCap * D, DType::F32, kQCap, D, D, D, rot, nullptr, st);
    cuda::quantize_pack(tmp.p, DType::F32, BH, kQCap, D, kQCap * D, D, kq, vr, dk_codes.p, dk_scale.p, dk_zero.p, st);
    check(cudaStreamSynchronize(st), "quantize_pack");
  }
  cuda::quantize_pack(dv.p + kSink * D, DType::F32, BH, kQCap, D, kL * D, D, vq, vr, dv_codes.p, dv_scale.p,
                      dv_zero.p, st);
  cuda::fwht(dq.p, dq_rot.p, DType::F32, B * Hq, D, D, D, rot, nullptr, st);
  check(cudaStreamSynchronize(st), "quantize_pack / fwht");
  const size_t qdiff = count_diff(dk_codes.host(), k_codes) + count_diff(dv_codes.host(), v_codes) +
                       count_diff(dk_scale.host(), k_scale) + count_diff(dk_zero.host(), k_zero) +
                       count_diff(dv_scale.host(), v_scale) + count_diff(dv_zero.host(), v_zero);
  const double fdiff = max_abs_diff(dq_rot.host(), q_rot);
  ok = ok && qdiff == 0 && fdiff < 1e-5;

  // dense decode attention (split-K: a workspace sized from the shapes only)
  DeviceBuffer<float> dk_fp(k_fp), dv_fp(v_fp), dout(out.size()), dout_sparse(out.size());
  DeviceBuffer<int32_t> dlens(lens), dseq(seq_lens), didx(idx.size()), dscore(idx.size());
  DecodeAttentionArgs ga = a;
  ga.q = dq_rot.p, ga.out = dout.p;
  ga.k_codes = dk_codes.p, ga.k_scale = dk_scale.p, ga.k_zero = dk_zero.p;
  ga.v_codes = dv_codes.p, ga.v_scale = dv_scale.p, ga.v_zero = dv_zero.p;
  ga.k_fp = dk_fp.p, ga.v_fp = dv_fp.p, ga.lens = dlens.p;
  ga.sparse = false, ga.indices = nullptr, ga.n_idx = 0;
  DeviceBuffer<uint8_t> ws(cuda::quant_decode_attention_workspace_bytes(ga));
  cuda::quant_decode_attention(ga, ws.p, st);

  // retrieval: hash_encode (projection + sign packing in one kernel), Hamming top-k, sparse attention
  DeviceBuffer<float> dproj(proj);
  DeviceBuffer<uint32_t> dkc(kc.size()), dqc(qc.size());
  HashEncodeArgs he;
  he.dtype = DType::F32, he.w1 = dproj.p, he.per_head = false, he.nbits = int(kNbits), he.D = D;
  he.x = dk.p, he.O = B, he.H = Hkv, he.T = kL;
  he.x_stride_o = Hkv * kL * D, he.x_stride_h = kL * D, he.x_stride_t = D;
  he.codes = dkc.p;
  cuda::hash_encode(he, st);
  he.x = dq.p, he.H = Hq, he.T = 1, he.x_stride_o = Hq * D, he.x_stride_h = D, he.codes = dqc.p;
  cuda::hash_encode(he, st);
  HammingTopkArgs gt = t;
  gt.q_codes = dqc.p, gt.k_codes = dkc.p, gt.seq_lens = dseq.p, gt.indices = didx.p, gt.scores = dscore.p;
  DeviceBuffer<uint8_t> tws(cuda::hamming_topk_workspace_bytes(gt));
  cuda::hamming_topk(gt, tws.p, st);
  ga.out = dout_sparse.p, ga.sparse = true, ga.indices = didx.p, ga.n_idx = kTopk;
  DeviceBuffer<uint8_t> sws(cuda::quant_decode_attention_workspace_bytes(ga));
  cuda::quant_decode_attention(ga, sws.p, st);
  check(cudaStreamSynchronize(st), "decode attention / retrieval");

  const double ddiff = max_abs_diff(dout.host(), out);
  // the hash bits may differ from the CPU's where a projection is within rounding of zero (summation order)
  const std::vector<uint32_t> gkc = dkc.host(), gqc = dqc.host();
  size_t bit_diff = 0;
  for (size_t i = 0; i < kc.size(); ++i) bit_diff += size_t(__builtin_popcount(gkc[i] ^ kc[i]));
  for (size_t i = 0; i < qc.size(); ++i) bit_diff += size_t(__builtin_popcount(gqc[i] ^ qc[i]));
  const double bit_total = 32.0 * double(kc.size() + qc.size());
  // top-k and sparse attention checked against the CPU engine on the GPU's codes
  std::vector<int32_t> cidx(idx.size()), cscore(idx.size());
  HammingTopkArgs ct = t;
  ct.q_codes = gqc.data(), ct.k_codes = gkc.data(), ct.indices = cidx.data(), ct.scores = cscore.data();
  hamming_topk_cpu(ct);
  const std::vector<int32_t> gidx = didx.host();
  const size_t tdiff = count_diff(gidx, cidx) + count_diff(dscore.host(), cscore);
  std::vector<float> cout_sparse(out.size());
  DecodeAttentionArgs ca = a;
  ca.out = cout_sparse.data(), ca.indices = gidx.data();
  quant_decode_attention_cpu(ca);
  const double sdiff = max_abs_diff(dout_sparse.host(), cout_sparse);
  ok = ok && ddiff < 1e-4 && bit_diff < bit_total * 1e-3 && tdiff == 0 && sdiff < 1e-4;
  std::printf("CUDA (%s): packed cache %s the CPU's (%zu values differ); fwht max |diff| %.2e; dense attention max "
              "|diff| %.2e; hash bits differing %zu of %.0f; top-k %s the CPU's on the same codes; sparse attention "
              "max |diff| %.2e -> %s\n", prop.name, qdiff ? "differs from" : "equals", qdiff, fdiff, ddiff, bit_diff,
              bit_total, tdiff ? "differs from" : "equals", sdiff, ok ? "OK" : "MISMATCH");
  cudaStreamDestroy(st);
  return ok ? 0 : 1;
#else
  return 0;
#endif
}
