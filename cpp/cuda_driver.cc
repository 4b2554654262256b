// CUDA driver virtual-memory API, loaded from libcuda.so.1 at run time.
//
// The handful of driver types used here are declared locally (with the same
// layout as cuda.h) so that the module builds without the CUDA toolkit.
#include "cuda_driver.h"

#include <dlfcn.h>

#include <cstdio>
#include <string>

namespace vattention {
namespace {

using CUresult = int;
using CUdevice = int;
using CUcontext = void*;
using CUstream = void*;
using CUdeviceptr = unsigned long long;
using CUmemGenericAllocationHandle = unsigned long long;

constexpr CUresult kCudaSuccess = 0;
constexpr int kAllocationTypePinned = 1;
constexpr int kLocationTypeDevice = 1;
constexpr int kHandleTypeNone = 0;
constexpr int kAccessReadWrite = 3;
constexpr int kGranularityMinimum = 0;

struct CUmemLocation {
  int type;
  int id;
};

struct CUmemAllocationProp {
  int type;
  int requestedHandleTypes;
  CUmemLocation location;
  void* win32HandleMetaData;
  struct {
    unsigned char compressionType;
    unsigned char gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
  } allocFlags;
};

struct CUmemAccessDesc {
  CUmemLocation location;
  int flags;
};

static_assert(sizeof(CUmemAllocationProp) == 32, "layout must match cuda.h");
static_assert(sizeof(CUmemAccessDesc) == 12, "layout must match cuda.h");

// Entry points of libcuda used by the driver, resolved once with dlsym.
struct CudaApi {
  CUresult (*cuInit)(unsigned int);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuDevicePrimaryCtxRelease)(CUdevice);
  CUresult (*cuCtxPushCurrent)(CUcontext);
  CUresult (*cuCtxPopCurrent)(CUcontext*);
  CUresult (*cuCtxSynchronize)();
  CUresult (*cuStreamSynchronize)(CUstream);
  CUresult (*cuMemGetInfo)(size_t*, size_t*);
  CUresult (*cuMemGetAllocationGranularity)(size_t*, const CUmemAllocationProp*, int);
  CUresult (*cuMemAddressReserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long);
  CUresult (*cuMemAddressFree)(CUdeviceptr, size_t);
  CUresult (*cuMemCreate)(CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*,
                          unsigned long long);
  CUresult (*cuMemRelease)(CUmemGenericAllocationHandle);
  CUresult (*cuMemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                       unsigned long long);
  CUresult (*cuMemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t);
  CUresult (*cuMemUnmap)(CUdeviceptr, size_t);
  CUresult (*cuMemcpyDtoD)(CUdeviceptr, CUdeviceptr, size_t);
  CUresult (*cuGetErrorName)(CUresult, const char**);
  CUresult (*cuGetErrorString)(CUresult, const char**);
};

template <typename Fn>
void resolve(void* library, const char* symbol, Fn& fn) {
  fn = reinterpret_cast<Fn>(dlsym(library, symbol));
  if (fn == nullptr) {
    throw DriverError(std::string("libcuda.so.1 has no symbol ") + symbol +
                      ": the CUDA driver is too old for virtual memory management");
  }
}

// libcuda stays loaded for the life of the process, as the CUDA runtime does.
const CudaApi& load_cuda_api() {
  static const CudaApi api = [] {
    void* library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (library == nullptr) {
      const char* reason = dlerror();
      throw DriverError(std::string("cannot load libcuda.so.1 (") + (reason ? reason : "unknown") +
                        "): no CUDA driver on this machine; use a CPU device");
    }
    CudaApi loaded{};
    resolve(library, "cuInit", loaded.cuInit);
    resolve(library, "cuDeviceGet", loaded.cuDeviceGet);
    resolve(library, "cuDevicePrimaryCtxRetain", loaded.cuDevicePrimaryCtxRetain);
    resolve(library, "cuDevicePrimaryCtxRelease_v2", loaded.cuDevicePrimaryCtxRelease);
    resolve(library, "cuCtxPushCurrent_v2", loaded.cuCtxPushCurrent);
    resolve(library, "cuCtxPopCurrent_v2", loaded.cuCtxPopCurrent);
    resolve(library, "cuCtxSynchronize", loaded.cuCtxSynchronize);
    resolve(library, "cuStreamSynchronize", loaded.cuStreamSynchronize);
    resolve(library, "cuMemGetInfo_v2", loaded.cuMemGetInfo);
    resolve(library, "cuMemGetAllocationGranularity", loaded.cuMemGetAllocationGranularity);
    resolve(library, "cuMemAddressReserve", loaded.cuMemAddressReserve);
    resolve(library, "cuMemAddressFree", loaded.cuMemAddressFree);
    resolve(library, "cuMemCreate", loaded.cuMemCreate);
    resolve(library, "cuMemRelease", loaded.cuMemRelease);
    resolve(library, "cuMemMap", loaded.cuMemMap);
    resolve(library, "cuMemSetAccess", loaded.cuMemSetAccess);
    resolve(library, "cuMemUnmap", loaded.cuMemUnmap);
    resolve(library, "cuMemcpyDtoD_v2", loaded.cuMemcpyDtoD);
    resolve(library, "cuGetErrorName", loaded.cuGetErrorName);
    resolve(library, "cuGetErrorString", loaded.cuGetErrorString);
    return loaded;
  }();
  return api;
}

class CudaDriver final : public Driver {
 public:
  explicit CudaDriver(int ordinal) : api_(load_cuda_api()), ordinal_(ordinal) {
    check(api_.cuInit(0), "cuInit");
    check(api_.cuDeviceGet(&device_, ordinal), "cuDeviceGet");
    check(api_.cuDevicePrimaryCtxRetain(&context_, device_), "cuDevicePrimaryCtxRetain");
    try {
      ContextScope scope(*this);
      CUmemAllocationProp prop = page_properties();
      check(api_.cuMemGetAllocationGranularity(&granularity_, &prop, kGranularityMinimum),
            "cuMemGetAllocationGranularity");
    } catch (...) {
      api_.cuDevicePrimaryCtxRelease(device_);
      throw;
    }
  }

  ~CudaDriver() override { api_.cuDevicePrimaryCtxRelease(device_); }

  std::string name() const override { return "cuda"; }
  std::size_t granularity() const override { return granularity_; }

  MemoryInfo memory_info() override {
    ContextScope scope(*this);
    MemoryInfo info;
    check(api_.cuMemGetInfo(&info.free_bytes, &info.total_bytes), "cuMemGetInfo");
    return info;
  }

  DevicePtr reserve(std::size_t bytes, std::size_t alignment) override {
    ContextScope scope(*this);
    CUdeviceptr base = 0;
    check(api_.cuMemAddressReserve(&base, bytes, alignment, 0, 0), "cuMemAddressReserve");
    return base;
  }

  void free_reservation(DevicePtr base, std::size_t bytes) override {
    ContextScope scope(*this);
    check(api_.cuMemAddressFree(base, bytes), "cuMemAddressFree");
  }

  PhysicalHandle create(std::size_t bytes) override {
    ContextScope scope(*this);
    CUmemAllocationProp prop = page_properties();
    CUmemGenericAllocationHandle handle = 0;
    check(api_.cuMemCreate(&handle, bytes, &prop, 0), "cuMemCreate");
    return handle;
  }

  void release(PhysicalHandle handle) override {
    ContextScope scope(*this);
    check(api_.cuMemRelease(handle), "cuMemRelease");
  }

  void map(DevicePtr address, std::size_t bytes, PhysicalHandle handle) override {
    ContextScope scope(*this);
    check(api_.cuMemMap(address, bytes, 0, handle, 0), "cuMemMap");
  }

  void set_access(DevicePtr address, std::size_t bytes) override {
    ContextScope scope(*this);
    CUmemAccessDesc access{};
    access.location.type = kLocationTypeDevice;
    access.location.id = ordinal_;
    access.flags = kAccessReadWrite;
    check(api_.cuMemSetAccess(address, bytes, &access, 1), "cuMemSetAccess");
  }

  void unmap(DevicePtr address, std::size_t bytes) override {
    ContextScope scope(*this);
    check(api_.cuMemUnmap(address, bytes), "cuMemUnmap");
  }

  // cuMemcpyDtoD runs on the legacy default stream and does not wait on the host; the context's
  // synchronization makes the copy complete before any stream of XLA reads the destination.
  void copy(DevicePtr destination, DevicePtr source, std::size_t bytes) override {
    ContextScope scope(*this);
    check(api_.cuMemcpyDtoD(destination, source, bytes), "cuMemcpyDtoD");
    check(api_.cuCtxSynchronize(), "cuCtxSynchronize");
  }

  void synchronize(void* stream) override {
    ContextScope scope(*this);
    if (stream != nullptr) {
      check(api_.cuStreamSynchronize(stream), "cuStreamSynchronize");
    } else {
      check(api_.cuCtxSynchronize(), "cuCtxSynchronize");
    }
  }

 private:
  // Makes the device's primary context current for one driver call, from any
  // thread: Python's or the one XLA runs a handler on.
  class ContextScope {
   public:
    explicit ContextScope(CudaDriver& driver) : driver_(driver) {
      driver_.check(driver_.api_.cuCtxPushCurrent(driver_.context_), "cuCtxPushCurrent");
    }
    ~ContextScope() {
      CUcontext popped = nullptr;
      driver_.api_.cuCtxPopCurrent(&popped);
    }
    ContextScope(const ContextScope&) = delete;
    ContextScope& operator=(const ContextScope&) = delete;

   private:
    CudaDriver& driver_;
  };

  CUmemAllocationProp page_properties() const {
    CUmemAllocationProp prop{};
    prop.type = kAllocationTypePinned;
    prop.requestedHandleTypes = kHandleTypeNone;
    prop.location.type = kLocationTypeDevice;
    prop.location.id = ordinal_;
    return prop;
  }

  void check(CUresult result, const char* call) const {
    if (result == kCudaSuccess) return;
    const char* error_name = nullptr;
    const char* error_text = nullptr;
    api_.cuGetErrorName(result, &error_name);
    api_.cuGetErrorString(result, &error_text);
    throw DriverError(std::string(call) + " failed on CUDA device " + std::to_string(ordinal_) +
                      ": " + (error_name ? error_name : "CUDA error " + std::to_string(result)) +
                      " (" + (error_text ? error_text : "no description") + ")");
  }

  const CudaApi& api_;
  int ordinal_;
  CUdevice device_ = 0;
  CUcontext context_ = nullptr;
  std::size_t granularity_ = 0;
};

}  // namespace

std::unique_ptr<Driver> make_cuda_driver(int ordinal) {
  return std::make_unique<CudaDriver>(ordinal);
}

}  // namespace vattention
