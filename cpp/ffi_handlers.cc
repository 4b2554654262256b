// The in-graph mapping op.
//
// vattention_grow takes every buffer of a cache (k[0..L), then v[0..L)) as
// operands aliased to its results, so XLA orders it before the step's writes
// to those buffers. It runs on the host each time XLA reaches it — once per
// iteration inside a while loop — and maps the pages that growing every
// active slot by `tokens` needs, from the host's mirror of the slot lengths.
// Under tensor parallelism every device runs it with the same group id and
// finds its own page manager by the address of its first operand.
// It is deliberately not command-buffer compatible: a captured graph would
// replay without calling it.
#include "ffi_handlers.h"

#include <sstream>
#include <string>

#include "errors.h"
#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace vattention {
namespace {

std::string buffer_name(std::size_t index, std::size_t num_buffers) {
  const std::size_t layers = num_buffers / 2;
  return (index < layers ? "k[" : "v[") + std::to_string(index % layers) + "]";
}

std::string hex(const void* address) {
  std::ostringstream out;
  out << address;
  return out.str();
}

// Checks that the operands are the manager's buffers, in place, and grows.
ffi::Error GrowImpl(void* stream, std::uint64_t manager_id, std::int64_t tokens, ffi::RemainingArgs args,
                    ffi::RemainingRets rets) {
  const ManagerRegistry& registry = ManagerRegistry::instance();
  const DevicePtr first =
      args.size() == 0 || args.get<ffi::AnyBuffer>(0).has_error()
          ? 0
          : reinterpret_cast<DevicePtr>(args.get<ffi::AnyBuffer>(0)->untyped_data());
  std::shared_ptr<PageManager> manager = registry.find_for(manager_id, first);
  if (!manager && registry.is_group(manager_id)) {
    return ffi::Error::InvalidArgument(
        "vattention_grow: cache buffer k[0] is at " + hex(reinterpret_cast<void*>(first)) +
        ", which is no device's reserved address in the tensor-parallel cache " + std::to_string(manager_id) +
        ": XLA copied the cache shard. Donate the cache to every jitted function that takes it "
        "(jax.jit(..., donate_argnames=\"cache\")) and return it from that function.");
  }
  if (!manager) {
    return ffi::Error::InvalidArgument("vattention_grow: no cache manager with id " + std::to_string(manager_id) +
                                       " (it was closed, or the cache was made in another process)");
  }
  if (tokens < 0) return ffi::Error::InvalidArgument("vattention_grow: tokens must not be negative");
  const CacheGeometry& geometry = manager->geometry();
  if (args.size() != geometry.num_buffers || rets.size() != geometry.num_buffers) {
    return ffi::Error::InvalidArgument("vattention_grow: expected the cache's " +
                                       std::to_string(geometry.num_buffers) + " buffers, got " +
                                       std::to_string(args.size()));
  }
  const std::vector<DevicePtr> bases = manager->buffer_bases();
  for (std::size_t i = 0; i < args.size(); ++i) {
    auto operand = args.get<ffi::AnyBuffer>(i);
    auto result = rets.get<ffi::AnyBuffer>(i);
    if (operand.has_error()) return operand.error();
    if (result.has_error()) return result.error();
    void* data = operand->untyped_data();
    if (reinterpret_cast<DevicePtr>(data) != bases[i]) {
      return ffi::Error::InvalidArgument(
          "vattention_grow: cache buffer " + buffer_name(i, geometry.num_buffers) + " is at " + hex(data) +
          ", not at its reserved address " + hex(reinterpret_cast<void*>(bases[i])) +
          ": XLA copied the cache. Donate the cache to every jitted function that takes it "
          "(jax.jit(..., donate_argnames=\"cache\")) and return it from that function.");
    }
    if ((*result)->untyped_data() != data) {
      return ffi::Error::InvalidArgument("vattention_grow: result " + buffer_name(i, geometry.num_buffers) +
                                         " is not aliased to its operand");
    }
    if (operand->size_bytes() != geometry.buffer_bytes()) {
      return ffi::Error::InvalidArgument("vattention_grow: cache buffer " + buffer_name(i, geometry.num_buffers) +
                                         " has " + std::to_string(operand->size_bytes()) + " bytes, expected " +
                                         std::to_string(geometry.buffer_bytes()));
    }
  }
  try {
    // The operands are the buffers, in place: the cache is provably alive, so unmapped pages may be discarded.
    manager->grow(static_cast<std::size_t>(tokens), stream, /*in_program=*/true);
  } catch (const OutOfPages& error) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, std::string("vattention_grow: ") + error.what());
  } catch (const std::exception& error) {
    return ffi::Error::Internal(std::string("vattention_grow: ") + error.what());
  }
  return ffi::Error::Success();
}

ffi::Error GrowOnHost(std::uint64_t manager_id, std::int64_t tokens, ffi::RemainingArgs args,
                      ffi::RemainingRets rets) {
  return GrowImpl(nullptr, manager_id, tokens, args, rets);
}

ffi::Error LeaveUninitialized(ffi::Result<ffi::AnyBuffer>) { return ffi::Error::Success(); }

}  // namespace
}  // namespace vattention

XLA_FFI_DEFINE_HANDLER_SYMBOL(VattentionGrowCpu, vattention::GrowOnHost,
                              ffi::Ffi::Bind()
                                  .Attr<std::uint64_t>("manager")  // the PageManager's registry id
                                  .Attr<std::int64_t>("tokens")    // tokens added to every active slot
                                  .RemainingArgs()                 // the cache buffers
                                  .RemainingRets());               // the same buffers, aliased

XLA_FFI_DEFINE_HANDLER_SYMBOL(VattentionGrowCuda, vattention::GrowImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()  // XLA's stream, to wait before unmapping
                                  .Attr<std::uint64_t>("manager")     // the PageManager's registry id
                                  .Attr<std::int64_t>("tokens")       // tokens added to every active slot
                                  .RemainingArgs()                    // the cache buffers
                                  .RemainingRets());                  // the same buffers, aliased

XLA_FFI_DEFINE_HANDLER_SYMBOL(VattentionUninitialized, vattention::LeaveUninitialized,
                              ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());  // the new buffer, never written
