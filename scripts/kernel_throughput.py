"""The microkernels' inner loops as each CPU family gets them, and the rate
LLVM's scheduling model of that CPU predicts for them (llvm-mca).

    python scripts/kernel_throughput.py                        # every CPU name below
    python scripts/kernel_throughput.py --cpus skylake-avx512,haswell

No such CPU is needed: each CPU name's code is generated in a child process
(NUMBA_CPU_NAME, its own NUMBA_CACHE_DIR) and nothing of it runs. llvm-mca
then simulates each inner loop of fused multiply-adds on the named CPU's
model, as if every load hit L1, and the script prints its predicted cycles
an iteration and its share of the FMA units' peak. That peak comes from the
same model: a block of independent FMAs of the loop's vector width. A
kernel's share is its loops' FMAs over their cycles (each loop runs once per
source row, so they weigh alike).

What this can and cannot say: it checks that a loop's instructions keep the
FMA units busy (enough independent accumulators for the FMA latency, few
enough loads and other instructions for the ports); it says nothing of
caches or memory, which decide how fast a whole step runs. Use it for the
CPUs you cannot time.

CPU names and the model each is simulated on: LLVM 14's znver3 model issues
one 256-bit FMA a cycle where Zen 3 issues two (measured: 92-93 GFLOP/s a
core from a register-only loop), so Zen 3's code is simulated on znver2's
model (same FMA units and latency as Zen 3); LLVM 14 has no Zen 4 or Zen 5
model, so their AVX-512 code is left out here (tests/test_microkernel.py
checks its registers and vector width).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

# CPU names LLVM knows, with the vector registers their code must use
CPUS = {
    "skylake-avx512": 512, "icelake-server": 512, "sapphirerapids": 512,  # Intel tuning
    "znver4": 512, "znver5": 512,  # AMD tuning
    "haswell": 256, "znver3": 256,  # AVX2: 16 registers
}
# the llvm-mca model each CPU name's code is simulated on (see above)
MODELS = {"skylake-avx512": "skylake-avx512", "icelake-server": "icelake-server",
          "sapphirerapids": "sapphirerapids", "haswell": "haswell", "znver3": "znver2"}

# Compiles block_multiply_add (64, 48 and 16 columns), dot_tile, transpose_tile
# and listed_block for float32 and float64; prints {"<dtype>-<kernel>": assembly}
CHILD = textwrap.dedent("""
    import json, sys
    import numba
    from numba import njit, types
    from fastmlp.jit import FASTMATH
    from fastmlp.microkernel import block_multiply_add, dot_tile, listed_block, transpose_tile
    out = {}
    for dtype in (types.float32, types.float64):
        matrix = types.Array(dtype, 2, "A")
        signature = types.void(matrix, matrix, matrix, types.intp, types.intp, types.intp,
                               types.intp, types.boolean)
        for width in (64, 48, 16):
            exec(f"def block(out, coef, src, r, rows, k0, nt, add):\\n"
                 f"    block_multiply_add(out, coef, src, r, rows, k0, nt, add, {width})",
                 globals())
            compiled = njit(signature, fastmath=FASTMATH)(block)
            out[f"{dtype}-{width}"] = compiled.inspect_asm(compiled.signatures[0])
        tile_signature = types.void(matrix, matrix, matrix, types.intp, types.intp,
                                    types.intp, types.intp)
        compiled = njit(tile_signature, fastmath=FASTMATH)(
            lambda out, inp, weight, b, rows, j, outs: dot_tile(out, inp, weight, b, rows, j,
                                                                outs))
        out[f"{dtype}-dot"] = compiled.inspect_asm(compiled.signatures[0])
        compiled = njit(types.void(matrix, matrix, types.intp, types.intp))(
            lambda dst, src, j, k: transpose_tile(dst, src, j, k))
        out[f"{dtype}-transpose"] = compiled.inspect_asm(compiled.signatures[0])
        listed_signature = types.void(matrix, matrix, matrix, types.Array(types.int32, 1, "C"),
                                      types.intp, types.intp, types.intp, types.intp, types.intp,
                                      types.intp, types.boolean)
        compiled = njit(listed_signature, fastmath=FASTMATH)(
            lambda out, coef, src, sources, r, rows, gap, nt, k0, k1, add: listed_block(
                out, coef, src, sources, r, rows, gap, nt, k0, k1, add))
        out[f"{dtype}-listed"] = compiled.inspect_asm(compiled.signatures[0])
    print(json.dumps(out))
""")


def compile_for(cpus, cache_root):
    """{cpu: {"<dtype>-<kernel>": assembly}}: the microkernels compiled for
    each CPU name, in child processes running side by side."""
    children = {}
    for cpu in cpus:
        env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="",
                   NUMBA_CACHE_DIR=os.path.join(cache_root, cpu))
        children[cpu] = subprocess.Popen([sys.executable, "-c", CHILD], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
    results = {}
    for cpu, child in children.items():
        stdout, stderr = child.communicate(timeout=600)
        if child.returncode != 0:
            raise RuntimeError(f"compiling for {cpu} failed:\n{stderr}")
        results[cpu] = json.loads(stdout.splitlines()[-1])
    return results


def loops(assembly):
    """The bodies of the innermost loops: the lines from a label to a
    branch back to it with no other label in between."""
    lines = assembly.splitlines()
    found = []
    for i, line in enumerate(lines):
        jump = re.match(r"\s+j\w+\s+(\.LBB\S+)", line)
        if not jump:
            continue
        for j in range(i - 1, -1, -1):
            if lines[j].startswith(jump.group(1) + ":"):
                body = lines[j + 1:i]
                if not any(re.match(r"\.LBB\S+:", b) for b in body):
                    found.append(body)
                break
    return found


def fma_loops(assembly):
    """The inner loops that do multiply-adds."""
    return [body for body in loops(assembly) if any("vfmadd" in line for line in body)]


def llvm_mca():
    """The llvm-mca command on this machine (Debian's `llvm` or `llvm-NN`
    package), or None."""
    found = shutil.which("llvm-mca")
    if found:
        return found
    for version in range(30, 10, -1):
        found = shutil.which(f"llvm-mca-{version}")
        if found:
            return found
    return None


def cycles_per_iteration(instructions, model, iterations=200):
    """llvm-mca's simulated cycles per iteration of a loop body (AT&T
    lines; labels, directives and comments are dropped) on a CPU model."""
    text = "\n".join(line for line in instructions
                     if line.strip() and not line.strip().startswith((".", "#")))
    result = subprocess.run([llvm_mca(), f"-mcpu={model}", f"-iterations={iterations}"],
                            input=text, capture_output=True, text=True, check=True)
    total = re.search(r"Total Cycles:\s+(\d+)", result.stdout)
    return int(total.group(1)) / iterations


def fma_peak(model, register):
    """FMAs a cycle on the model: 16 independent ones on `register`
    (ymm or zmm) vectors."""
    block = [f"vfmadd231ps %{register}0, %{register}1, %{register}{2 + i}" for i in range(16)]
    return 16 / cycles_per_iteration(block, model)


def kernel_rate(name, assembly, model):
    """(FMAs a cycle over the kernel's inner loops, the model's peak, and
    per loop (FMAs, cycles, times run)) for one compiled kernel, named as
    CHILD names it. A block kernel runs one loop per column panel, all over
    the same source rows, and a panel size's loop is one function however
    often it is called (AVX2's 64 float32 columns: panels of 2, 3 and 3
    vectors, so the 3-vector loop counts twice). A dot kernel's loops of
    fewer outputs than a tile (a call's last outputs) count for nothing:
    they do few of a layer's multiply-adds."""
    from fastmlp.microkernel import ROWS, panel_vectors, panels
    dtype, kernel = name.split("-")
    bits = 512 if "%zmm" in assembly else 256
    loops_of = [(sum("vfmadd" in line for line in loop), loop) for loop in fma_loops(assembly)]
    runs = {}
    if kernel.isdigit():
        lanes = bits // (32 if dtype == "float32" else 64)
        for size in panels(int(kernel) // lanes, panel_vectors(bits)):
            runs[ROWS * size] = runs.get(ROWS * size, 0) + 1
    else:  # a dot tile: the whole tile's loop
        runs[max(fmas for fmas, _ in loops_of)] = 1
    per_loop = []
    for fmas, loop in loops_of:
        if fmas in runs:
            per_loop.append((fmas, cycles_per_iteration(loop, model), runs[fmas]))
    rate = sum(f * n for f, _, n in per_loop) / sum(c * n for _, c, n in per_loop)
    return rate, fma_peak(model, "zmm" if bits == 512 else "ymm"), per_loop


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--cpus", default=",".join(MODELS),
                        help="comma-separated CPU names, of: " + ", ".join(MODELS))
    args = parser.parse_args(argv)
    cpus = [c for c in args.cpus.split(",") if c]
    unknown = [c for c in cpus if c not in MODELS]
    if unknown:
        parser.error(f"no scheduling model for {', '.join(unknown)}; "
                     f"choose from {', '.join(MODELS)}")
    if llvm_mca() is None:
        parser.error("llvm-mca not found: apt-get install llvm")
    version = subprocess.run([llvm_mca(), "--version"], capture_output=True,
                             text=True).stdout.split("\n")[0].strip()
    print(f"{version}; share of the FMA units' peak, simulated per inner loop")
    with tempfile.TemporaryDirectory() as cache_root:
        compiled = compile_for(cpus, cache_root)
    print(f"{'CPU name (model)':32s} {'kernel':14s} {'FMAs/cycle':>10s} {'peak':>5s} "
          f"{'share':>6s}  loops: FMAs @ cycles an iteration (x runs)")
    for cpu in cpus:
        model = MODELS[cpu]
        for name, assembly in compiled[cpu].items():
            if name.endswith("-transpose"):
                continue
            rate, peak, per_loop = kernel_rate(name, assembly, model)
            detail = ", ".join(f"{f} @ {c:.2f}" + (f" x{n}" if n > 1 else "")
                               for f, c, n in per_loop)
            print(f"{cpu + ' (' + model + ')':32s} {name:14s} {rate:10.2f} {peak:5.2f} "
                  f"{rate / peak:6.0%}  {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
