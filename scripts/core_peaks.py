"""Multiply-add peaks of one core, from loops that touch no memory.

    python scripts/core_peaks.py [--seconds 0.5] [--rounds 5]

Times, on the calling thread, register-only loops compiled by llvmlite for
this CPU: float32 and float64 FMAs on the widest vectors (12 independent
accumulators, so that the FMA latency is hidden); AVX512_BF16's
`vdpbf16ps` (12 accumulators, 2 multiply-adds a float32 lane); and AMX's
`tdpbf16ps` (4 accumulator tiles of 16 x 16, each instruction 16 x 16 x 32
multiply-adds), each where the CPU has it. Prints the median GFLOP/s of each over
--rounds (a multiply-add counts 2), so that bfloat16 speed-ups can be read
against what the core itself does.
"""
import argparse
import ctypes
import os
import statistics
import sys
import time

import llvmlite.binding as llvm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fastmlp import amx  # noqa: E402
from fastmlp.bfloat16 import native_support  # noqa: E402

ACCUMULATORS = 12
UNROLL = 8  # instructions a chain per loop trip


def vector_loop(name, lanes, instruction, element="float"):
    """LLVM IR of `void name(i64 trips)`: ACCUMULATORS chains of
    `instruction` (a format string of acc, a, b giving the new acc) on
    vectors of `lanes` values of `element`."""
    vector = f"<{lanes} x {element}>"
    lines = [f"define void @{name}(i64 %trips) {{", "entry:", "  br label %loop", "loop:",
             "  %i = phi i64 [0, %entry], [%next, %loop]"]
    for k in range(ACCUMULATORS):
        lines.append(f"  %acc{k}_0 = phi {vector} [zeroinitializer, %entry], "
                     f"[%acc{k}_{UNROLL}, %loop]")
    for step in range(UNROLL):
        for k in range(ACCUMULATORS):
            lines.append(f"  %acc{k}_{step + 1} = " + instruction.format(
                acc=f"{vector} %acc{k}_{step}", a=f"{vector} splat ({element} 5.0e-1)"))
    lines += ["  %next = add i64 %i, 1", "  %more = icmp ult i64 %next, %trips",
              "  br i1 %more, label %loop, label %done", "done:"]
    # keep the sums: store them nowhere visible, through a volatile asm use
    for k in range(ACCUMULATORS):
        lines.append(f'  call void asm sideeffect "", "v"({vector} %acc{k}_{UNROLL})')
    lines += ["  ret void", "}"]
    return "\n".join(lines)


def fma_ir(lanes, element="float"):
    # `lanes` values of float (float32) or double (float64) a vector
    v = f"<{lanes} x {element}>"
    name = f"@llvm.fma.v{lanes}{'f32' if element == 'float' else 'f64'}"
    return (f"declare {v} {name}({v}, {v}, {v})\n"
            + vector_loop("kernel", lanes, f"call {v} {name}({{a}}, {{a}}, {{acc}})", element))


def dpbf16_ir():
    bf16 = "<32 x bfloat>"
    return (f"declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, {bf16}, "
            f"{bf16})\n"
            + vector_loop("kernel", 16, "call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512("
                          "{acc}, <32 x bfloat> splat (bfloat 0xR3A83), "
                          "<32 x bfloat> splat (bfloat 0xR3A83))"))


def amx_ir():
    lines = ["declare void @llvm.x86.ldtilecfg(ptr)", "declare void @llvm.x86.tilerelease()",
             "declare void @llvm.x86.tilezero(i8)", "declare void @llvm.x86.tdpbf16ps(i8, i8, i8)",
             "define void @kernel(i64 %trips, ptr %config) {", "entry:",
             "  call void @llvm.x86.ldtilecfg(ptr %config)"]
    lines += [f"  call void @llvm.x86.tilezero(i8 {t})" for t in range(8)]
    lines += ["  br label %loop", "loop:", "  %i = phi i64 [0, %entry], [%next, %loop]"]
    for _ in range(UNROLL):
        # 4 accumulators (tiles 0-3) from A tiles 4-5 and B tiles 6-7
        lines += [f"  call void @llvm.x86.tdpbf16ps(i8 {c}, i8 {4 + c // 2}, i8 {6 + c % 2})"
                  for c in range(4)]
    lines += ["  %next = add i64 %i, 1", "  %more = icmp ult i64 %next, %trips",
              "  br i1 %more, label %loop, label %done", "done:",
              "  call void @llvm.x86.tilerelease()", "  ret void", "}"]
    return "\n".join(lines)


def compile_kernel(ir_text):
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    module = llvm.parse_assembly(ir_text)
    module.verify()
    target = llvm.Target.from_default_triple()
    machine = target.create_target_machine(cpu=llvm.get_host_cpu_name(),
                                           features=llvm.get_host_cpu_features().flatten(),
                                           opt=2)
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    return engine, engine.get_function_address("kernel")


def rate(function, flops_per_trip, seconds, rounds, *extra):
    """Median GFLOP/s over rounds of about `seconds` each."""
    trips = 1000
    while True:  # calibrate
        started = time.perf_counter()
        function(trips, *extra)
        elapsed = time.perf_counter() - started
        if elapsed > seconds / 4:
            break
        trips *= 4
    trips = max(1, int(trips * seconds / elapsed))
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        function(trips, *extra)
        rates.append(trips * flops_per_trip / (time.perf_counter() - started) / 1e9)
    return statistics.median(rates)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seconds", type=float, default=0.5, help="length of a round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    features = llvm.get_host_cpu_features()
    lanes = 16 if features.get("avx512f") else 8 if features.get("fma") else 4
    print(f"LLVM CPU name: {llvm.get_host_cpu_name()}; one core, "
          f"{args.rounds} rounds of {args.seconds} s, median")
    engines = []
    signature = ctypes.CFUNCTYPE(None, ctypes.c_int64)
    for name, element, values in (("float32", "float", lanes), ("float64", "double", lanes // 2)):
        engine, address = compile_kernel(fma_ir(values, element))
        engines.append(engine)
        per_trip = 2 * values * ACCUMULATORS * UNROLL
        show(f"{name} FMA, {32 * lanes}-bit", rate(signature(address), per_trip, args.seconds,
                                                   args.rounds))
    if "avx512_bf16" in native_support():
        engine, address = compile_kernel(dpbf16_ir())
        engines.append(engine)
        per_trip = 2 * 32 * ACCUMULATORS * UNROLL
        show("vdpbf16ps, 512-bit", rate(signature(address), per_trip, args.seconds, args.rounds))
    else:
        print("vdpbf16ps: not on this CPU")
    if "amx_bf16" in native_support() and amx.tile_permission():
        engine, address = compile_kernel(amx_ir())
        engines.append(engine)
        config = amx_config()
        function = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p)(address)
        per_trip = 2 * 16 * 16 * 32 * 4 * UNROLL
        show("AMX tdpbf16ps", rate(function, per_trip, args.seconds, args.rounds,
                                   ctypes.addressof(config)))
    else:
        print("AMX tdpbf16ps: not on this CPU (or not granted by the OS)")


def show(label, gflops):
    print(f"{label + ':':24}{gflops:8.0f} GFLOP/s")


def amx_config():
    # ldtilecfg's 64 bytes: palette 1, 8 tiles of 16 rows x 64 bytes
    config = (ctypes.c_uint8 * 64)()
    config[0] = 1
    for tile in range(8):
        config[16 + 2 * tile] = 64
        config[48 + tile] = 16
    return config


if __name__ == "__main__":
    main()
