"""Hash-based top-k KV retrieval: hash_encode, hamming_topk, sparse_decode_attention vs the reference; the code cache,
RetrievalAttention and hash training."""
import pytest
import torch
import torch.nn.functional as F

import kvengine
from kvengine import ops
from kvengine import reference as ref
from kvengine import retrieval

from conftest import DEVICES, GPU_DEVICES, HAS_CUDA, assert_rows_close, outlier_randn


def rand_codes(*shape, gen):
    return torch.randint(-2**31, 2**31 - 1, shape, generator=gen, dtype=torch.int64).to(torch.int32)


def low_entropy_codes(*shape, gen):
    """Codes with few distinct values (many exact score ties)."""
    base = torch.randint(-2**31, 2**31 - 1, (3, shape[-1]), generator=gen, dtype=torch.int64).to(torch.int32)
    pick = torch.randint(0, 3, shape[:-1], generator=gen)
    return base[pick]


def hash_weights(H, D, nbits, mlp, gen, shared=False):
    lead = () if shared else (H,)
    w1 = torch.randn(*lead, D, nbits, generator=gen)
    b1 = torch.randn(*lead, nbits, generator=gen) * 0.5
    if not mlp:
        return w1, b1, None, None
    w2 = torch.randn(*lead, nbits, nbits, generator=gen) / nbits ** 0.5
    b2 = torch.randn(*lead, nbits, generator=gen) * 0.5
    return w1, b1, w2, b2


def bits_of(codes):
    return ref.unpack_signs(codes) < 0  # unpack_signs: bit set -> -1


# ---- hash_encode ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nbits", [32, 64, 128, 256])
@pytest.mark.parametrize("mlp", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hash_encode_matches_reference(device, nbits, mlp, dtype, gen):
    B, H, T, D = 2, 3, 37, 64
    x = outlier_randn(B, H, T, D, generator=gen).to(dtype)
    w = hash_weights(H, D, nbits, mlp, gen)
    codes = ops.hash_encode(x.to(device), *[None if t is None else t.to(device) for t in w], nbits=nbits)
    assert codes.shape == (B, H, T, nbits // 32) and codes.dtype == torch.int32
    f = ref.hash_project(x, *w)
    expect = ref.hash_encode(x, *w)
    # bit-exact away from ties at 0 (the kernels sum in fp32, the reference in fp64)
    clear = f.abs() > 1e-3 * f.abs().amax(-1, keepdim=True)
    got, exp = bits_of(codes.cpu()), bits_of(expect)
    assert torch.equal(got[clear], exp[clear])
    assert clear.float().mean() > 0.95


@pytest.mark.parametrize("device", DEVICES)
def test_hash_encode_shared_weights_and_strides(device, gen):
    x = torch.randn(4, 10, 6, 32, generator=gen).transpose(1, 2)  # [4, 6, 10, 32], strided
    w1, b1, w2, b2 = hash_weights(1, 32, 64, True, gen, shared=True)
    dev = lambda t: t.to(device)  # noqa: E731
    codes = ops.hash_encode(dev(x), dev(w1), dev(b1), dev(w2), dev(b2))
    f = ref.hash_project(x, w1, b1, w2, b2)
    clear = f.abs() > 1e-4 * f.abs().amax(-1, keepdim=True)
    assert torch.equal(bits_of(codes.cpu())[clear], bits_of(ref.hash_encode(x, w1, b1, w2, b2))[clear])
    # linear hash: codes of x @ w1 directly
    c2 = ops.hash_encode(dev(x), dev(w1))
    f2 = ref.hash_project(x, w1)
    clear2 = f2.abs() > 1e-4 * f2.abs().amax(-1, keepdim=True)  # a sign at |f| ~ 0 may differ by summation order
    assert torch.equal(bits_of(c2.cpu())[clear2], bits_of(ref.hash_encode(x, w1))[clear2])


def test_hash_encode_mlp_zero_w2_is_linear(gen):
    x = torch.randn(1, 2, 9, 64, generator=gen)
    w1, b1, _, _ = hash_weights(2, 64, 128, False, gen)
    z = torch.zeros(2, 128, 128)
    assert torch.equal(ops.hash_encode(x, w1, b1, z), ops.hash_encode(x, w1, b1))


# ---- hamming_topk ----------------------------------------------------------------------------------------------------
TOPK_CASES = [
    # B, Hq, Hkv, N, W, k, seq_lens, keep
    (1, 1, 1, 100, 4, 10, None, None),
    (2, 8, 2, 3000, 4, 64, None, None),              # GQA 4
    (2, 6, 3, 20000, 2, 257, [20000, 9001], None),   # varlen, several chunks
    (3, 4, 4, 500, 1, 100, [500, 37, 0], (4, 16)),   # keep, short + empty sequence
    (1, 32, 8, 17000, 4, 1024, [16999], (4, 64)),    # the decode layout
    (2, 2, 1, 700, 8, 700, [700, 300], (3, 5)),      # k == N (clamped per sequence), 256-bit codes
    (1, 64, 1, 5000, 4, 300, None, (2, 3)),          # the widest score range (g · nbits = 8192: 8193 bins)
    (1, 2, 1, 1_100_000, 2, 512, [1_050_001], (1, 7)),  # > 2^20 positions: CUDA chunks of 4352, not 4096
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", TOPK_CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_hamming_topk_matches_brute_force(device, case, ties, gen):
    B, Hq, Hkv, N, W, k, lens, keep = case
    make = low_entropy_codes if ties else rand_codes
    qc, kc = make(B, Hq, 1, W, gen=gen), make(B, Hkv, N, W, gen=gen)
    sl = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    idx, scr = ops.hamming_topk(qc.to(device), kc.to(device), k, None if sl is None else sl.to(device), keep)
    ridx, rscr = ref.hamming_topk(qc, kc, k, sl, keep)
    assert idx.shape == (B, Hkv, k) and idx.dtype == torch.int32 and scr.dtype == torch.int32
    # exact: same multiset of scores, same tie rule (lower index first) -> identical indices
    assert torch.equal(torch.sort(scr.cpu(), -1).values, torch.sort(rscr, -1).values)
    assert torch.equal(idx.cpu(), ridx)
    assert torch.equal(scr.cpu(), rscr)


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("mma", ["0", "1"])
@pytest.mark.parametrize("case", [
    # B, Hq, Hkv, N, W, k, seq_lens, keep
    (2, 24, 2, 3001, 8, 129, [3001, 1500], (1, 2)),  # g = 12: two head groups, two 128-bit halves
    (1, 9, 1, 999, 1, 77, None, None),                # g = 9, 32-bit codes
    (1, 16, 2, 4097, 2, 400, None, (0, 33)),          # g = 8 (registers), a chunk of one position
])
def test_hamming_topk_score_kernels(device, mma, case, gen, monkeypatch):
    """Both CUDA score kernels (KVENGINE_TOPK_MMA=1: b1 AND+popc MMA, the default on sm_80+; 0: POPC on the CUDA
    cores) against the reference, with ties."""
    monkeypatch.setenv("KVENGINE_TOPK_MMA", mma)
    B, Hq, Hkv, N, W, k, lens, keep = case
    for make in (rand_codes, low_entropy_codes):
        qc, kc = make(B, Hq, 1, W, gen=gen), make(B, Hkv, N, W, gen=gen)
        sl = None if lens is None else torch.tensor(lens, dtype=torch.int32)
        idx, scr = ops.hamming_topk(qc.to(device), kc.to(device), k, None if sl is None else sl.to(device), keep)
        ridx, rscr = ref.hamming_topk(qc, kc, k, sl, keep)
        assert torch.equal(idx.cpu(), ridx) and torch.equal(scr.cpu(), rscr)


def test_hamming_topk_strided_cache_view(gen):
    kc = rand_codes(2, 4, 5000, 4, gen=gen)
    qc = rand_codes(2, 8, 4, gen=gen)
    view = kc[:, :, :3000]  # a view into a capacity buffer (non-contiguous batch/head strides)
    idx, scr = ops.hamming_topk(qc, view, 200)
    ridx, rscr = ref.hamming_topk(qc, view.contiguous(), 200)
    assert torch.equal(idx, ridx) and torch.equal(scr, rscr)


# ---- sparse_decode_attention -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(1, 1, 1, 64, 300, 50), (2, 32, 8, 128, 2000, 256), (2, 6, 2, 64, 513, 513),
                                  (1, 4, 2, 256, 100, 7)])
def test_sparse_attention_matches_sdpa(device, dtype, case, gen):
    B, Hq, Hkv, D, N, n = case
    q = outlier_randn(B, Hq, 1, D, generator=gen).to(dtype) * 0.2
    k = outlier_randn(B, Hkv, N, D, generator=gen).to(dtype) * 0.2
    v = outlier_randn(B, Hkv, N, D, generator=gen).to(dtype)
    idx = torch.stack([torch.stack([torch.randperm(N, generator=gen)[:n] for _ in range(Hkv)]) for _ in range(B)])
    dv = lambda t: t.to(device)  # noqa: E731
    out = ops.sparse_decode_attention(dv(q), dv(k), dv(v), dv(idx.to(torch.int32)))
    assert out.shape == q.shape and out.dtype == dtype
    # SDPA on the gathered tokens, in float64 (fp32 SDPA itself is ~5e-6 off on these heavy-tailed logits, and fp32
    # kernels ~1e-5: the fp32 bound is on the distance to the exact result)
    g = Hq // Hkv
    kg = torch.gather(k.double(), 2, idx[..., None].expand(-1, -1, -1, D)).repeat_interleave(g, 1)
    vg = torch.gather(v.double(), 2, idx[..., None].expand(-1, -1, -1, D)).repeat_interleave(g, 1)
    expect = torch.nn.functional.scaled_dot_product_attention(q.double(), kg, vg)
    tol = {torch.float32: 3e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert_rows_close(out.float(), expect, tol)


@pytest.mark.parametrize("D", [8, 17, 40, 100, 264, 1000])
def test_sparse_attention_any_head_dim_cpu(D, gen):
    """The CPU kernel takes any head_dim <= 1024: rows are padded to whole 16-float vectors in L1 (the padding must
    stay out of the scores and the output), and head sizes past 256 take the run-time-width block code."""
    B, Hq, Hkv, N, n = 2, 6, 2, 333, 70
    q = outlier_randn(B, Hq, 1, D, generator=gen) * 0.2
    k = outlier_randn(B, Hkv, N, D, generator=gen) * 0.2
    v = outlier_randn(B, Hkv, N, D, generator=gen)
    idx = torch.stack([torch.stack([torch.randperm(N, generator=gen)[:n] for _ in range(Hkv)]) for _ in range(B)])
    out = ops.sparse_decode_attention(q, k, v, idx.to(torch.int32))
    g = Hq // Hkv
    kg = torch.gather(k.double(), 2, idx[..., None].expand(-1, -1, -1, D)).repeat_interleave(g, 1)
    vg = torch.gather(v.double(), 2, idx[..., None].expand(-1, -1, -1, D)).repeat_interleave(g, 1)
    assert_rows_close(out, torch.nn.functional.scaled_dot_product_attention(q.double(), kg, vg), 3e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_attention_padding_varlen_int64(device, gen):
    B, Hq, Hkv, D, N = 3, 4, 2, 64, 400
    q, k, v = (torch.randn(B, Hq, 1, D, generator=gen), torch.randn(B, Hkv, N, D, generator=gen),
               torch.randn(B, Hkv, N, D, generator=gen))
    idx = torch.randint(0, N, (B, Hkv, 64), generator=gen)
    idx[:, :, 50:] = -1
    sl = torch.tensor([400, 200, 0], dtype=torch.int32)
    dv = lambda t: t.to(device)  # noqa: E731
    out = ops.sparse_decode_attention(dv(q), dv(k), dv(v), dv(idx), dv(sl), 0.3)
    expect = ref.sparse_decode_attention(q, k, v, idx, sl, 0.3)
    assert torch.equal(out[2].cpu(), torch.zeros_like(out[2].cpu()))  # no valid index -> 0
    assert_rows_close(out[:2].float(), expect[:2].float(), 1e-5)
    # a strided view of a capacity buffer
    kb, vb = torch.randn(B, Hkv, 2 * N, D, generator=gen), torch.randn(B, Hkv, 2 * N, D, generator=gen)
    out2 = ops.sparse_decode_attention(dv(q), dv(kb[:, :, :N]), dv(vb[:, :, :N]), dv(idx), dv(sl))
    assert_rows_close(out2[:2].float(), ref.sparse_decode_attention(q, kb[:, :, :N], vb[:, :, :N], idx, sl)[:2], 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_attention_over_an_empty_cache_is_zero(device, gen):
    q = torch.randn(2, 4, 1, 64, generator=gen).to(device)
    k = torch.empty(2, 2, 0, 64, device=device)  # no storage at all: nothing may be read
    idx = torch.tensor([[[0, -1, 3]] * 2] * 2, dtype=torch.int32, device=device)
    out = ops.sparse_decode_attention(q, k, k.clone(), idx)
    assert out.shape == q.shape and torch.equal(out.cpu(), torch.zeros(2, 4, 1, 64))


# ---- opcheck -----------------------------------------------------------------------------------------------------------
def _opcheck_args(device, gen):
    x = torch.randn(2, 4, 3, 64, generator=gen)
    w = hash_weights(4, 64, 128, True, gen)
    qc, kc = rand_codes(2, 8, 1, 4, gen=gen), rand_codes(2, 4, 300, 4, gen=gen)
    q, k, v = (torch.randn(2, 8, 1, 64, generator=gen), torch.randn(2, 4, 300, 64, generator=gen),
               torch.randn(2, 4, 300, 64, generator=gen))
    idx = torch.randint(-1, 300, (2, 4, 40), generator=gen, dtype=torch.int32)
    sl = torch.tensor([300, 120], dtype=torch.int32)
    dv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [dv(t) for t in (x, *w)], dv(qc), dv(kc), dv(sl), dv(q), dv(k), dv(v), dv(idx)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    (x, w1, b1, w2, b2), qc, kc, sl, q, k, v, idx = _opcheck_args(device, gen)
    torch.library.opcheck(torch.ops.kvengine.hash_encode.default, (x, w1, b1, w2, b2, 128))
    torch.library.opcheck(torch.ops.kvengine.hash_encode.default, (x, w1, None, None, None, None))
    torch.library.opcheck(torch.ops.kvengine.hamming_topk.default, (qc, kc, 50, sl, [4, 8]))
    torch.library.opcheck(torch.ops.kvengine.hamming_topk.default, (qc, kc, 50, None, None))
    torch.library.opcheck(torch.ops.kvengine.sparse_decode_attention.default, (q, k, v, idx, sl, None))
    torch.library.opcheck(torch.ops.kvengine.sparse_decode_attention.default, (q, k, v, idx.long(), None, 0.5))


# ---- bad inputs ----------------------------------------------------------------------------------------------------------
def test_bad_inputs(gen):
    x = torch.randn(1, 2, 3, 64)
    w1 = torch.randn(2, 64, 128)
    with pytest.raises(ValueError, match=r"nbits \(last dim of w1\) must be 32, 64, 128 or 256"):
        ops.hash_encode(x, torch.randn(2, 64, 96))
    with pytest.raises(ValueError, match=r"x's head dim .* must equal dim 0 of w1"):
        ops.hash_encode(x, torch.randn(3, 64, 128))
    with pytest.raises(ValueError, match=r"last dim of x \(64\) must equal dim -2 of w1 \(32\)"):
        ops.hash_encode(x, torch.randn(2, 32, 128))
    with pytest.raises(ValueError, match=r"w2 must have shape \[2, 128, 128\]"):
        ops.hash_encode(x, w1, None, torch.randn(2, 128, 64))
    with pytest.raises(ValueError, match=r"b2 given without w2"):
        ops.hash_encode(x, w1, None, None, torch.randn(2, 128))
    with pytest.raises(ValueError, match=r"x must be float32, float16 or bfloat16"):
        ops.hash_encode(x.to(torch.int32), w1)
    with pytest.raises(ValueError, match=r"nbits \(64\) does not match"):
        ops.hash_encode(x, w1, nbits=64)

    qc, kc = rand_codes(1, 8, 1, 4, gen=gen), rand_codes(1, 2, 100, 4, gen=gen)
    with pytest.raises(ValueError, match=r"k \(101\) must be in \[1, N\] where N = 100"):
        ops.hamming_topk(qc, kc, 101)
    with pytest.raises(ValueError, match=r"code width mismatch: k_codes has 2 words per code, q_codes has 4"):
        ops.hamming_topk(qc, rand_codes(1, 2, 100, 2, gen=gen), 10)
    with pytest.raises(ValueError, match=r"k_codes must be int32"):
        ops.hamming_topk(qc, kc.to(torch.int64), 10)
    with pytest.raises(ValueError, match=r"q_codes must be int32"):
        ops.hamming_topk(qc.float(), kc, 10)
    with pytest.raises(ValueError, match=r"query head count Hq \(8\) must be a multiple of the KV head count Hkv \(3\)"):
        ops.hamming_topk(qc, rand_codes(1, 3, 100, 4, gen=gen), 10)
    with pytest.raises(ValueError, match=r"keep = \(8, 8\) must be non-negative with sinks \+ recent <= k \(10\)"):
        ops.hamming_topk(qc, kc, 10, keep=(8, 8))
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 101 must be in \[0, 100\]"):
        ops.hamming_topk(qc, kc, 10, torch.tensor([101], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"seq_lens must have shape \[B\]"):
        ops.hamming_topk(qc, kc, 10, torch.tensor([10, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(Hq / Hkv\) · nbits must be <= 8192"):
        ops.hamming_topk(rand_codes(1, 64, 8, gen=gen), rand_codes(1, 1, 100, 8, gen=gen), 10)

    q, k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64)
    idx = torch.zeros(1, 2, 10, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"indices must be int32 or int64"):
        ops.sparse_decode_attention(q, k, v, idx.float())
    with pytest.raises(ValueError, match=r"k must have q's dtype"):
        ops.sparse_decode_attention(q, k.half(), v, idx)
    with pytest.raises(ValueError, match=r"q must be \[B, Hq, 1, D\]"):
        ops.sparse_decode_attention(torch.randn(1, 8, 2, 64), k, v, idx)
    with pytest.raises(ValueError, match=r"indices must be \[B, Hkv, n\] = \[1, 2, n\]"):
        ops.sparse_decode_attention(q, k, v, idx[:, :1])
    with pytest.raises(ValueError, match=r"v must have k's shape"):
        ops.sparse_decode_attention(q, k, v[:, :, :50], idx)


# ---- HashCodeCache / RetrievalAttention --------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_code_cache_incremental_equals_bulk(device, gen):
    Hkv, D, nbits = 2, 64, 128
    hasher = retrieval.SpotlightHash.random(Hkv, D, nbits, mlp=True, generator=gen).to(device)
    k = torch.randn(2, Hkv, 300, D, generator=gen).to(device)
    cache = retrieval.HashCodeCache(hasher, batch_size=2, device=device, capacity=64)
    cache.append(k[:, :, :250])
    for t in range(250, 300):
        cache.append(k[:, :, t:t + 1])
    assert cache.seq_len == 300
    # on CUDA the single-token appends take the CUDA-core kernel and the bulk call the tensor-core one: a sign at
    # |f| ~ 0 may differ between them, every other bit must not
    f = ref.hash_project(k.cpu(), *[None if w is None else w.cpu() for w in hasher.weights()])
    clear = f.abs() > 1e-4 * f.abs().amax(-1, keepdim=True)
    assert torch.equal(bits_of(cache.codes.cpu())[clear], bits_of(ops.hash_encode(k, *hasher.weights()).cpu())[clear])
    assert clear.float().mean() > 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_retrieval_attention_exact_when_k_covers_context(device, gen):
    B, Hkv, g, D, N = 2, 2, 4, 64, 200
    hasher = retrieval.SpotlightHash.random(Hkv, D, 64, generator=gen).to(device)
    ra = retrieval.RetrievalAttention(hasher, num_kv_heads=Hkv, head_dim=D, top_k=N, sinks=4, recent=16,
                                      batch_size=B, device=device)
    k, v = torch.randn(B, Hkv, N, D, generator=gen).to(device), torch.randn(B, Hkv, N, D, generator=gen).to(device)
    q = torch.randn(B, Hkv * g, 1, D, generator=gen).to(device)
    ra.append(k, v)
    out = ra.attend(q)
    full = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
    assert_rows_close(out, full, 1e-5)
    # smaller k: the selection matches the ops composition
    ra.top_k = 32
    out32 = ra.attend(q)
    idx, _ = ops.hamming_topk(hasher.encode_queries(q), ra.codes.codes, 32, keep=(4, 16))
    assert_rows_close(out32, ops.sparse_decode_attention(q, k, v, idx), 1e-6)


def _synthetic(H=2, D=32, N=512, NQ=64, seed=0, sink_logit=0.0):
    """Queries/keys sharing a few "important" directions; ``sink_logit`` > 0 adds attention sinks (keys 0..3 get a
    direction every query points at)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(H, D, D, generator=g)
    k = torch.randn(H, N, D, generator=g) @ basis * 0.3
    q = torch.randn(H, NQ, D, generator=g) @ basis * 0.3
    if sink_logit:
        c = torch.randn(H, 1, D, generator=g)
        c = c / c.norm(dim=-1, keepdim=True)
        a = (sink_logit * D ** 0.5) ** 0.5  # q·k/√D gains sink_logit on the sinks
        q = q + c * a
        k[:, :4] += c * a
    return q, k, q @ k.transpose(-1, -2) / D ** 0.5


def test_train_hash_improves_recall(tmp_path):
    # trained from the LSH it is compared with (same seed), selected on a held-out query set: must beat it
    q, k, scores = _synthetic()
    g = torch.Generator().manual_seed(7)
    qv = q[:, :16] + 0.05 * torch.randn(q[:, :16].shape, generator=g)
    sv = qv @ k.transpose(-1, -2) / k.shape[-1] ** 0.5
    hasher, info = retrieval.train_hash(q, k, scores, nbits=32, steps=80, lr=3e-2, queries_per_step=16, seed=0,
                                        val=(qv, k, sv), return_info=True)
    lsh = retrieval.SpotlightHash.random(2, 32, 32, generator=torch.Generator().manual_seed(0))
    r_tr = retrieval.topk_recall(hasher, q, k, scores, top_k=32)
    r_lsh = retrieval.topk_recall(lsh, q, k, scores, top_k=32)
    assert r_tr > r_lsh + 0.05, (r_tr, r_lsh)
    assert info["best_step"] > 0 and info["val_recall"] > info["lsh_val_recall"]
    p = tmp_path / "hash.pt"
    hasher.save(p)
    again = retrieval.SpotlightHash.load(p)
    x = torch.randn(1, 2, 5, 32)
    assert torch.equal(again.encode_keys(x), hasher.encode_keys(x))
    assert torch.equal(again.encode_queries(x), hasher.encode_queries(x))


def test_train_hash_starts_at_lsh_and_falls_back_to_it():
    q, k, scores = _synthetic()
    lsh = retrieval.SpotlightHash.random(2, 32, 64, generator=torch.Generator().manual_seed(3))
    h0 = retrieval.train_hash(q, k, scores, nbits=64, steps=0, seed=3)
    x = torch.randn(1, 2, 40, 32)
    assert torch.equal(h0.encode_keys(x), lsh.encode_keys(x))
    assert torch.equal(h0.encode_queries(x), lsh.encode_queries(x))
    # training on the REVERSED ranking hurts on the (true) validation set: the LSH (step 0) must come back
    h, info = retrieval.train_hash(q, k, -scores, nbits=64, steps=60, lr=3e-2, queries_per_step=16, seed=3,
                                   val=(q, k, scores), return_info=True)
    assert info["best_step"] == 0, info["curve"]
    assert min(r for _, r in info["curve"][1:]) < info["lsh_val_recall"]  # training really moved away
    assert torch.equal(h.encode_keys(x), lsh.encode_keys(x))
    assert torch.equal(h.encode_queries(x), lsh.encode_queries(x))


@pytest.mark.parametrize("sinks,recent", [(4, 0), (4, 16), (0, 8)])
def test_topk_recall_keep_rule(sinks, recent):
    # causal queries at given positions: the always-kept tokens are selected, so total mass = forced + free-only mass
    q, k, scores = _synthetic(NQ=24, sink_logit=12.0)
    N = k.shape[1]
    pos = torch.arange(100, N, (N - 100) // 24)[:24]
    scores = scores.masked_fill(torch.arange(N)[None, None, :] > pos[None, :, None], float("-inf"))
    free = retrieval._free_mask(pos, N, sinks, recent)
    for t, pt in enumerate(pos.tolist()):
        want = torch.zeros(N, dtype=torch.bool)
        want[sinks : pt + 1 - recent] = True
        assert torch.equal(free[t], want)
    p = torch.softmax(scores, -1)
    forced = (p * (~free & (torch.arange(N)[None, :] <= pos[:, None]))).sum(-1).mean().item()
    lsh = retrieval.SpotlightHash.random(2, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(q_pos=pos, sinks=sinks, recent=recent)
    total = retrieval.topk_recall(lsh, q, k, scores, 48, **kw)
    free_part = retrieval.topk_recall(lsh, q, k, scores, 48, free_only=True, **kw)
    assert abs(total - (forced + free_part)) < 1e-5, (total, forced, free_part)
    if sinks:
        assert forced > 0.5  # the sinks hold most of the mass here
    # grouped queries ([H, g, Nq, D], 2 heads per group) go through the same selection
    qg = torch.stack([q, q.flip(1)], 1)
    sg = torch.stack([scores, (q.flip(1) @ k.transpose(-1, -2) / 32 ** 0.5).masked_fill(
        torch.arange(N)[None, None, :] > pos[None, :, None], float("-inf"))], 1)
    assert 0 < retrieval.topk_recall(lsh, qg, k, sg, 48, **kw) <= 1


def _grouped_synthetic():
    """Two query heads per KV head that disagree: head 1 is head 0's queries plus a sharp bump toward a few keys."""
    q, k, scores = _synthetic(seed=2)
    g = torch.Generator().manual_seed(11)
    peak = k[:, torch.randperm(k.shape[1], generator=g)[:3]].mean(1, keepdim=True)  # [H, 1, D]
    q2 = q + 4.0 * peak / peak.norm(dim=-1, keepdim=True) * 32 ** 0.5 / 4
    qg = torch.stack([q, q2], 1)  # [H, 2, Nq, D]
    return qg, k, qg @ k.transpose(-1, -2)[:, None] / 32 ** 0.5


def test_train_hash_target_logit():
    qg, k, sg = _grouped_synthetic()
    # the two targets: the group's mean of weights, and the softmax of its mean logits (the oracle_logit ranking)
    pm, pl = retrieval._group_probs(sg, "mass"), retrieval._group_probs(sg, "logit")
    assert torch.allclose(pm, torch.softmax(sg, -1).mean(1)) and torch.allclose(pl, torch.softmax(sg.mean(1), -1))
    assert torch.equal(pl.argsort(-1, descending=True)[..., :8], sg.sum(1).argsort(-1, descending=True)[..., :8])
    top_m, top_l = (p.topk(16, -1).indices.sort(-1).values for p in (pm, pl))
    assert (top_m != top_l).any(-1).float().mean() > 0.5  # the peaked head decides "mass" more than "logit"
    # the validation metric follows the target: at step 0 (the LSH) the same picks capture different masses
    kw = dict(nbits=32, steps=0, seed=0, return_info=True, top=16)
    r0 = {t: retrieval.train_hash(qg, k, sg, target=t, **kw)[1]["lsh_val_recall"] for t in ("mass", "logit")}
    assert abs(r0["mass"] - r0["logit"]) > 1e-3, r0
    # training on the logit target beats its LSH start on held-out queries (measured on that target)
    gv = torch.Generator().manual_seed(8)
    qv = qg[:, :, :16] + 0.05 * torch.randn(qg[:, :, :16].shape, generator=gv)
    h, info = retrieval.train_hash(qg, k, sg, nbits=32, steps=80, lr=3e-2, queries_per_step=16, seed=0, top=16,
                                   val=(qv, k, qv @ k.transpose(-1, -2)[:, None] / 32 ** 0.5), target="logit",
                                   return_info=True)
    assert info["best_step"] > 0 and info["val_recall"] > info["lsh_val_recall"], info["curve"]
    with pytest.raises(ValueError, match="target must be 'mass' or 'logit'"):
        retrieval.train_hash(qg, k, sg, nbits=32, steps=1, target="weights")


def test_bradley_terry_loss_matches_pair_loop():
    # the vectorised loss against an explicit loop over (winner, loser) pairs: winners = the `top` free keys of most
    # target mass, losers = every other free key; softplus(S_l - S_w) averaged per query, weighted by free mass
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    H, Q, N, top = 2, 5, 23, 4
    S = torch.randn(H, Q, N, generator=g) * 3
    free = torch.rand(1, Q, N, generator=g) < 0.7
    free[0, 0] = False
    free[0, 0, :3] = True  # fewer free keys than winners: no losers, the query adds nothing
    P = torch.softmax(torch.randn(H, Q, N, generator=g) * 2, -1) * free
    for hard in (None, 5):  # every loser, or only the 5 of highest score (the mean still over every pair)
        got = retrieval._bradley_terry(S, P, free, top, max_losers=hard)
        want = torch.zeros(())
        for h in range(H):
            for q in range(Q):
                f = free[0, q].nonzero().flatten().tolist()
                win = sorted(f, key=lambda j: -P[h, q, j].item())[:top]
                lose = [j for j in f if j not in win]
                paired = sorted(lose, key=lambda j: -S[h, q, j].item())[:hard]
                pairs = [F.softplus(S[h, q, l] - S[h, q, w]) for w in win for l in paired]
                if pairs:
                    want = want + P[h, q].sum() * torch.stack(pairs).sum() / (len(win) * len(lose))
        torch.testing.assert_close(got, want / (H * Q), rtol=1e-5, atol=1e-6)
    assert retrieval._bradley_terry(S, P, free, top, max_losers=5) < retrieval._bradley_terry(S, P, free, top, None)
    # the gradient pushes winners up and losers down
    S.requires_grad_()
    retrieval._bradley_terry(S, P, free, top, max_losers=None).backward()
    w = P.masked_fill(~free, -1).topk(top, -1).indices
    lose = free.expand(H, -1, -1).clone().scatter_(-1, w, False)
    assert (S.grad.gather(-1, w)[:, 1:] < 0).all() and (S.grad[lose] > 0).all()
    assert (S.grad[~free.expand(H, -1, -1)] == 0).all()


def test_train_hash_bradley_terry_improves_recall():
    # Spotlight's pairwise loss: trained from the LSH it is compared with, it must beat it on held-out queries
    q, k, scores = _synthetic(seed=3)
    g = torch.Generator().manual_seed(9)
    qv = q[:, :16] + 0.05 * torch.randn(q[:, :16].shape, generator=g)
    sv = qv @ k.transpose(-1, -2) / k.shape[-1] ** 0.5
    hasher, info = retrieval.train_hash(q, k, scores, nbits=32, steps=80, lr=3e-2, queries_per_step=16, seed=0,
                                        val=(qv, k, sv), return_info=True, loss="bradley_terry", top=16)
    lsh = retrieval.SpotlightHash.random(2, 32, 32, generator=torch.Generator().manual_seed(0))
    r_tr = retrieval.topk_recall(hasher, q, k, scores, top_k=32)
    r_lsh = retrieval.topk_recall(lsh, q, k, scores, top_k=32)
    assert r_tr > r_lsh + 0.05, (r_tr, r_lsh)
    assert info["best_step"] > 0 and info["val_recall"] > info["lsh_val_recall"]
    with pytest.raises(ValueError, match="loss must be one of"):
        retrieval.train_hash(q, k, scores, nbits=32, steps=1, loss="hinge")


def test_train_hash_ignores_sinks():
    # sink-dominated attention: trained with the sinks excluded, the hash must rank the OTHER keys better than LSH
    q, k, scores = _synthetic(sink_logit=12.0, seed=1)
    assert torch.softmax(scores, -1)[..., :4].sum(-1).mean() > 0.5
    g = torch.Generator().manual_seed(5)
    qv = q[:, :24] + 0.05 * torch.randn(q[:, :24].shape, generator=g)
    sv = qv @ k.transpose(-1, -2) / 32 ** 0.5
    kw = dict(sinks=4, recent=0)
    h = retrieval.train_hash(q, k, scores, nbits=32, steps=80, lr=3e-2, queries_per_step=16, seed=1,
                             val=(qv, k, sv), top=28, **kw)
    lsh = retrieval.SpotlightHash.random(2, 32, 32, generator=torch.Generator().manual_seed(1))
    r_tr = retrieval.topk_recall(h, q, k, scores, 32, free_only=True, **kw)
    r_lsh = retrieval.topk_recall(lsh, q, k, scores, 32, free_only=True, **kw)
    assert r_tr > r_lsh, (r_tr, r_lsh)


def test_layer_problem_is_causal_and_grouped():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 50, 8, generator=g), torch.randn(2, 50, 8, generator=g)
    pos = retrieval.sample_positions(50, 10, 20, seed=1)
    assert len(pos) == 10 and pos.min() >= 20 and pos.max() < 50 and torch.equal(pos, pos.sort().values)
    qg, kf, s, p = retrieval.layer_problem(q, k, pos)
    assert qg.shape == (2, 3, 10, 8) and s.shape == (2, 3, 10, 50)
    # query head 4 belongs to KV head 1 (heads h*g .. h*g+g-1)
    ref_ = q[4, pos[3]] @ k[1].T / 8 ** 0.5
    torch.testing.assert_close(s[1, 1, 3, : pos[3] + 1], ref_[: pos[3] + 1])
    assert torch.isinf(s[1, 1, 3, pos[3] + 1:]).all()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_cuda_grid_limits():
    qc = torch.zeros(1, 1, 1, dtype=torch.int32, device="cuda")
    kc = torch.zeros(1, 1, 4, 1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"on CUDA B \(65536\) and Hkv \(1\) must be <= 65535"):
        ops.hamming_topk(qc.expand(65536, 1, 1), kc.expand(65536, 1, 4, 1), 1)
    with pytest.raises(ValueError, match=r"on CUDA B \(1\) and Hkv \(65536\) must be <= 65535"):
        ops.hamming_topk(qc.expand(1, 65536, 1), kc.expand(1, 65536, 4, 1), 1)
    q = torch.zeros(1, 1, 1, 32, device="cuda").expand(2**16, 2**15, 1, 32)  # B·Hq = 2^31
    k = torch.zeros(1, 1, 4, 32, device="cuda").expand(2**16, 1, 4, 32)
    idx = torch.zeros(1, 1, 1, dtype=torch.int32, device="cuda").expand(2**16, 1, 1)
    with pytest.raises(ValueError, match=r"on CUDA B·Hq \(65536·32768\) must be < 2\^31"):
        ops.sparse_decode_attention(q, k, k, idx)
