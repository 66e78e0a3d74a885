"""The microkernels under every layer, written with explicit vector types
so that their accumulators stay in registers under every CPU's code
generation: `block_multiply_add` (a register block of rows x columns, for
both backward products and the forward pass of wide layers) and `dot_tile`
(dot products along the input axis, for the forward pass of narrow layers);
and `transpose_tile`, which keeps the forward pass's transposed weights
current.

`listed_block` is the register block of 2 rows over only the source rows
that either row's coefficient needs (not 0): a relu layer's outputs and the
deltas below it are about half zeros.

`block_multiply_add(out, coef, src, r, rows, k0, nt, add, width)` computes
out[r:r + rows, k0:k0 + width] (+)= coef[r:r + rows, :nt] @ src[:nt, k0:k0 + width]
for rows 1 to 4; each output is one chain of multiply-adds over t = 0..nt-1
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

  AVX-512 (32 registers): up to 4 rows x 6 vectors; float32's 64 columns
    are one panel of 4 x 4 (16 accumulators), float64's two of 4 x 4
  AVX2/SSE (16 registers): up to 4 rows x 3 vectors (12 accumulators);
    float32's 64 columns are panels of 2, 3 and 3 vectors

Its multiply-adds carry the `contract` flag, as every kernel's do, so they
become FMAs wherever the CPU has them: each output is one chain of FMAs in
source order, whatever the vector width, so results do not depend on it.

`dot_tile` keeps `lanes` partial sums per output (so its roundings do
depend on the vector width, never on the tile's shape) in tiles of 4 rows
by `dot_tile_outputs()` outputs: 4 with AVX-512 (16 accumulators, 8 loaded
vectors), 3 with AVX2 (12 accumulators and 3 weight vectors; each row's
vector is an FMA's memory operand). LLVM's own vectorization of a 4 x 4
tile spilled on AVX2 (784-50 forward on Zen 3: 276 to 177 us for 100 rows
in tiles of 2 rows x 4 outputs, measured), and 4 x 3 took 0.87-0.95 the
time of 2 x 4 (16 to 100 rows, one core, same results bit for bit).

Each kernel is an out-of-line LLVM function per shape (`noinline`, so only
its own values are live in its loop and general registers suffice for its
pointers; `optsize`, so its loop is not unrolled into needing a second set
of them). tests/test_microkernel.py compiles both for seven CPU names and
checks that their inner loops touch no stack.
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
        "define <16 x float> @probe(<16 x float> %a) {\n"
        "  %b = fadd <16 x float> %a, %a\n"
        "  ret <16 x float> %b\n}\n")
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
    # (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, or the host), from the same
    # codegen attributes that key Numba's cache (private in Numba 0.68)
    codegen = context.codegen()
    return vector_bits(codegen._get_host_cpu_name(), codegen._tm_features)


@intrinsic
def compiled_vector_bits(typingctx):
    # the vector width (512, 256 or 128) of the CPU the calling kernel is
    # compiled for, as a constant (target_vector_bits)
    def codegen(context, builder, signature, args):
        return ir.Constant(ir.IntType(64), target_vector_bits(context))
    return types.int64(), codegen


def array_arguments(context, builder, signature, args, count):
    """An intrinsic's first `count` arguments as Numba array structs."""
    return [context.make_array(t)(context, builder, a)
            for t, a in zip(signature.args[:count], args[:count])]


def value_layout(context, dtype):
    """(LLVM type, size in bytes, target vector bits, lanes a vector) of dtype's
    values in the code `context` generates."""
    value = context.get_value_type(dtype)
    itemsize = context.get_abi_sizeof(value)
    bits = target_vector_bits(context)
    return value, itemsize, bits, bits // 8 // itemsize


def panel_vectors(bits):
    """Vectors per row in one column panel: 4 rows of accumulators plus the
    panel's source vectors and one broadcast within the register file."""
    return (REGISTERS[bits] - 1) // (ROWS + 1)


def panels(nvec, most):
    # nvec vectors in as few panels of at most `most` as possible, of
    # near-equal sizes (8 AVX2 vectors: 2, 3, 3)
    count = -(-nvec // most)
    return [nvec * (i + 1) // count - nvec * i // count for i in range(count)]


def out_of_line_function(module, name, arguments):
    """(function, builder at its entry) for a new internal LLVM function
    returning void, or (the module's function of that name, None). Not
    inlined, so that only its own values are live in its loop (general
    registers then suffice for its pointers); optimized for size, so that
    LLVM does not unroll its loop into needing a second set of them (seen:
    one spilled to the stack)."""
    try:
        return module.get_global(name), None
    except KeyError:
        pass
    function = ir.Function(module, ir.FunctionType(ir.VoidType(), arguments), name)
    function.linkage = "internal"
    for attribute in ("noinline", "nounwind", "optsize"):
        function.attributes.add(attribute)
    return function, ir.IRBuilder(function.append_basic_block("entry"))


def strip_function_shell(module, name):
    """out_of_line_function for a strip of product blocks (AMX tiles,
    amx.block_function; vdpbf16ps, dpbf16.strip_function), whose arguments
    are byte pointers and row strides in bytes of C, A and B, then ksteps
    and blocks: void strip(c, c_stride, a, a_stride, b, b_stride, ksteps,
    blocks)."""
    i64 = ir.IntType(64)
    byte_pointer = ir.IntType(8).as_pointer()
    return out_of_line_function(module, name, [byte_pointer, i64, byte_pointer, i64,
                                               byte_pointer, i64, i64, i64])


def clamped_rows(builder, count, n):
    # row indices 0..n-1 of a tile with `count` real rows, the rows past the
    # last real one repeating it (loaded, never stored)
    i64 = ir.IntType(64)
    last = builder.sub(count, ir.Constant(i64, 1))
    return [builder.select(builder.icmp_signed("<", ir.Constant(i64, i), count),
                           ir.Constant(i64, i), last) for i in range(n)]


def accumulating_loop(builder, starts, limit, step, body):
    """Emits `for i in range(0, limit, step)` carrying one accumulator per
    start value as phi nodes: body(i, accumulators) returns their new
    values. Leaves the builder after the loop; returns the final values."""
    i64 = ir.IntType(64)
    function = builder.function
    entry = builder.block
    header = function.append_basic_block("loop")
    inside = function.append_basic_block("body")
    done = function.append_basic_block("done")
    builder.branch(header)
    builder.position_at_end(header)
    index = builder.phi(i64)
    index.add_incoming(ir.Constant(i64, 0), entry)
    acc = []
    for start in starts:
        phi = builder.phi(start.type)
        phi.add_incoming(start, entry)
        acc.append(phi)
    builder.cbranch(builder.icmp_signed("<", index, limit), inside, done)
    builder.position_at_end(inside)
    new = body(index, acc)
    for phi, value in zip(acc + [index], new + [builder.add(index, ir.Constant(i64, step))]):
        phi.add_incoming(value, builder.block)
    builder.branch(header)
    builder.position_at_end(done)
    return acc


def splat(builder, scalar, vector):
    # a vector of `scalar` in every lane
    i32 = ir.IntType(32)
    return builder.shuffle_vector(
        builder.insert_element(ir.Constant(vector, ir.Undefined), scalar, ir.Constant(i32, 0)),
        ir.Constant(vector, ir.Undefined),
        ir.Constant(ir.VectorType(i32, vector.count), [0] * vector.count))


def first_lanes(builder, count, lanes):
    # a mask of `lanes` lanes whose first `count` (an i64 value) are on
    i64 = ir.VectorType(ir.IntType(64), lanes)
    return builder.icmp_signed("<", ir.Constant(i64, list(range(lanes))),
                               splat(builder, count, i64))


def masked_load(builder, pointer, mask, itemsize):
    # the vector at `pointer` where `mask` is on, 0 elsewhere (never read)
    vector = pointer.type.pointee
    i32 = ir.IntType(32)
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vector, [pointer.type, i32, mask.type, vector]),
        f"llvm.masked.load.{masked_suffix(vector, itemsize)}")
    return builder.call(function, [pointer, ir.Constant(i32, itemsize), mask,
                                   ir.Constant(vector, None)])


def masked_store(builder, value, pointer, mask, itemsize):
    # value's lanes where `mask` is on, stored at `pointer`
    i32 = ir.IntType(32)
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [value.type, pointer.type, i32, mask.type]),
        f"llvm.masked.store.{masked_suffix(value.type, itemsize)}")
    builder.call(function, [value, pointer, ir.Constant(i32, itemsize), mask])


def masked_suffix(vector, itemsize):
    # the type suffix of llvm.masked.load/store for `vector`
    return f"v{vector.count}{'f32' if itemsize == 4 else 'f64'}.p0"


def element_address(builder, array, row, column, itemsize):
    # &array[row, column] of a Numba array struct, as a byte pointer
    # (column in elements of `itemsize` bytes: the last axis has unit stride)
    i64 = ir.IntType(64)
    data = builder.bitcast(array.data, ir.IntType(8).as_pointer())
    return builder.gep(data, [builder.add(
        builder.mul(row, builder.extract_value(array.strides, 0)),
        builder.mul(column, ir.Constant(i64, itemsize)))])


def panel_function(module, value, itemsize, lanes, nvec):
    """The LLVM function that runs one column panel of nvec vectors a row,
    defined once per module:

      void panel(out, out_stride, coef, coef_stride, coef_step, src,
                 src_stride, nt, rows, add)

    pointers to out[r, k], coef[r, 0] and src[0, k]; strides and the step
    along coef's t axis in bytes."""
    i64 = ir.IntType(64)
    byte_pointer = ir.IntType(8).as_pointer()
    function, builder = out_of_line_function(
        module, f"fastmlp_panel_{value}_{lanes}x{nvec}",
        [byte_pointer, i64, byte_pointer, i64, i64, byte_pointer, i64, i64, i64, ir.IntType(1)])
    if builder is None:
        return function
    out, out_stride, coef, coef_stride, coef_step, src, src_stride, nt, rows, add = function.args
    vector = ir.VectorType(value, lanes)

    def at(pointer, offset, kind=value):
        # pointer + offset bytes, as a pointer to `kind`
        return builder.bitcast(builder.gep(pointer, [offset]), kind.as_pointer())

    def vector_at(pointer, v):
        return at(pointer, ir.Constant(i64, v * lanes * itemsize), vector)

    row = clamped_rows(builder, rows, ROWS)
    out_rows = [builder.gep(out, [builder.mul(i, out_stride)]) for i in row]
    coef_rows = [builder.gep(coef, [builder.mul(i, coef_stride)]) for i in row]
    zero = ir.Constant(vector, None)
    start = [builder.select(add, builder.load(vector_at(out_rows[i], v), align=itemsize), zero)
             for i in range(ROWS) for v in range(nvec)]
    flags = ("contract",)  # as every kernel's: FMAs wherever the CPU has them

    def step(t, acc):
        # source row t: nvec vectors, times each row's coefficient
        src_row = builder.gep(src, [builder.mul(t, src_stride)])
        x = [builder.load(vector_at(src_row, v), align=itemsize) for v in range(nvec)]
        new = []
        for i in range(ROWS):
            a = splat(builder, builder.load(at(coef_rows[i], builder.mul(t, coef_step))), vector)
            new += [builder.fadd(acc[i * nvec + v], builder.fmul(a, x[v], flags=flags),
                                 flags=flags) for v in range(nvec)]
        return new

    acc = accumulating_loop(builder, start, nt, 1, step)
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
        out_arr, coef_arr, src_arr = array_arguments(context, builder, signature, args, 3)
        r_, rows_, k0_, nt_, add_ = args[3:8]
        i64 = ir.IntType(64)
        value, itemsize, bits, lanes = value_layout(context, dtype)

        def address(array, row, column):
            return element_address(builder, array, row, column, itemsize)

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


# Rows of a listed-sources block, and its vectors of columns per row a call
# (accumulators in registers: 16 of AVX-512's 32, 8 of AVX2's 16, whose 4
# source vectors, each taken by both rows, need registers too)
LISTED_ROWS = 2
LISTED_VECTORS = {512: 8, 256: 4, 128: 4}


def nonzero_sources_function(module, value, itemsize, lanes):
    """The LLVM function that lists a pair of coefficient rows' nonzero
    sources:

      void listed(sources, count, c0, c1, nt)

    sources[:n] = the t < nt, ascending, where c0[t] or c1[t] is not 0
    (NaN counts as not 0; under DAZ a subnormal as 0, as the FMAs take
    it), *count = n; c0 and c1 point to unit-stride rows, sources has room
    for nt + lanes values. With AVX-512, a vector of each row is compared at
    once and the indices of its nonzero lanes packed by vpcompressd into a
    register, stored whole (its form that stores to memory is microcoded on
    Zen 4: about 140 cycles); the last nt % lanes, and all of them on AVX2
    (no compress), one at a time."""
    i64 = ir.IntType(64)
    i32 = ir.IntType(32)
    byte_pointer = ir.IntType(8).as_pointer()
    function, builder = out_of_line_function(
        module, f"fastmlp_listed_{value}_{lanes}",
        [i32.as_pointer(), i64.as_pointer(), byte_pointer, byte_pointer, i64])
    if builder is None:
        return function
    sources, count, c0, c1, nt = function.args
    vector = ir.VectorType(value, lanes)
    mask_type = ir.VectorType(ir.IntType(1), lanes)
    indices = ir.VectorType(i32, lanes)
    vectorized = lanes * itemsize == 64
    if vectorized:
        compress = cgutils.get_or_insert_function(
            module, ir.FunctionType(indices, [indices, indices, mask_type]),
            f"llvm.x86.avx512.mask.compress.v{lanes}i32")
        popcount = cgutils.get_or_insert_function(
            module, ir.FunctionType(ir.IntType(lanes), [ir.IntType(lanes)]),
            f"llvm.ctpop.i{lanes}")
    lane_numbers = ir.Constant(indices, list(range(lanes)))

    def at(row, t, kind):
        byte = builder.gep(row, [builder.mul(t, ir.Constant(i64, itemsize))])
        return builder.bitcast(byte, kind.as_pointer())

    def nonzero(a, b):
        # a != 0 or b != 0, of two scalars or two vectors
        zero = ir.Constant(a.type, None)
        return builder.or_(builder.fcmp_unordered("!=", a, zero),
                           builder.fcmp_unordered("!=", b, zero))

    full = (builder.mul(builder.sdiv(nt, ir.Constant(i64, lanes)), ir.Constant(i64, lanes))
            if vectorized else ir.Constant(i64, 0))

    def vector_step(t, acc):
        (n,) = acc
        mask = nonzero(builder.load(at(c0, t, vector), align=itemsize),
                       builder.load(at(c1, t, vector), align=itemsize))
        base = splat(builder, builder.trunc(t, i32), indices)
        packed = builder.call(compress, [builder.add(base, lane_numbers),
                                         ir.Constant(indices, None), mask])
        builder.store(packed, builder.bitcast(builder.gep(sources, [n]), indices.as_pointer()),
                      align=4)
        listed = builder.call(popcount, [builder.bitcast(mask, ir.IntType(lanes))])
        return [builder.add(n, builder.zext(listed, i64))]

    n = ir.Constant(i64, 0)
    if vectorized:
        (n,) = accumulating_loop(builder, [n], full, lanes, vector_step)

    def scalar_step(i, acc):
        (n,) = acc
        t = builder.add(full, i)
        builder.store(builder.trunc(t, i32), builder.gep(sources, [n]))
        listed = nonzero(builder.load(at(c0, t, value)), builder.load(at(c1, t, value)))
        return [builder.add(n, builder.zext(listed, i64))]

    (n,) = accumulating_loop(builder, [n], builder.sub(nt, full), 1, scalar_step)
    builder.store(n, count)
    builder.ret_void()
    return function


def listed_function(module, value, itemsize, lanes, nvec, masked):
    """The LLVM function that runs a pair of rows' sums over their listed
    sources:

      void listed_block(out, out_stride, coef, coef_stride, src, src_stride,
                        sources, n, rows, tail, add)

    out[i, 0:nvec vectors] = sum over j < n of coef[i, t] * src[t, 0:nvec
    vectors], t = sources[j], for rows i < rows (1 or 2), from what out
    holds if `add`, else from 0; pointers
    to out[r, k], coef[r, 0] (unit stride along t) and src[0, k], strides
    in bytes. With `masked`, the last vector holds `tail` values. Each
    output is the chain of FMAs block_multiply_add gives it over all t, less
    the terms whose coefficient is 0."""
    i64 = ir.IntType(64)
    i32 = ir.IntType(32)
    byte_pointer = ir.IntType(8).as_pointer()
    function, builder = out_of_line_function(
        module, f"fastmlp_listed_{value}_{lanes}x{nvec}{'m' if masked else ''}",
        [byte_pointer, i64, byte_pointer, i64, byte_pointer, i64, i32.as_pointer(), i64, i64,
         i64, ir.IntType(1)])
    if builder is None:
        return function
    (out, out_stride, coef, coef_stride, src, src_stride, sources, n, rows, tail,
     add) = function.args
    vector = ir.VectorType(value, lanes)
    flags = ("contract",)
    row = clamped_rows(builder, rows, LISTED_ROWS)
    out_rows = [builder.gep(out, [builder.mul(i, out_stride)]) for i in row]
    coef_rows = [builder.gep(coef, [builder.mul(i, coef_stride)]) for i in row]
    mask = first_lanes(builder, tail, lanes) if masked else None

    def vector_at(pointer, v):
        byte = builder.gep(pointer, [ir.Constant(i64, v * lanes * itemsize)])
        return builder.bitcast(byte, vector.as_pointer())

    def load(pointer, v):
        if masked and v == nvec - 1:
            return masked_load(builder, vector_at(pointer, v), mask, itemsize)
        return builder.load(vector_at(pointer, v), align=itemsize)

    def step(j, acc):
        t = builder.zext(builder.load(builder.gep(sources, [j])), i64)
        src_row = builder.gep(src, [builder.mul(t, src_stride)])
        x = [load(src_row, v) for v in range(nvec)]
        offset = builder.mul(t, ir.Constant(i64, itemsize))
        new = []
        for i in range(LISTED_ROWS):
            byte = builder.gep(coef_rows[i], [offset])
            a = splat(builder, builder.load(builder.bitcast(byte, value.as_pointer())), vector)
            new += [builder.fadd(acc[i * nvec + v], builder.fmul(a, x[v], flags=flags),
                                 flags=flags) for v in range(nvec)]
        return new

    zero = ir.Constant(vector, None)
    start = [builder.select(add, load(out_rows[i], v), zero)
             for i in range(LISTED_ROWS) for v in range(nvec)]
    acc = accumulating_loop(builder, start, n, 1, step)
    for i in range(LISTED_ROWS):
        with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, i), rows), likely=True):
            for v in range(nvec):
                if masked and v == nvec - 1:
                    masked_store(builder, acc[i * nvec + v], vector_at(out_rows[i], v), mask,
                                 itemsize)
                else:
                    builder.store(acc[i * nvec + v], vector_at(out_rows[i], v), align=itemsize)
    builder.ret_void()
    return function


@intrinsic
def listed_block(typingctx, out, coef, src, sources, r, rows, gap, nt, k0, k1, add):
    # out is (R, C), coef is (R, T) with unit stride along T, src is (T, C),
    # 2-D arrays of one float type, out and src with unit stride along their
    # last axis; sources an int32 array of at least nt + 16 values (scratch):
    # out[i, k0:k1] = coef[i, :nt] @ src[:nt, k0:k1] (added to what out
    # holds if `add`) for the rows i = r (rows 1) or r and r + gap (rows 2;
    # gap may be negative), over the t where either row's coefficient is not
    # 0 (nonzero_sources_function), in calls of LISTED_VECTORS vectors of
    # columns, the last one as wide as they are (masked). Each output is the
    # chain block_multiply_add gives it, less terms that add 0 * x: the same
    # value, as long as the chain holds no -0 (one started from +0 never
    # does) and x is finite.
    if not all(isinstance(a, types.Array) and a.ndim == 2 for a in (out, coef, src)):
        return None
    dtype = out.dtype
    if not isinstance(dtype, types.Float) or coef.dtype != dtype or src.dtype != dtype:
        return None
    if not (isinstance(sources, types.Array) and sources.dtype == types.int32):
        return None

    def codegen(context, builder, signature, args):
        out_arr, coef_arr, src_arr, sources_arr = array_arguments(context, builder, signature,
                                                                  args, 4)
        r_, rows_, gap_, nt_, k0_, k1_, add_ = args[4:11]
        i64 = ir.IntType(64)
        value, itemsize, bits, lanes = value_layout(context, dtype)
        most = LISTED_VECTORS[bits]
        chunk = most * lanes
        zero = ir.Constant(i64, 0)
        one = ir.Constant(i64, 1)
        # the strides from one row of the block to the next
        coef_stride = builder.mul(builder.extract_value(coef_arr.strides, 0), gap_)
        out_stride = builder.mul(builder.extract_value(out_arr.strides, 0), gap_)
        first = element_address(builder, coef_arr, r_, zero, itemsize)
        second = builder.gep(first, [builder.mul(builder.sub(rows_, one), coef_stride)])
        pointer = builder.bitcast(sources_arr.data, ir.IntType(32).as_pointer())
        count = cgutils.alloca_once(builder, i64)
        builder.call(nonzero_sources_function(builder.module, value, itemsize, lanes),
                     [pointer, count, first, second, nt_])
        n = builder.load(count)

        def call(function, k, tail):
            builder.call(function, [
                element_address(builder, out_arr, r_, k, itemsize), out_stride, first,
                coef_stride,
                element_address(builder, src_arr, zero, k, itemsize),
                builder.extract_value(src_arr.strides, 0), pointer, n, rows_, tail, add_])

        width = builder.sub(k1_, k0_)
        whole = builder.sdiv(width, ir.Constant(i64, chunk))
        full = listed_function(builder.module, value, itemsize, lanes, most, False)
        with cgutils.for_range(builder, whole) as loop:
            call(full, builder.add(k0_, builder.mul(loop.index, ir.Constant(i64, chunk))),
                 ir.Constant(i64, lanes))
        k = builder.add(k0_, builder.mul(whole, ir.Constant(i64, chunk)))
        rest = builder.sub(k1_, k)
        vectors = builder.sdiv(builder.add(rest, ir.Constant(i64, lanes - 1)),
                               ir.Constant(i64, lanes))
        tail = builder.sub(rest, builder.mul(builder.sub(vectors, one), ir.Constant(i64, lanes)))
        ragged = builder.icmp_signed("<", tail, ir.Constant(i64, lanes))
        for nvec in range(1, most + 1):
            with builder.if_then(builder.icmp_signed("==", vectors, ir.Constant(i64, nvec))):
                with builder.if_else(ragged) as (then, otherwise):
                    with then:
                        call(listed_function(builder.module, value, itemsize, lanes, nvec, True),
                             k, tail)
                    with otherwise:
                        call(listed_function(builder.module, value, itemsize, lanes, nvec,
                                             False), k, tail)
        return context.get_dummy_value()

    index = types.intp
    return types.void(out, coef, src, sources, index, index, index, index, index, index,
                      types.boolean), codegen


# Outputs a dot_tile call covers at most: whole tiles of 3 or of 4 outputs
DOT_OUTPUTS = 12


def dot_tile_outputs(bits):
    """Outputs of one dot tile of 4 rows: its accumulators and the weight
    vectors within the register file (the rows' vectors are memory
    operands of the FMAs)."""
    return 4 if REGISTERS[bits] >= 32 else 3


def lane_sums(builder, vectors, lanes, flags):
    """Each vector's lanes added up into a scalar (returned in order) by a
    fixed tree: halves, then halves of those, ... Several vectors share each
    instruction: a level takes two vectors of g groups of `width` lanes
    (each group one vector's partial sums) and adds each group's low half
    to its high half, giving one vector of 2g groups of width / 2; an odd
    vector out pairs with itself. Each sum is the same chain of additions
    as a tree of its own vector's, bit for bit."""
    i32 = ir.IntType(32)
    # (vector, the index in `vectors` of each of its groups' partial sums)
    level = [(v, [k]) for k, v in enumerate(vectors)]
    width = lanes
    while width > 1:
        half = width // 2
        paired = []
        for q in range(0, len(level), 2):
            a, a_groups = level[q]
            b, b_groups = level[q + 1] if q + 1 < len(level) else level[q]
            lows, highs = [], []
            for first, groups in ((0, a_groups), (lanes, b_groups)):
                for g in range(len(groups)):
                    start = first + g * width
                    lows += range(start, start + half)
                    highs += range(start + half, start + width)
            low = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, lanes), lows))
            high = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, lanes), highs))
            paired.append((builder.fadd(low, high, flags=flags), a_groups + b_groups))
        level = paired
        width = half
    lane_of = {}
    for v, groups in level:
        for lane, k in enumerate(groups):
            lane_of.setdefault(k, (v, lane))
    return [builder.extract_element(v, ir.Constant(i32, lane))
            for v, lane in (lane_of[k] for k in range(len(vectors)))]


def dot_function(module, value, itemsize, lanes, outs_per_tile):
    """The LLVM function of one dot tile (4 rows x outs_per_tile outputs):

      void dot(out, out_stride, inp, inp_stride, weight, weight_stride, C, rows, outs)

    out[i, o] = sum over c < C of inp[i, c] * weight[o, c] for i < rows,
    o < outs; pointers to the first row of each, strides in bytes. Each
    accumulator holds `lanes` partial sums along C (a masked step takes the
    last C % lanes, where there are any), added up at the end by a fixed
    tree of halves (lane_sums).

    The tile's fixed cost, against its C / lanes steps, weighs on short
    rows. One core of Zen 4, 100 rows, dense_forward's dot tiles alone (same
    values bit for bit): with the masked step run for C % lanes == 0 too and
    each accumulator's tree on its own, 784-25 took 39.9-41.0 us, 100-36
    13.6-13.8 and 50-10 3.73-3.75; with the step skipped and the trees
    shared, 37.3-38.0, 11.4-11.8 and 3.29-3.35 (alike under `haswell` and
    `skylake-avx512` code generation: docs/performance.md)."""
    i64 = ir.IntType(64)
    byte_pointer = ir.IntType(8).as_pointer()
    function, builder = out_of_line_function(
        module, f"fastmlp_dot_{value}_{lanes}x{outs_per_tile}",
        [byte_pointer, i64, byte_pointer, i64, byte_pointer, i64, i64, i64, i64])
    if builder is None:
        return function
    out, out_stride, inp, inp_stride, weight, weight_stride, C, rows, outs = function.args
    vector = ir.VectorType(value, lanes)
    flags = ("contract",)
    x_rows = [builder.gep(inp, [builder.mul(i, inp_stride)])
              for i in clamped_rows(builder, rows, ROWS)]
    w_rows = [builder.gep(weight, [builder.mul(o, weight_stride)])
              for o in clamped_rows(builder, outs, outs_per_tile)]

    def vector_at(row, c):
        # the vector at element c of a row
        byte = builder.gep(row, [builder.mul(c, ir.Constant(i64, itemsize))])
        return builder.bitcast(byte, vector.as_pointer())

    def multiply_add(acc, x, w):
        return [builder.fadd(acc[i * outs_per_tile + o], builder.fmul(x[i], w[o], flags=flags),
                             flags=flags)
                for i in range(ROWS) for o in range(outs_per_tile)]

    full = builder.mul(builder.sdiv(C, ir.Constant(i64, lanes)), ir.Constant(i64, lanes))
    acc = accumulating_loop(
        builder, [ir.Constant(vector, None)] * (ROWS * outs_per_tile), full, lanes,
        lambda c, acc: multiply_add(
            acc, [builder.load(vector_at(r, c), align=itemsize) for r in x_rows],
            [builder.load(vector_at(r, c), align=itemsize) for r in w_rows]))
    # the last C % lanes values, if any, as a step with the rest masked off
    # (adding exact zeros where the mask is off)
    looped = builder.block
    with builder.if_then(builder.icmp_signed("<", full, C), likely=False):
        mask = first_lanes(builder, builder.sub(C, full), lanes)

        def tail(row):
            return masked_load(builder, vector_at(row, full), mask, itemsize)
        tailed = multiply_add(acc, [tail(r) for r in x_rows], [tail(r) for r in w_rows])
        tail_end = builder.block
    merged = []
    for before, after in zip(acc, tailed):
        phi = builder.phi(vector)
        phi.add_incoming(before, looped)
        phi.add_incoming(after, tail_end)
        merged.append(phi)
    sums = lane_sums(builder, merged, lanes, flags)
    for i in range(ROWS):
        with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, i), rows), likely=True):
            out_row = builder.gep(out, [builder.mul(ir.Constant(i64, i), out_stride)])
            for o in range(outs_per_tile):
                with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, o), outs),
                                     likely=True):
                    byte = builder.gep(out_row, [ir.Constant(i64, o * itemsize)])
                    builder.store(sums[i * outs_per_tile + o],
                                  builder.bitcast(byte, value.as_pointer()))
    builder.ret_void()
    return function


@intrinsic
def dot_tile(typingctx, out, inp, weight, b, rows, j, outs):
    # out is (B, OC), inp is (B, C), weight is (OC, C), 2-D arrays of one
    # float type with unit stride along their last axis:
    # out[b:b + rows, j:j + outs] = inp[b:b + rows] @ weight[j:j + outs].T
    # for rows of 1 to 4 and outs of 1 to DOT_OUTPUTS, in tiles of
    # dot_tile_outputs() outputs (the last one as wide as the outputs left)
    if not all(isinstance(a, types.Array) and a.ndim == 2 for a in (out, inp, weight)):
        return None
    dtype = out.dtype
    if not isinstance(dtype, types.Float) or inp.dtype != dtype or weight.dtype != dtype:
        return None

    def codegen(context, builder, signature, args):
        out_arr, inp_arr, weight_arr = (context.make_array(t)(context, builder, a)
                                        for t, a in zip(signature.args[:3], args[:3]))
        b_, rows_, j_, outs_ = args[3:7]
        i64 = ir.IntType(64)
        value = context.get_value_type(dtype)
        itemsize = context.get_abi_sizeof(value)
        bits = target_vector_bits(context)
        per_tile = dot_tile_outputs(bits)
        # a tile of each width up to per_tile: the last outputs of a call
        # take one as wide as they are, so that 25 outputs cost 8 tiles of 3
        # and one of 1, not 9 tiles of 3 (column_layers.column_cut cuts W1's 50 in two)
        functions = [dot_function(builder.module, value, itemsize, bits // 8 // itemsize, n)
                     for n in range(1, per_tile + 1)]

        def address(array, row, column):
            return element_address(builder, array, row, column, itemsize)

        zero = ir.Constant(i64, 0)
        C = builder.extract_value(weight_arr.shape, 1)

        def call(function, output, outs):
            builder.call(function, [
                address(out_arr, b_, output), builder.extract_value(out_arr.strides, 0),
                address(inp_arr, b_, zero), builder.extract_value(inp_arr.strides, 0),
                address(weight_arr, output, zero),
                builder.extract_value(weight_arr.strides, 0), C, rows_, outs])

        for first in range(0, DOT_OUTPUTS, per_tile):
            left = builder.sub(outs_, ir.Constant(i64, first))
            with builder.if_then(builder.icmp_signed(">", left, zero), likely=True):
                output = builder.add(j_, ir.Constant(i64, first))
                whole = builder.icmp_signed(">=", left, ir.Constant(i64, per_tile))
                with builder.if_else(whole, likely=True) as (then, otherwise):
                    with then:
                        call(functions[-1], output, ir.Constant(i64, per_tile))
                    with otherwise:
                        for n in range(1, per_tile):
                            with builder.if_then(builder.icmp_signed(
                                    "==", left, ir.Constant(i64, n))):
                                call(functions[n - 1], output, left)
        return context.get_dummy_value()

    index = types.intp
    return types.void(out, inp, weight, index, index, index, index), codegen


def transpose_function(module, value, itemsize, n):
    """The LLVM function that transposes one n x n tile:

      void transpose(dst, dst_stride, src, src_stride)

    dst[a, b] = src[b, a] for a, b < n; pointers to the tiles' first
    values, row strides in bytes. The n rows are loaded as vectors and
    transposed in registers by log2(n) rounds of shuffles, each swapping the
    off-diagonal h x h blocks of every 2h x 2h block (h = n/2, ..., 1; with
    AVX2, vperm2f128 and then shuffles within 128-bit lanes)."""
    i64 = ir.IntType(64)
    i32 = ir.IntType(32)
    byte_pointer = ir.IntType(8).as_pointer()
    function, builder = out_of_line_function(module, f"fastmlp_transpose_{value}_{n}",
                                             [byte_pointer, i64, byte_pointer, i64])
    if builder is None:
        return function
    dst, dst_stride, src, src_stride = function.args
    vector = ir.VectorType(value, n)

    def row(pointer, stride, i):
        return builder.bitcast(builder.gep(pointer, [builder.mul(ir.Constant(i64, i), stride)]),
                               vector.as_pointer())

    rows = [builder.load(row(src, src_stride, i), align=itemsize) for i in range(n)]
    h = n // 2
    while h >= 1:
        # rows i and i + h of a pair: in every chunk of 2h lanes, the upper
        # one gets its own first h lanes and then the lower's first h, the
        # lower one the upper's last h and then its own last h
        upper = [x for c in range(0, n, 2 * h)
                 for x in [*range(c, c + h), *range(n + c, n + c + h)]]
        lower = [x + h for x in upper]
        for i in range(n):
            if i // h % 2 == 0:
                rows[i], rows[i + h] = (
                    builder.shuffle_vector(rows[i], rows[i + h],
                                           ir.Constant(ir.VectorType(i32, n), mask))
                    for mask in (upper, lower))
        h //= 2
    for i in range(n):
        builder.store(rows[i], row(dst, dst_stride, i), align=itemsize)
    builder.ret_void()
    return function


TRANSPOSE_BYTES = 32  # a tile row: one 256-bit vector


@intrinsic
def transpose_tile(typingctx, dst, src, j, k):
    # dst is (C, OC), src is (OC, C), 2-D arrays of one float type with unit
    # stride along their last axis:
    # dst[k:k + n, j:j + n] = src[j:j + n, k:k + n].T, n = 32 bytes of values
    # (8 float32, 4 float64: on every target, 256-bit or two 128-bit vectors)
    if not all(isinstance(a, types.Array) and a.ndim == 2 for a in (dst, src)):
        return None
    dtype = dst.dtype
    if not isinstance(dtype, types.Float) or src.dtype != dtype:
        return None

    def codegen(context, builder, signature, args):
        dst_arr, src_arr = (context.make_array(t)(context, builder, a)
                            for t, a in zip(signature.args[:2], args[:2]))
        j_, k_ = args[2:4]
        value = context.get_value_type(dtype)
        itemsize = context.get_abi_sizeof(value)
        function = transpose_function(builder.module, value, itemsize,
                                      TRANSPOSE_BYTES // itemsize)
        builder.call(function, [
            element_address(builder, dst_arr, k_, j_, itemsize),
            builder.extract_value(dst_arr.strides, 0),
            element_address(builder, src_arr, j_, k_, itemsize),
            builder.extract_value(src_arr.strides, 0)])
        return context.get_dummy_value()

    index = types.intp
    return types.void(dst, src, index, index), codegen
