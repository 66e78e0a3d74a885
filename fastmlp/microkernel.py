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
        vector = ir.VectorType(value, lanes)
        # rows past the last real one repeat it (loaded, never stored)
        last = builder.sub(rows_, ir.Constant(i64, 1))
        row_index = [builder.add(r_, builder.select(
            builder.icmp_signed("<", ir.Constant(i64, i), rows_), ir.Constant(i64, i), last))
            for i in range(ROWS)]

        def row_pointer(array, row, column):
            # &array[row, column] as a pointer to `value`
            stride = builder.extract_value(array.strides, 0)
            byte = builder.add(builder.mul(row, stride),
                               builder.mul(column, ir.Constant(i64, itemsize)))
            data = builder.bitcast(array.data, ir.IntType(8).as_pointer())
            return builder.bitcast(builder.gep(data, [byte]), value.as_pointer())

        def vector_at(pointer, offset):
            return builder.bitcast(builder.gep(pointer, [ir.Constant(i64, offset)]),
                                   vector.as_pointer())

        def element_at(pointer, index, step):
            # pointer + index * step bytes
            byte = builder.gep(builder.bitcast(pointer, ir.IntType(8).as_pointer()),
                               [builder.mul(index, step)])
            return builder.bitcast(byte, value.as_pointer())

        coef_rows = [row_pointer(coef_arr, row, ir.Constant(i64, 0)) for row in row_index]
        coef_step = builder.extract_value(coef_arr.strides, 1)  # dout.T's is not 1
        flags = ("contract",)
        column = 0
        for nvec in panels(columns // lanes, panel_vectors(bits)):
            k = builder.add(k0_, ir.Constant(i64, column))
            out_rows = [row_pointer(out_arr, row, k) for row in row_index]
            src_first = row_pointer(src_arr, ir.Constant(i64, 0), k)
            src_stride = builder.extract_value(src_arr.strides, 0)
            zero = ir.Constant(vector, None)
            start = []
            for i in range(ROWS):
                for v in range(nvec):
                    held = builder.load(vector_at(out_rows[i], v * lanes), align=itemsize)
                    start.append(builder.select(add_, held, zero))
            # the loop over source rows t, accumulators as phi nodes
            entry = builder.block
            header = builder.append_basic_block("panel_loop")
            body = builder.append_basic_block("panel_body")
            done = builder.append_basic_block("panel_done")
            builder.branch(header)
            builder.position_at_end(header)
            t = builder.phi(i64)
            t.add_incoming(ir.Constant(i64, 0), entry)
            acc = []
            for s in start:
                phi = builder.phi(vector)
                phi.add_incoming(s, entry)
                acc.append(phi)
            builder.cbranch(builder.icmp_signed("<", t, nt_), body, done)
            builder.position_at_end(body)
            src_row = element_at(src_first, t, src_stride)
            x = [builder.load(vector_at(src_row, v * lanes), align=itemsize)
                 for v in range(nvec)]
            new = []
            for i in range(ROWS):
                a = builder.load(element_at(coef_rows[i], t, coef_step))
                splat = builder.shuffle_vector(
                    builder.insert_element(ir.Constant(vector, ir.Undefined), a,
                                           ir.Constant(ir.IntType(32), 0)),
                    ir.Constant(vector, ir.Undefined),
                    ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))
                for v in range(nvec):
                    product = builder.fmul(splat, x[v], flags=flags)
                    new.append(builder.fadd(acc[i * nvec + v], product, flags=flags))
            t_next = builder.add(t, ir.Constant(i64, 1))
            body_end = builder.block
            t.add_incoming(t_next, body_end)
            for phi, n in zip(acc, new):
                phi.add_incoming(n, body_end)
            builder.branch(header)
            builder.position_at_end(done)
            for i in range(ROWS):
                real = builder.icmp_signed("<", ir.Constant(i64, i), rows_)
                with builder.if_then(real, likely=True):
                    for v in range(nvec):
                        builder.store(acc[i * nvec + v], vector_at(out_rows[i], v * lanes),
                                      align=itemsize)
            column += nvec * lanes
        return context.get_dummy_value()

    index = types.intp
    return types.void(out, coef, src, index, index, index, index, types.boolean, width), codegen
