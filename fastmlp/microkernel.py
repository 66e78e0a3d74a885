"""The register-blocked product at the heart of every wide layer, written
with explicit vector types so that its accumulators stay in registers under
every CPU's code generation.

`block_multiply_add(out, coef, src, r, rows, k0, nt, add, width)` computes
out[r:r + rows, k0:k0 + width] (+)= coef[r:r + rows, :nt] @ src[:nt, k0:k0 + width]
for rows 1 to 4: each output is one chain of multiply-adds over t = 0..nt-1
in order, started from what `out` holds if `add`, else from 0.

Written as scalar loops (as before), LLVM's choices decided whether the 4 x
width accumulators stayed in registers: with Intel tuning it prefers 256-bit
vectors on AVX-512 CPUs (32 accumulators for 16 registers' worth), and with
AVX2 there are only 16 vector registers; both spilled to the stack on every
multiply-add. Here the code generator emits the loop itself, as LLVM IR
whose accumulators are vector values (phi nodes): `<16 x float>` where the
target has AVX-512, `<8 x float>` with AVX2, `<4 x float>` otherwise. An
explicit 512-bit type is legal on every AVX-512 target whatever its
preferred width. The `width` columns go in column panels of at most
`panel_vectors()` vectors per row, so that 4 rows of accumulators, one
panel of source vectors and a broadcast fit the register file (BLIS's rule):

  AVX-512 (32 registers): 4 rows x 4 vectors = 16 accumulators
  AVX2/SSE (16 registers): 4 rows x 3 vectors = 12 accumulators

The multiply-adds carry the `contract` flag, as every kernel's do, so they
become FMAs wherever the CPU has them: the same roundings as the scalar
code, whatever the vector width, so results do not depend on it.
tests/test_microkernel.py compiles this for many CPU names and checks that
the inner loops touch no stack.
"""
import functools

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

ROWS = 4
# vector registers of each width's instruction set: AVX-512 has 32
REGISTERS = {512: 32, 256: 16, 128: 16}


@functools.lru_cache(maxsize=None)
def vector_bits(cpu_name, features):
    """The widest vector registers (512, 256 or 128 bits) that LLVM uses for
    an explicit vector type on this CPU name and feature string: read off
    the assembly of a 512-bit add, so that it holds for any CPU LLVM knows."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    module = llvm.parse_assembly(
        "define void @probe(ptr %p) {\n"
        "  %a = load <16 x float>, ptr %p\n"
        "  %b = fadd <16 x float> %a, %a\n"
        "  store <16 x float> %b, ptr %p\n"
        "  ret void\n}\n")
    target = llvm.Target.from_default_triple()
    machine = target.create_target_machine(cpu=cpu_name, features=features, opt=2)
    assembly = machine.emit_assembly(module)
    if "zmm" in assembly:
        return 512
    return 256 if "ymm" in assembly else 128


def compiled_target():
    """(LLVM CPU name, vector bits) that kernels compiled in this process
    are generated for: the host's, or NUMBA_CPU_NAME's."""
    from numba.core.registry import cpu_target
    codegen = cpu_target.target_context.codegen()
    name = codegen._get_host_cpu_name()
    return name, vector_bits(name, codegen._tm_features)


def target_vector_bits(context):
    # the vector width of the CPU that `context` compiles for
    # (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, or the host)
    codegen = context.codegen()
    return vector_bits(codegen._get_host_cpu_name(), codegen._tm_features)


def panel_vectors(bits):
    """Vectors per row in one column panel: 4 rows of accumulators plus the
    panel's source vectors and one broadcast within the register file."""
    return (REGISTERS[bits] - 1) // (ROWS + 1)


def panels(nvec, most):
    # nvec vectors in as few panels of at most `most` as possible, of
    # near-equal sizes (8 AVX2 vectors: 3, 3, 2)
    count = -(-nvec // most)
    return [nvec * (i + 1) // count - nvec * i // count for i in range(count)]


def panel_function(module, value, itemsize, lanes, nvec):
    """The LLVM function that runs one column panel of nvec vectors a row,
    defined once per module:

      void panel(out, out_stride, coef, coef_stride, coef_step, src,
                 src_stride, nt, rows, add)

    pointers to out[r, k], coef[r, 0] and src[0, k]; strides and the step
    along coef's t axis in bytes. A function of its own (not inlined), so
    that only the panel's own values are live in its loop: general
    registers then suffice for its pointers, and nothing is spilled."""
    name = f"fastmlp_panel_{value}_{lanes}x{nvec}"
    try:
        return module.get_global(name)
    except KeyError:
        pass
    i64 = ir.IntType(64)
    byte_pointer = ir.IntType(8).as_pointer()
    function = ir.Function(module, ir.FunctionType(ir.VoidType(), [
        byte_pointer, i64, byte_pointer, i64, i64, byte_pointer, i64, i64, i64, ir.IntType(1)]),
        name)
    function.linkage = "internal"
    function.attributes.add("noinline")
    function.attributes.add("nounwind")
    # no unrolling: unrolled by 2, the loop wants a second set of coef
    # offsets (their step is not a constant), and one spilled to the stack
    function.attributes.add("optsize")
    out, out_stride, coef, coef_stride, coef_step, src, src_stride, nt, rows, add = function.args
    vector = ir.VectorType(value, lanes)
    builder = ir.IRBuilder(function.append_basic_block("entry"))

    def at(pointer, offset, kind=value):
        # pointer + offset bytes, as a pointer to `kind`
        return builder.bitcast(builder.gep(pointer, [offset]), kind.as_pointer())

    # rows past the last real one repeat it (loaded, never stored)
    last = builder.sub(rows, ir.Constant(i64, 1))
    row = [builder.select(builder.icmp_signed("<", ir.Constant(i64, i), rows),
                          ir.Constant(i64, i), last) for i in range(ROWS)]
    out_rows = [builder.gep(out, [builder.mul(i, out_stride)]) for i in row]
    coef_rows = [builder.gep(coef, [builder.mul(i, coef_stride)]) for i in row]

    def vector_at(pointer, v):
        return at(pointer, ir.Constant(i64, v * lanes * itemsize), vector)

    zero = ir.Constant(vector, None)
    start = [builder.select(add, builder.load(vector_at(out_rows[i], v), align=itemsize), zero)
             for i in range(ROWS) for v in range(nvec)]
    # the loop over source rows t, accumulators as phi nodes
    entry = builder.block
    header = function.append_basic_block("loop")
    body = function.append_basic_block("body")
    done = function.append_basic_block("done")
    builder.branch(header)
    builder.position_at_end(header)
    t = builder.phi(i64)
    t.add_incoming(ir.Constant(i64, 0), entry)
    acc = []
    for s in start:
        phi = builder.phi(vector)
        phi.add_incoming(s, entry)
        acc.append(phi)
    builder.cbranch(builder.icmp_signed("<", t, nt), body, done)
    builder.position_at_end(body)
    src_row = builder.gep(src, [builder.mul(t, src_stride)])
    x = [builder.load(vector_at(src_row, v), align=itemsize) for v in range(nvec)]
    flags = ("contract",)  # as every kernel's: FMAs wherever the CPU has them
    new = []
    for i in range(ROWS):
        a = builder.load(at(coef_rows[i], builder.mul(t, coef_step)))
        splat = builder.shuffle_vector(
            builder.insert_element(ir.Constant(vector, ir.Undefined), a,
                                   ir.Constant(ir.IntType(32), 0)),
            ir.Constant(vector, ir.Undefined),
            ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))
        for v in range(nvec):
            new.append(builder.fadd(acc[i * nvec + v], builder.fmul(splat, x[v], flags=flags),
                                    flags=flags))
    for phi, value_ in zip(acc + [t], new + [builder.add(t, ir.Constant(i64, 1))]):
        phi.add_incoming(value_, builder.block)
    builder.branch(header)
    builder.position_at_end(done)
    for i in range(ROWS):
        with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, i), rows), likely=True):
            for v in range(nvec):
                builder.store(acc[i * nvec + v], vector_at(out_rows[i], v), align=itemsize)
    builder.ret_void()
    return function


@intrinsic
def block_multiply_add(typingctx, out, coef, src, r, rows, k0, nt, add, width):
    # out is (R, C), coef is (R, T), src is (T, C), 2-D arrays of one float
    # type; out and src have unit stride along their last axis (coef any
    # strides); width is a literal multiple of 16.
    if not isinstance(width, types.IntegerLiteral):
        return None
    if not all(isinstance(a, types.Array) and a.ndim == 2 for a in (out, coef, src)):
        return None
    dtype = out.dtype
    if not isinstance(dtype, types.Float) or coef.dtype != dtype or src.dtype != dtype:
        return None
    columns = width.literal_value

    def codegen(context, builder, signature, args):
        out_arr, coef_arr, src_arr = (context.make_array(t)(context, builder, a)
                                      for t, a in zip(signature.args[:3], args[:3]))
        r_, rows_, k0_, nt_, add_ = args[3:8]
        i64 = ir.IntType(64)
        value = context.get_value_type(dtype)
        itemsize = context.get_abi_sizeof(value)
        bits = target_vector_bits(context)
        lanes = bits // 8 // itemsize

        def address(array, row, column):
            # &array[row, column] as a byte pointer
            data = builder.bitcast(array.data, ir.IntType(8).as_pointer())
            return builder.gep(data, [builder.add(
                builder.mul(row, builder.extract_value(array.strides, 0)),
                builder.mul(column, ir.Constant(i64, itemsize)))])

        column = 0
        for nvec in panels(columns // lanes, panel_vectors(bits)):
            k = builder.add(k0_, ir.Constant(i64, column))
            panel = panel_function(builder.module, value, itemsize, lanes, nvec)
            builder.call(panel, [
                address(out_arr, r_, k), builder.extract_value(out_arr.strides, 0),
                address(coef_arr, r_, ir.Constant(i64, 0)),
                builder.extract_value(coef_arr.strides, 0),
                builder.extract_value(coef_arr.strides, 1),  # dout.T's is not 1
                address(src_arr, ir.Constant(i64, 0), k),
                builder.extract_value(src_arr.strides, 0), nt_, rows_, add_])
            column += nvec * lanes
        return context.get_dummy_value()

    index = types.intp
    return types.void(out, coef, src, index, index, index, index, types.boolean, width), codegen
