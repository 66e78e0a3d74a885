"""The MPI calls that compiled code makes: `MPI_Allreduce` and `MPI_Wtime`,
called through the MPI library's own function pointers, so that the step
loop of a data-parallel fit runs in compiled code as a single process's
does (`step.train_steps`; distributed.py finds the pointers and handles).

Addresses and handles are arguments, never constants in the machine code,
so the kernels that use them stay in Numba's disk cache. An MPI handle
(communicator, datatype, operation) reaches the call with the width the
library gives it: a uint32 for MPICH's integer handles, a uint64 for Open
MPI's pointers.
"""
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def allreduce(typingctx, function, send, receive, datatype, op, comm):
    # MPI_Allreduce(send, receive, send.size, datatype, op, comm) through the
    # function at address `function`; returns its error code (0: success)
    if not (isinstance(send, types.Array) and isinstance(receive, types.Array)):
        return None
    handles = (datatype, op, comm)
    if not all(isinstance(h, types.Integer) and not h.signed for h in handles):
        return None

    def codegen(context, builder, signature, args):
        address, send_v, receive_v = args[:3]
        send_a = context.make_array(signature.args[1])(context, builder, send_v)
        receive_a = context.make_array(signature.args[2])(context, builder, receive_v)
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        handle_types = [context.get_value_type(h) for h in signature.args[3:]]
        function_type = ir.FunctionType(i32, [byte_pointer, byte_pointer, i32] + handle_types)
        callee = builder.inttoptr(address, function_type.as_pointer())
        return builder.call(callee, [builder.bitcast(send_a.data, byte_pointer),
                                     builder.bitcast(receive_a.data, byte_pointer),
                                     builder.trunc(send_a.nitems, i32)] + list(args[3:]))
    return types.int32(types.uintp, send, receive, datatype, op, comm), codegen


@intrinsic
def wall_time(typingctx, function):
    # MPI_Wtime() through the function at address `function`: seconds
    def codegen(context, builder, signature, args):
        function_type = ir.FunctionType(ir.DoubleType(), [])
        return builder.call(builder.inttoptr(args[0], function_type.as_pointer()), [])
    return types.float64(types.uintp), codegen
