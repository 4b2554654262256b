// The Driver on the CUDA driver's virtual-memory API. libcuda is loaded at run
// time, so the module imports on machines without CUDA; creating a CudaDriver
// there raises DriverError.
#pragma once

#include <memory>

#include "driver.h"

namespace vattention {

// Returns a driver for the CUDA device `ordinal`, using its primary context
// (the one JAX uses). Throws DriverError when libcuda or the device is missing.
std::unique_ptr<Driver> make_cuda_driver(int ordinal);

}  // namespace vattention
