"""One line per CUDA op: does it run, and does it agree with the CPU kernel (itself tested against the reference) on
fresh heavy-tailed random inputs?  The first thing a GPU session runs (scripts/gpu_session.sh): it takes seconds and
survives a kernel that breaks the CUDA context (a sticky error such as an illegal address ends the process; the
driver then restarts it at the next case, so one broken kernel does not hide the others).

    python scripts/gpu_smoke.py            # all cases, restarting after a sticky error; exit 1 if any failed
    python scripts/gpu_smoke.py --list     # the case names
    python scripts/gpu_smoke.py --only K   # run the cases from index K on in this process (used by the driver)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import traceback

import torch

CASES = []


def case(fn):
    CASES.append(fn)
    return fn


def case_pair(name: str, body):
    """Two cases, NAME (the CUDA-core kernel, body(gen, mma=False)) and NAME_mma (the tensor-core kernel)."""
    for mma in (False, True):
        fn = (lambda m: lambda gen: body(gen, mma=m))(mma)
        fn.__name__ = name + ("_mma" if mma else "")
        case(fn)


def heavy(*shape, gen, dtype=torch.float32):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x = x / torch.rand(*shape, generator=gen, dtype=torch.float64).clamp_min(0.05).sqrt()
    if shape[-1] >= 16:
        ch = torch.randperm(shape[-1], generator=gen)[: shape[-1] // 16]
        x[..., ch] = x[..., ch] * 20 + 3
    return x.to(dtype)


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def same(a, b):
    return a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def frac_equal(a, b):
    return (a.cpu() == b.cpu()).float().mean().item() if a.shape == b.shape else 0.0


# the device under test (KVENGINE_SMOKE_DEVICE): "cuda"; "emu", the CUDA kernels run on the CPU by the emulator
# (tests/cuda_emu: torch.ops.kvengine_emu on CPU tensors); "cpu", the script against itself (a self-test of the
# script, not of any kernel)
DEV = os.environ.get("KVENGINE_SMOKE_DEVICE", "cuda")
TDEV = "cpu" if DEV == "emu" else DEV  # where the device's tensors live


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


class on_dev:
    """Calls inside run on the device under test (for "emu": kvengine.ops routed to torch.ops.kvengine_emu)."""

    def __enter__(self):
        if DEV == "emu":
            from kvengine import ops
            self.old = ops._ops
            ops._ops = emu_ops()
        return self

    def __exit__(self, *exc):
        if DEV == "emu":
            from kvengine import ops
            ops._ops = self.old
        return False


def emu_ops():
    from pathlib import Path
    import kvengine
    if not hasattr(torch.ops, "kvengine_emu") or not hasattr(torch.ops.kvengine_emu, "fwht"):
        lib = os.environ.get("KVENGINE_EMU_LIB") or str(Path(kvengine.__file__).parent / "libkvengine_emu_ops.so")
        torch.ops.load_library(lib)
    return torch.ops.kvengine_emu


def both(fn, *args):
    """fn on CPU and on DEV with the same (CPU) inputs moved over; returns (cpu_out, dev_out)."""
    def mv(x):
        return x.to(TDEV) if isinstance(x, torch.Tensor) else x
    out_c = fn(*args)
    with on_dev():
        out_g = fn(*[mv(a) for a in args])
    sync()
    return out_c, out_g


# ---- cases: each returns (ok, detail) ----------------------------------------------------------------------------
@case
def fwht(gen):
    from kvengine import ops
    errs = []
    for n, dt in ((128, torch.float32), (1024, torch.bfloat16), (8192, torch.float16)):
        x = heavy(33, n, gen=gen, dtype=dt)
        c, g = both(ops.fwht, x)
        errs.append(rel(g, c))
    tol = 1e-2
    return max(errs) < tol, f"rel err fp32/bf16/fp16 {', '.join(f'{e:.1e}' for e in errs)} (tol {tol})"


@case
def quantize_pack(gen):
    from kvengine import ops
    res = []
    for bits, mode, G in ((2, "per_channel", 32), (4, "per_token", 32), (1, "per_token", 16), (8, "per_channel", 64)):
        x = heavy(2, 3, 128, 128, gen=gen)
        c, g = both(lambda t: ops.quantize_pack(t, bits, G, mode), x)
        res.append(all(same(a, b) for a, b in zip(c, g)))
    x = heavy(2, 3, 128, 64, gen=gen)
    c, g = both(lambda t: ops.quantize_pack(t, 2, 32, "per_channel", clip=11), x)
    agree = frac_equal(c[0], g[0])
    ok = all(res) and agree > 0.98
    return ok, f"min/max bit-exact {res}; clip=11 code agreement {agree:.4f} (> 0.98)"


@case
def rotate_quantize_pack(gen):
    from kvengine import ops
    x = heavy(2, 4, 64, 128, gen=gen, dtype=torch.bfloat16)
    perm = torch.randperm(128, generator=gen)
    c, g = both(lambda t, p: ops.rotate_quantize_pack(t, 2, 32, "per_channel", perm=p), x, perm)
    ok = all(same(a, b) for a, b in zip(c, g))
    return ok, f"bit-exact {ok}"


@case
def dequantize(gen):
    from kvengine import ops
    x = heavy(2, 4, 96, 128, gen=gen)
    codes, s, z = ops.quantize_pack(x, 4, 32, "per_token")
    c, g = both(lambda a, b, d: ops.dequantize(a, b, d, 4, 32, "per_token", torch.float32), codes, s, z)
    e = rel(g, c)
    return e < 1e-6, f"rel err {e:.1e}"


def _cache_pair(gen, bits, k_mode, dtype, T, D=128, hkv=4):
    from kvengine import QuantizedKVCache
    k = heavy(2, hkv, T, D, gen=gen, dtype=dtype)
    v = heavy(2, hkv, T, D, gen=gen, dtype=dtype)
    caches = []
    for dev in ("cpu", TDEV):
        with on_dev() if len(caches) else contextlib.nullcontext():
            c = QuantizedKVCache(hkv, D, bits_k=bits, bits_v=bits, group_size=32, residual=64, sinks=4,
                                 batch_size=2, dtype=dtype, device=dev, k_mode=k_mode, clip="none")
            c.append(k.to(dev), v.to(dev))
        caches.append(c)
    return caches


@case
def quant_decode_attention(gen):
    errs = {}
    for bits, k_mode, dtype, tq in ((2, "per_channel", torch.float32, 1), (4, "per_channel", torch.bfloat16, 8),
                                    (2, "per_token", torch.float16, 3), (1, "per_channel", torch.float32, 2)):
        cc, cg = _cache_pair(gen, bits, k_mode, dtype, T=1000 + 37 * bits)
        q = heavy(2, 16, tq, 128, gen=gen, dtype=dtype)
        oc = cc.attend(q)
        with on_dev():
            og = cg.attend(q.to(TDEV))
        sync()
        errs[f"int{bits}/{k_mode[4:]}/{str(dtype)[6:]}/Tq{tq}"] = rel(og, oc)
    tol = 2e-2
    return max(errs.values()) < tol, " ".join(f"{k}={v:.1e}" for k, v in errs.items()) + f" (tol {tol})"


@case
def quant_decode_attention_indices(gen):
    cc, cg = _cache_pair(gen, 4, "per_channel", torch.float16, T=2000)
    q = heavy(2, 16, 1, 128, gen=gen, dtype=torch.float16)
    idx = torch.randint(-3, 2003, (2, 4, 300), generator=gen, dtype=torch.int32)
    oc = cc.attend(q, indices=idx)
    with on_dev():
        og = cg.attend(q.to(TDEV), indices=idx.to(TDEV))
    sync()
    e = rel(og, oc)
    return e < 2e-2, f"rel err {e:.1e}"


@case
def sign_pack(gen):
    from kvengine import ops
    x = heavy(2, 3, 77, 128, gen=gen, dtype=torch.bfloat16)
    c, g = both(lambda t: ops.sign_pack(t, center=True), x)
    ok = same(c[0], g[0]) and rel(g[1], c[1]) < 1e-5
    return ok, f"bits equal {same(c[0], g[0])}, scale rel err {rel(g[1], c[1]):.1e}"


@contextlib.contextmanager
def env(name: str, value: str):
    """os.environ[name] = value inside, the previous state after."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _binary(gen, mma: bool):
    from kvengine import ops
    errs = {}
    with env("KVENGINE_BINARY_MMA", "1" if mma else "0"):
        for L, D, causal, dt in ((300, 64, False, torch.bfloat16), (517, 128, True, torch.float16),
                                 (129, 32, True, torch.bfloat16)):
            q = heavy(2, 4, L, D, gen=gen, dtype=dt)
            k = heavy(2, 2, L, D, gen=gen, dtype=dt)
            v = heavy(2, 2, L, D, gen=gen, dtype=dt)
            rb = torch.randn(4, 2 * L - 1, generator=gen)
            c, g = both(lambda a, b, cc, r: ops.binary_attention(a, b, cc, rel_bias=r, causal=causal), q, k, v, rb)
            errs[f"L{L}/D{D}/{'causal' if causal else 'full'}"] = rel(g, c)
    tol = 2e-2
    return max(errs.values()) < tol, " ".join(f"{k}={v:.1e}" for k, v in errs.items()) + f" (tol {tol})"


case_pair("binary_attention", _binary)


@case
def binary_attention_packed(gen):
    from kvengine import ops
    q = heavy(2, 8, 1, 128, gen=gen, dtype=torch.bfloat16)
    k = heavy(2, 2, 999, 128, gen=gen, dtype=torch.bfloat16)
    v = heavy(2, 2, 999, 128, gen=gen, dtype=torch.bfloat16)
    kb, ks = ops.sign_pack(k, center=True)
    c, g = both(ops.binary_attention_packed, q, kb, ks, v)  # decode-shaped: the grouped split (4 chunks + merge)
    e = rel(g, c)
    with env("KVENGINE_BINARY_CUDA_SPLIT", "0"):  # one CTA per query head
        c2, g2 = both(ops.binary_attention_packed, q, kb, ks, v)
    e2 = rel(g2, c2)
    return max(e, e2) < 2e-2, f"rel err split {e:.1e}, per head {e2:.1e}"


def _hash(gen, mma: bool):
    from kvengine import ops
    with env("KVENGINE_HASH_MMA", "1" if mma else "0"):
        x = heavy(2, 4, 333, 128, gen=gen)
        w1 = torch.randn(4, 128, 128, generator=gen) / 11
        b1 = torch.randn(4, 128, generator=gen) / 10
        w2 = torch.randn(4, 128, 128, generator=gen) / 11
        b2 = torch.randn(4, 128, generator=gen) / 10
        c, g = both(ops.hash_encode, x, w1, b1, w2, b2)
        bits_c = torch.stack([(c >> i) & 1 for i in range(32)])
        bits_g = torch.stack([(g.cpu() >> i) & 1 for i in range(32)])
        agree = (bits_c == bits_g).float().mean().item()
    return agree > 0.999, f"code bit agreement {agree:.5f} (> 0.999; bits at |f| ~ 0 may flip)"


case_pair("hash_encode", _hash)


def _topk(gen, mma: bool):
    from kvengine import ops
    with env("KVENGINE_TOPK_MMA", "1" if mma else "0"):
        qc = torch.randint(-2**31, 2**31 - 1, (2, 16, 4), generator=gen, dtype=torch.int64).to(torch.int32)
        kc = torch.randint(-2**31, 2**31 - 1, (2, 4, 20000, 4), generator=gen, dtype=torch.int64).to(torch.int32)
        lens = torch.tensor([20000, 7777], dtype=torch.int32)
        c, g = both(lambda a, b, s: ops.hamming_topk(a, b, 1024, seq_lens=s, keep=(4, 64)), qc, kc, lens)
    ok = same(c[0], g[0]) and same(c[1], g[1])
    return ok, f"indices equal {same(c[0], g[0])}, scores equal {same(c[1], g[1])}"


case_pair("hamming_topk", _topk)


@case
def sparse_decode_attention(gen):
    from kvengine import ops
    q = heavy(2, 16, 1, 128, gen=gen, dtype=torch.float16)
    k = heavy(2, 4, 5000, 128, gen=gen, dtype=torch.float16)
    v = heavy(2, 4, 5000, 128, gen=gen, dtype=torch.float16)
    idx = torch.randint(-5, 5005, (2, 4, 1024), generator=gen, dtype=torch.int32)
    c, g = both(ops.sparse_decode_attention, q, k, v, idx)
    e = rel(g, c)
    return e < 1e-2, f"rel err {e:.1e}"


def run_from(start: int) -> int:
    import kvengine  # noqa: F401
    failed = 0
    for i in range(start, len(CASES)):
        fn = CASES[i]
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        if os.environ.get("KVENGINE_SMOKE_CRASH") == fn.__name__:  # self-test hook: die inside this case
            os.kill(os.getpid(), 9)
        try:
            ok, detail = fn(gen)
        except Exception as e:  # noqa: BLE001
            ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc(file=sys.stderr)
            try:
                sync()
            except Exception:  # the context is broken: let the driver restart after this case
                print(f"{i:2d} {'FAIL':4s} {fn.__name__:32s} {time.perf_counter() - t0:6.2f}s seed={seed} {detail}"
                      " [CUDA context lost]", flush=True)
                return 100 + i
        failed += not ok
        print(f"{i:2d} {'ok' if ok else 'FAIL':4s} {fn.__name__:32s} {time.perf_counter() - t0:6.2f}s seed={seed} "
              f"{detail}", flush=True)
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=int, default=None)
    p.add_argument("--list", action="store_true")
    a = p.parse_args()
    if a.list:
        for i, fn in enumerate(CASES):
            print(i, fn.__name__)
        return 0
    if a.only is not None:
        return run_from(a.only)
    if DEV == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device", flush=True)
        return 2
    start, any_fail = 0, False
    while start < len(CASES):
        # the child prints one line per finished case ("<index> ok|FAIL ..."); a crash (sticky CUDA error, signal)
        # ends it: go on after the case that was running, in a fresh process
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--only", str(start)],
                                stdout=subprocess.PIPE, text=True)
        last = start - 1
        for line in proc.stdout:
            print(line, end="", flush=True)
            m = line.split()
            if m and m[0].isdigit():
                last = int(m[0])
                any_fail |= len(m) > 1 and m[1] == "FAIL"
        rc = proc.wait()
        any_fail |= rc != 0
        if rc not in (0, 1) and rc < 100 and last < len(CASES) - 1:  # died inside the next case
            last += 1
            print(f"{last:2d} FAIL {CASES[last].__name__:32s} process died (exit {rc})", flush=True)
        elif last < start:  # finished nothing (import error?): count the first case as failed and go on
            last = start
            print(f"{last:2d} FAIL {CASES[last].__name__:32s} process ended with exit {rc} before it", flush=True)
        start = last + 1
    return 1 if any_fail else 0

if __name__ == "__main__":
    sys.exit(main())
