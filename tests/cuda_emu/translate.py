"""kvengine CUDA emulator: turn a .cu/.cuh file into plain C++ for the CPU emulator (tests/cuda_emu/include).

Four rewrites, nothing else (the kernels compile unchanged against the emulator's headers):
  kernel<<<grid, block[, smem[, stream]]>>>(args)   ->  ::emu::launch(kernel, ::emu::Cfg(grid, block, ...), "kernel")(args)
  extern __shared__ [__align__(n)] T name[];        ->  T* name = reinterpret_cast<T*>(::emu::dyn_smem());
  __shared__ T a[..], b;                            ->  auto& a = ::emu::static_shared<T[..], site>(); ...
  asm volatile("op.x.y operands;" : outs : ins);    ->  ::emu::ptx_op_x_y(operand expressions in PTX order);
A construct it cannot rewrite is an error (exit 1), never passed through: the emulated build then fails to compile
rather than emulate something else.  `#include "x.cuh"` becomes `#include "x.cuh.cpp"` (translated beside it).

    python translate.py IN.cu OUT.cpp
"""
from __future__ import annotations

import re
import sys


class TranslateError(Exception):
    pass


def _match_close(s: str, i: int, open_ch: str, close_ch: str) -> int:
    """Index of the bracket closing the one at s[i] (skips string and char literals)."""
    depth = 0
    j = i
    while j < len(s):
        c = s[j]
        if c in "\"'":
            q = c
            j += 1
            while j < len(s) and s[j] != q:
                j += 2 if s[j] == "\\" else 1
        elif c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return j
        j += 1
    raise TranslateError(f"unbalanced {open_ch} at offset {i}")


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split at separators outside (), [] and {} and outside string literals."""
    out, depth, cur, j = [], 0, [], 0
    while j < len(s):
        c = s[j]
        if c in "\"'":
            q = c
            k = j + 1
            while k < len(s) and s[k] != q:
                k += 2 if s[k] == "\\" else 1
            cur.append(s[j:k + 1])
            j = k + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        j += 1
    if "".join(cur).strip():
        out.append("".join(cur))
    return [x.strip() for x in out]


def rewrite_launches(src: str) -> str:
    out, pos = [], 0
    while True:
        i = src.find("<<<", pos)
        if i < 0:
            out.append(src[pos:])
            return "".join(out)
        # the kernel expression before <<<: an identifier, possibly with template arguments
        j = i
        while j > 0 and src[j - 1].isspace():
            j -= 1
        end = j
        if src[j - 1] == ">":
            depth = 0
            while j > 0:
                j -= 1
                if src[j] == ">":
                    depth += 1
                elif src[j] == "<":
                    depth -= 1
                    if depth == 0:
                        break
        while j > 0 and (src[j - 1].isalnum() or src[j - 1] in "_:"):
            j -= 1
        kernel = src[j:end].strip()
        if not kernel or not (kernel[0].isalpha() or kernel[0] in "_:"):
            raise TranslateError(f"cannot find the kernel before <<< at offset {i}")
        k = src.find(">>>", i)
        cfg = src[i + 3:k]
        p = k + 3
        while src[p].isspace():
            p += 1
        if src[p] != "(":
            raise TranslateError(f"no argument list after >>> for {kernel}")
        q = _match_close(src, p, "(", ")")
        args = src[p + 1:q]
        name = re.sub(r"\s+", " ", kernel)
        out.append(src[pos:j])
        out.append(f'::emu::launch({kernel}, ::emu::Cfg({cfg}), "{name}")({args})')
        pos = q + 1


_EXTERN = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC = re.compile(r"(?<![\w])__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:]+)\s+([^;]+);")


def rewrite_shared(src: str) -> str:
    src = _EXTERN.sub(lambda m: f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>(::emu::dyn_smem());",
                      src)
    site = [0]

    def static(m: re.Match) -> str:
        ty = m.group(1)
        decls = []
        for d in _split_top(m.group(2)):
            dm = re.fullmatch(r"(\w+)\s*((?:\[[^\]]+\]\s*)*)", d)
            if not dm:
                raise TranslateError(f"cannot rewrite the __shared__ declarator '{d}'")
            site[0] += 1
            dims = re.sub(r"\s+", "", dm.group(2))
            decls.append(f"auto& {dm.group(1)} = ::emu::static_shared<{ty}{dims}, {site[0]}>();")
        return " ".join(decls)

    src = _STATIC.sub(static, src)
    if re.search(r"(?<![\w])__shared__(?![\w])", src):
        raise TranslateError("a __shared__ declaration was not rewritten")
    return src


def _string_literals(s: str) -> tuple[str, int]:
    """Concatenated C string literals at the start of s (after whitespace); returns (text, index after them)."""
    text, j = [], 0
    while True:
        while j < len(s) and s[j].isspace():
            j += 1
        if j >= len(s) or s[j] != '"':
            return "".join(text), j
        k = j + 1
        buf = []
        while s[k] != '"':
            if s[k] == "\\":
                buf.append({"n": "\n", "t": "\t", '"': '"', "\\": "\\"}.get(s[k + 1], s[k + 1]))
                k += 2
            else:
                buf.append(s[k])
                k += 1
        text.append("".join(buf))
        j = k + 1


def _operands(section: str) -> list[tuple[str, str]]:
    ops = []
    for item in _split_top(section):
        m = re.fullmatch(r'"([=+&]*)([a-z]+)"\s*\((.*)\)', item, re.S)
        if not m:
            raise TranslateError(f"cannot parse the asm operand '{item}'")
        ops.append((m.group(1), m.group(3).strip()))
    return ops


def rewrite_asm(src: str) -> str:
    out, pos = [], 0
    for m in re.finditer(r"\basm\s+volatile\s*\(", src):
        if m.start() < pos:
            continue
        p = m.end() - 1
        q = _match_close(src, p, "(", ")")
        body = src[p + 1:q]
        text, j = _string_literals(body)
        rest = body[j:].lstrip()
        if rest and not rest.startswith(":"):
            raise TranslateError(f"unexpected text after the asm string: {rest[:40]}")
        parts = rest[1:].split(":") if rest else []
        outs = _operands(parts[0]) if len(parts) > 0 and parts[0].strip() else []
        ins = _operands(parts[1]) if len(parts) > 1 and parts[1].strip() else []
        ops = [e for _, e in outs] + [e for _, e in ins]
        stmts = [x.strip() for x in text.split(";") if x.strip()]
        calls = []
        for st in stmts:
            op, _, operand_text = st.partition(" ")
            if not re.fullmatch(r"[a-z][a-z0-9_.:]*", op):
                raise TranslateError(f"cannot rewrite the PTX instruction '{st}'")
            args = []
            for tok in re.findall(r"%(\d+)|(?<![%\w])(\d+)(?![\w])", operand_text):
                if tok[0]:
                    n = int(tok[0])
                    if n >= len(ops):
                        raise TranslateError(f"%{n} has no operand in '{st}'")
                    args.append(ops[n])
                else:
                    args.append(tok[1])
            calls.append(f"::emu::ptx_{re.sub(r'[.:]+', '_', op)}({', '.join(args)})")
        out.append(src[pos:m.start()])
        out.append("; ".join(calls) if calls else "(void)0")
        pos = q + 1
    out.append(src[pos:])
    return "".join(out)


def translate(src: str) -> str:
    src = re.sub(r'#include\s+"([\w./]+\.cuh)"', r'#include "\1.cpp"', src)
    src = rewrite_asm(src)
    src = rewrite_shared(src)
    src = rewrite_launches(src)
    return src


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    try:
        with open(argv[0]) as f:
            out = translate(f.read())
    except TranslateError as e:
        print(f"translate.py: {argv[0]}: {e}", file=sys.stderr)
        return 1
    with open(argv[1], "w") as f:
        f.write(f"// generated by tests/cuda_emu/translate.py from {argv[0]}: do not edit\n#line 1 \"{argv[0]}\"\n")
        f.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
