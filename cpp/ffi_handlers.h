// XLA FFI handlers of the mapping op. Defined in ffi_handlers.cc with
// XLA_FFI_DEFINE_HANDLER_SYMBOL; the bindings hand them to JAX as capsules.
#pragma once

#include "xla/ffi/api/c_api.h"

// vattention_grow on XLA's CPU and CUDA clients.
extern "C" XLA_FFI_Error* VattentionGrowCpu(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* VattentionGrowCuda(XLA_FFI_CallFrame* call_frame);
// vattention_uninitialized: returns its output buffer as XLA allocated it.
extern "C" XLA_FFI_Error* VattentionUninitialized(XLA_FFI_CallFrame* call_frame);
