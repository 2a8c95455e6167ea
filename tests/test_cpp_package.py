"""The torch-free engine as a C++ package, used the way a C++ inference engine would use it.

A KVENGINE_ENGINE_ONLY=ON build (no Python, no torch) is installed into a prefix; examples/cpp is configured against
it with find_package(kvengine) and run. Its dumps are checked against the torch ops and the pure-PyTorch reference:
the packed cache bit for bit, the decode attention, the LSH codes, the Hamming top-k and the sparse attention.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvengine
from conftest import GPU_DEVICES
from kvengine import ops, reference

ROOT = Path(__file__).resolve().parents[1]
B, HQ, HKV, D, SINK, QCAP, GROUP, TOPK, RECENT = 2, 8, 2, 128, 4, 512, 32, 64, 16
N_QUANT, N_RES = (512, 480), (36, 21)


def _run(cmd, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert p.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n"
                               f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def _cmake():
    exe = shutil.which("cmake")
    assert exe, "cmake (>= 3.25) not found: it builds the engine the way a C++ host would"
    return exe


def _generator():
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def _engine_package(base: Path, *defines: str) -> dict:
    """Builds and installs an engine-only package (cmake -D`defines`), then examples/cpp against it."""
    build, prefix, example = base / "engine", base / "prefix", base / "example"
    cmake = _cmake()
    _run([cmake, "-S", ROOT, "-B", build, *_generator(), "-DKVENGINE_ENGINE_ONLY=ON", "-DCMAKE_BUILD_TYPE=Release",
          *defines])
    _run([cmake, "--build", build, "-j", os.cpu_count() or 2])
    _run([cmake, "--install", build, "--prefix", prefix])
    _run([cmake, "-S", ROOT / "examples" / "cpp", "-B", example, *_generator(), f"-DCMAKE_PREFIX_PATH={prefix}"])
    _run([cmake, "--build", example])
    return {"build": build, "prefix": prefix, "exe": example / "kv_decode"}


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return _engine_package(tmp_path_factory.mktemp("cpp_package"), "-DKVENGINE_CUDA=OFF")


def test_install_layout_and_no_torch(package):
    prefix = package["prefix"]
    for h in (ROOT / "cpp" / "include" / "kvengine").glob("*.h"):
        assert (prefix / "include" / "kvengine" / h.name).is_file(), h.name
    assert not (prefix / "include" / "kvengine" / "cuda_ops.h").exists()  # CUDA off: no CUDA header
    libs = list(prefix.glob("lib*/libkvengine_cpu.a"))
    assert len(libs) == 1, libs
    cm = libs[0].parent / "cmake" / "kvengine"
    for f in ("kvengineConfig.cmake", "kvengineConfigVersion.cmake", "kvengineTargets.cmake"):
        assert (cm / f).is_file(), f
    assert "kvengine::cpu" in (cm / "kvengineTargets.cmake").read_text()
    # the engine-only build never looked for Python or torch
    cache = (package["build"] / "CMakeCache.txt").read_text()
    assert "Python_EXECUTABLE" not in cache and "pybind11" not in cache


def test_installed_headers_are_self_contained(package):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    assert cxx, "no C++ compiler"
    inc = package["prefix"] / "include"
    headers = sorted((inc / "kvengine").glob("*.h"))
    assert len(headers) >= 7
    for h in headers:
        # a translation unit holding only this header (twice: the include guard works)
        _run([cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I", inc, "-x", "c++", "-"],
             input=f"#include <kvengine/{h.name}>\n#include <kvengine/{h.name}>\n")


def test_add_subdirectory_gives_the_same_targets(tmp_path):
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.25)\nproject(host LANGUAGES CXX)\n"
        "set(KVENGINE_ENGINE_ONLY ON CACHE BOOL \"\" FORCE)\nset(KVENGINE_CUDA OFF CACHE STRING \"\" FORCE)\n"
        f"add_subdirectory(\"{ROOT}\" kvengine)\n"
        "add_executable(host main.cpp)\ntarget_link_libraries(host PRIVATE kvengine::cpu)\n"
        "get_target_property(_t kvengine::cpu ALIASED_TARGET)\nmessage(STATUS \"host links ${_t}\")\n")
    (tmp_path / "main.cpp").write_text("#include <kvengine/parallel.h>\nint main() { return 0; }\n")
    p = _run([_cmake(), "-S", tmp_path, "-B", tmp_path / "build", *_generator()])
    assert "host links kvengine_cpu" in p.stdout


def test_example_rejects_bad_arguments(package):
    p = subprocess.run([package["exe"], "3"], capture_output=True, text=True)
    assert p.returncode == 2 and "usage" in p.stderr


_DT = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32, "uint8": torch.uint8}


def _load(d: Path):
    out = {}
    for line in (d / "manifest.txt").read_text().splitlines():
        name, dt, *shape = line.split()
        buf = bytearray((d / f"{name}.bin").read_bytes())
        out[name] = torch.frombuffer(buf, dtype=_DT[dt]).reshape([int(s) for s in shape]).clone()
    return out


def _unpack_words(words):
    w = words.to(torch.int64) & 0xFFFFFFFF
    bits = (w.unsqueeze(-1) >> torch.arange(32)) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * 32).bool()


@pytest.mark.parametrize("bits", [2, 4])
def test_example_matches_ops_and_reference(package, tmp_path, bits):
    p = _run([package["exe"], bits, tmp_path])
    x = _load(tmp_path)
    k, v, q = x["k"], x["v"], x["q"]
    assert k.shape == (B, HKV, 556, D) and q.shape == (B, HQ, 1, D)
    assert k[..., 7].abs().mean() > 5 * k[..., 8].abs().mean()  # the outlier channels are there

    # the packed segment (logical positions [SINK, SINK + QCAP)): bit for bit what the torch ops produce
    ks, vs = k[:, :, SINK:SINK + QCAP], v[:, :, SINK:SINK + QCAP]
    kc, kscale, kzero = ops.rotate_quantize_pack(ks, bits, GROUP, "per_channel", meta_dtype=torch.float16)
    vc, vscale, vzero = ops.quantize_pack(vs, bits, GROUP, "per_token", meta_dtype=torch.float16)
    for name, want in [("k_codes", kc), ("k_scale", kscale), ("k_zero", kzero),
                       ("v_codes", vc), ("v_scale", vscale), ("v_zero", vzero)]:
        assert torch.equal(x[name], want), name
    # ... and what the reference's semantics say: every value within half a step of its group
    kh = reference.dequantize(x["k_codes"], x["k_scale"], x["k_zero"], bits, GROUP, "per_channel", torch.float64)
    kr = reference.fwht(ks.double())
    step = x["k_scale"].double().repeat_interleave(GROUP, dim=2)
    assert ((kh - kr).abs() <= step / 2 + 1e-3 * kr.abs() + 1e-3).all()

    # full-precision slots: the sinks and the recent tokens, keys rotated
    lens = x["lens"]
    assert lens.tolist() == [[SINK, N_QUANT[b], N_RES[b]] for b in range(B)]
    for b in range(B):
        pos = list(range(SINK)) + list(range(SINK + N_QUANT[b], SINK + N_QUANT[b] + N_RES[b]))
        torch.testing.assert_close(x["k_fp"][b, :, :len(pos)], reference.fwht(k[b, :, pos].double()).float(),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x["v_fp"][b, :, :len(pos)], v[b, :, pos], atol=0, rtol=0)

    cache = (x["k_codes"], x["k_scale"], x["k_zero"], x["v_codes"], x["v_scale"], x["v_zero"], x["k_fp"], x["v_fp"],
             lens, bits, bits, GROUP, GROUP)
    # dense decode attention: the engine was given the rotated q; the reference rotates it itself
    want = reference.quant_decode_attention(q, *cache, rotate_k=True)
    torch.testing.assert_close(x["out"], want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x["out"], ops.quant_decode_attention(q, *cache, rotate_k=True), atol=2e-5, rtol=1e-4)

    # LSH codes: bit = f > 0 of the projection, wherever f is not within rounding of zero
    for name, src in (("k_hash", k), ("q_hash", q.squeeze(2))):
        f = reference.hash_project(src, x["proj"])
        sure = f.abs() > 1e-3
        assert sure.float().mean() > 0.99
        assert torch.equal(_unpack_words(x[name])[sure], (f > 0)[sure]), name

    # Hamming top-k with sinks and recent window kept: exactly the op's and the brute-force reference's selection
    args = (x["q_hash"], x["k_hash"], TOPK)
    idx, scr = ops.hamming_topk(*args, seq_lens=x["seq_lens"], keep=(SINK, RECENT))
    ridx, rscr = reference.hamming_topk(*args, seq_lens=x["seq_lens"], keep=(SINK, RECENT))
    assert torch.equal(x["indices"], idx) and torch.equal(x["scores"], scr)
    assert torch.equal(x["indices"], ridx) and torch.equal(x["scores"], rscr)
    assert x["seq_lens"].tolist() == [SINK + N_QUANT[b] + N_RES[b] for b in range(B)]

    # attention over the selected tokens only, read from the packed cache
    want = reference.quant_decode_attention(q, *cache, rotate_k=True, indices=x["indices"])
    torch.testing.assert_close(x["out_sparse"], want, atol=2e-5, rtol=1e-4)

    # what it printed: the packed size and the errors against exact fp32 attention
    out = p.stdout
    bpv = float(re.search(r"([\d.]+) bits per value", out).group(1))
    assert abs(bpv - (bits + 2 * 16 / GROUP)) < 0.01  # codes + fp16 scale and zero per group of 32
    printed = float(re.search(r"dense decode attention: rel\. error vs exact attention ([\d.]+)", out).group(1))
    exact = torch.empty(B, HQ, 1, D, dtype=torch.float64)
    mass = []
    for b in range(B):
        n = SINK + N_QUANT[b] + N_RES[b]
        kk = k[b, :, :n].double().repeat_interleave(HQ // HKV, 0)
        vv = v[b, :, :n].double().repeat_interleave(HQ // HKV, 0)
        w = torch.softmax(q[b].double() @ kk.transpose(1, 2) / D**0.5, -1)  # [Hq, 1, n]
        exact[b] = w @ vv
        for hq in range(HQ):
            sel = x["indices"][b, hq // (HQ // HKV)].long()
            mass.append(w[hq, 0, sel[sel >= 0]].sum().item())
    err = ((x["out"].double() - exact).norm() / exact.norm()).item()
    assert abs(printed - err) < 1e-3 + 0.01 * err, (printed, err)
    assert 0 < err < (0.15 if bits == 4 else 0.6), out
    printed_mass = float(re.search(r"the selected tokens hold ([\d.]+) of the exact attention mass", out).group(1))
    assert abs(printed_mass - sum(mass) / len(mass)) < 2e-3, (printed_mass, mass)


def _cuda_toolkit():
    """(include dir, libcudart.so) of the CUDA toolkit: CUDA_HOME / CUDA_PATH, nvcc's, or /usr/local/cuda."""
    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                 str(Path(nvcc).resolve().parents[1]) if nvcc else None, "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime_api.h").is_file():
            libs = [Path(home) / d / "libcudart.so" for d in ("lib64", "lib", "targets/x86_64-linux/lib")]
            return Path(home) / "include", next((lib for lib in libs if lib.is_file()), None)
    raise AssertionError("no CUDA toolkit headers found (CUDA_HOME, nvcc, /usr/local/cuda): the emulator build and "
                         "the CUDA build both need them")


def _build_cuda_example(device, out: Path):
    """Compiles examples/cpp/kv_decode.cpp with its GPU path against this kvengine build: device "cuda" links the CUDA
    build's libkvengine_ops.so (which holds kvengine::cuda) and libcudart, device "emu" the emulator's library, whose
    runtime stands in for cudart (namespace kvengine_emu). Returns the program and the environment to run it in."""
    include, cudart = _cuda_toolkit()
    pkg = Path(kvengine.__file__).parent
    torch_lib = Path(torch.__file__).parent / "lib"
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    exe = out / f"kv_decode_{device}"
    cmd = [cxx, "-std=c++20", "-O1", "-Wall", "-Wextra", "-DKVENGINE_EXAMPLE_CUDA=1",  # (no -Werror: any compiler)
           "-I", ROOT / "cpp" / "include", "-I", ROOT / "cuda" / "include", "-isystem", include,
           ROOT / "examples" / "cpp" / "kv_decode.cpp", "-o", exe]
    if device == "emu":
        lib = Path(os.environ.get("KVENGINE_EMU_LIB") or pkg / "libkvengine_emu_ops.so")
        cmd += ["-Dkvengine=kvengine_emu", lib]
    else:
        assert cudart is not None, f"libcudart.so not found beside {include}"
        lib = pkg / "libkvengine_ops.so"
        cmd += [lib, cudart]
    # the libraries' own dependencies (torch's CUDA libraries, ...) are the loader's business, not the linker's
    _run(cmd + [f"-Wl,-rpath-link,{torch_lib}", "-Wl,--allow-shlib-undefined"])
    # the libraries' own RUNPATHs assume a venv layout (torch beside kvengine); a --target install has none
    dirs = [lib.parent, torch_lib] + ([cudart.parent] if cudart else [])
    path = os.pathsep.join([str(d) for d in dirs] + [os.environ.get("LD_LIBRARY_PATH", "")])
    env = dict(os.environ, LD_LIBRARY_PATH=path)
    return exe, env


def _run_cuda_example(exe, env, bits):
    p = subprocess.run([exe, str(bits)], capture_output=True, text=True, env=env)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("CUDA")), "")
    assert p.returncode == 0 and line, f"exit {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return line


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_example_cuda_path(device, tmp_path):
    """The GPU path of examples/cpp/kv_decode.cpp: the CUDA launchers of kvengine/cuda_ops.h driven from plain C++
    (cudaMalloc'd buffers, a stream, workspaces sized by the *_workspace_bytes functions), every result checked by
    the program against the CPU engine: on a GPU, and in the emulator."""
    exe, env = _build_cuda_example(device, tmp_path)
    for bits in (2, 4):
        line = _run_cuda_example(exe, env, bits)
        assert line.endswith("-> OK"), line
        assert "packed cache equals the CPU's" in line and "top-k equals the CPU's" in line
        assert ("kvengine CUDA emulator" in line) == (device == "emu"), line


@pytest.mark.skipif(not kvengine.build_info()["cuda"], reason="a CPU build (CI's CUDA stage runs this one)")
def test_example_links_against_the_cuda_build(tmp_path):
    """CI's CUDA stage (no GPU there): a C++ host links the CUDA build's launchers and cudart, runs its CPU part and
    reports the missing device instead of failing; on a GPU machine it runs the GPU path and checks it."""
    exe, env = _build_cuda_example("cuda", tmp_path)
    _check_gpu_or_none(_run_cuda_example(exe, env, 4))


def _check_gpu_or_none(line: str) -> None:
    """Without a GPU the program must say so (and exit 0); with one, its GPU path must agree with the CPU engine."""
    if torch.cuda.is_available():
        assert line.endswith("-> OK"), line
    else:
        assert line == "CUDA: no device here, the GPU path did not run", line


@pytest.mark.skipif(not kvengine.build_info()["cuda"], reason="a CPU build (CI's CUDA stage runs this one)")
def test_engine_package_with_cuda_kernels(tmp_path):
    """CI's CUDA stage: the engine-only package with its CUDA kernels (sm_90a): kvengine::cuda exported with its
    cudart dependency, cuda_ops.h installed, and the example built through find_package with its GPU path (no GPU
    there: it runs its CPU part and says so; on a GPU it runs and checks the GPU path)."""
    include, _ = _cuda_toolkit()
    nvcc = include.parent / "bin" / "nvcc"
    assert nvcc.is_file(), nvcc
    pkg = _engine_package(tmp_path, "-DKVENGINE_CUDA=ON", "-DKVENGINE_CUDA_ARCHS=90a", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                          f"-DPython_EXECUTABLE={sys.executable}")  # the interpreter that has nvidia-cutlass
    prefix = pkg["prefix"]
    assert (prefix / "include" / "kvengine" / "cuda_ops.h").is_file()
    assert len(list(prefix.glob("lib*/libkvengine_cuda.a"))) == 1
    config = next(prefix.glob("lib*/cmake/kvengine/kvengineConfig.cmake")).read_text()
    assert "set(kvengine_WITH_CUDA ON)" in config and "find_dependency(CUDAToolkit)" in config
    _check_gpu_or_none(_run_cuda_example(pkg["exe"], dict(os.environ), 4))
