// Python bindings of the C++ core: drivers, the page manager, the registry
// the FFI handlers read, DLPack views of reserved buffers, and the handlers.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>

#include "cuda_driver.h"
#include "errors.h"
#include "fake_driver.h"
#include "ffi_handlers.h"
#include "host_driver.h"
#include "page_manager.h"
#include "registry.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace vattention {
namespace {

// A Python callable as the page manager's host wait. The callable is held, and let go, with the GIL:
// the manager may drop it on a thread that does not hold it.
void set_host_wait(PageManager& manager, nb::object wait) {
  if (wait.is_none()) {
    manager.set_host_wait({});
    return;
  }
  std::shared_ptr<nb::object> held(new nb::object(std::move(wait)), [](nb::object* object) {
    nb::gil_scoped_acquire gil;
    delete object;
  });
  manager.set_host_wait([held] {
    nb::gil_scoped_acquire gil;
    try {
      (*held)();
    } catch (nb::python_error&) {
      // The wait is over either way: a step that failed has no work left in flight.
    }
  });
}

// The counters of a ManagerStats (PageManager::counters fills only these).
nb::dict counters_dict(const ManagerStats& stats) {
  nb::dict out;
  out["page_bytes"] = stats.page_bytes;
  out["budget_pages"] = stats.budget_pages;
  out["created_pages"] = stats.created_pages;
  out["pooled_pages"] = stats.pooled_pages;
  out["mapped_pages"] = stats.mapped_pages;
  out["pages_mapped_total"] = stats.pages_mapped_total;
  out["pages_unmapped_total"] = stats.pages_unmapped_total;
  out["grow_calls"] = stats.grow_calls;
  out["pages_evicted_total"] = stats.pages_evicted_total;
  out["window_pages_unmapped_total"] = stats.window_pages_unmapped_total;
  out["map_seconds"] = stats.map_seconds;
  out["unmap_seconds"] = stats.unmap_seconds;
  out["poisoned"] = stats.poisoned;
  return out;
}

nb::dict stats_dict(const ManagerStats& stats) {
  nb::dict out = counters_dict(stats);
  out["reserved_pages"] = stats.reserved_pages;
  out["deferred_pages"] = stats.deferred_pages;
  out["active_slots"] = stats.active_slots;
  out["used_tokens"] = stats.used_tokens;
  out["used_bytes"] = stats.used_bytes;
  out["waste_bytes"] = stats.waste_bytes;
  out["cached_pages"] = stats.cached_pages;
  out["forked_pages"] = stats.forked_pages;
  out["shared_pages"] = stats.shared_pages;
  out["bytes_saved"] = stats.bytes_saved;
  out["window_unmapped_pages"] = stats.window_unmapped_pages;
  return out;
}

nb::dict view_dict(const ManagerView& view) {
  nb::list slots;
  for (const auto& slot : view.slots) {
    nb::list pages;
    for (const auto& page : slot) pages.append(nb::cast(page));
    slots.append(pages);
  }
  nb::list strays;
  for (const StrayMapping& stray : view.strays) {
    strays.append(nb::make_tuple(stray.address, stray.bytes, stray.handle, stray.accessible));
  }
  nb::list cache;
  for (const CachedPage& page : view.cache) {
    nb::dict entry;
    entry["key"] = page.key ? nb::cast(*page.key) : nb::none();
    entry["page"] = page.page;
    entry["handles"] = nb::cast(page.handles);
    entry["mappings"] = page.mappings;
    entry["last_used"] = page.last_used;
    cache.append(entry);
  }
  nb::dict out;
  out["slots"] = slots;
  out["cache"] = cache;
  out["bases"] = nb::cast(view.bases);
  out["pooled"] = nb::cast(view.pooled);
  out["strays"] = strays;
  out["poisoned"] = view.poisoned.empty() ? nb::none() : nb::cast(view.poisoned);
  return out;
}

std::shared_ptr<PageManager> make_page_manager(std::size_t num_buffers, std::size_t max_batch, std::size_t capacity,
                                               std::size_t token_bytes, std::size_t page_bytes,
                                               std::shared_ptr<Driver> driver, std::size_t budget_bytes) {
  if (!driver) throw std::invalid_argument("driver must not be None");
  CacheGeometry geometry{num_buffers, max_batch, capacity, token_bytes, page_bytes};
  return std::make_shared<PageManager>(geometry, std::move(driver), budget_bytes);
}

// A view of `address` that JAX imports with jax.dlpack.from_dlpack (it has
// __dlpack__ and __dlpack_device__), keeping `owner` alive while it is used.
nb::ndarray<nb::array_api> device_view(nb::handle owner, std::uint64_t address, const std::vector<std::size_t>& shape,
                          std::uint8_t dtype_code, std::uint8_t dtype_bits, int device_type, int device_id) {
  nb::dlpack::dtype dtype{dtype_code, dtype_bits, 1};
  return nb::ndarray<nb::array_api>(reinterpret_cast<void*>(address), shape.size(), shape.data(), owner, nullptr,
                                    dtype, device_type, device_id);
}

// PageManager::discard_unmapped with the proof taken from live jax.Arrays, all under the GIL.
std::size_t discard_if_live(PageManager& manager, const std::vector<nb::object>& arrays) {
  std::vector<DevicePtr> bases;
  for (const nb::object& array : arrays) {
    if (nb::cast<bool>(array.attr("is_deleted")())) return 0;
    bases.push_back(nb::cast<DevicePtr>(array.attr("unsafe_buffer_pointer")()));
  }
  return manager.discard_unmapped(bases);
}

nb::tuple residency(std::uint64_t address, std::size_t bytes) {
  std::vector<bool> pages = resident_pages(address, bytes);
  std::size_t resident = 0;
  for (bool page : pages) resident += page;
  return nb::make_tuple(resident, pages.size());
}

}  // namespace
}  // namespace vattention

NB_MODULE(_core, m) {
  using namespace vattention;
  m.doc() = "C++ core of jax_vattention: page manager, drivers and XLA FFI handlers.";

  nb::exception<DriverError>(m, "DriverError", PyExc_RuntimeError);
  nb::exception<OutOfPages>(m, "OutOfPagesError", PyExc_MemoryError);
  nb::exception<NoFreeSlot>(m, "NoFreeSlotError", PyExc_RuntimeError);
  nb::exception<ManagerPoisoned>(m, "CacheManagerPoisonedError", PyExc_RuntimeError);

  nb::class_<Driver>(m, "Driver")
      .def_prop_ro("name", &Driver::name)
      .def_prop_ro("granularity", &Driver::granularity)
      .def("memory_info", [](Driver& driver) {
        MemoryInfo info = driver.memory_info();
        return nb::make_tuple(info.free_bytes, info.total_bytes);
      }, "Returns (free_bytes, total_bytes).");

  m.def("cuda_driver", [](int ordinal) { return std::shared_ptr<Driver>(make_cuda_driver(ordinal)); },
        "ordinal"_a, "The CUDA driver of device `ordinal` (its primary context).");
  m.def("host_driver", [] { return std::shared_ptr<Driver>(make_host_driver()); },
        "The driver of the CPU backend: the OS commits pages, madvise returns them.");

  nb::class_<FakeDriver, Driver>(m, "FakeDriver")
      .def(nb::init<std::size_t, std::size_t, bool, bool>(), "granularity"_a = std::size_t(2) << 20,
           "memory_bytes"_a = std::size_t(1) << 40, "host_pages"_a = false, "poison_unmapped"_a = false,
           "With host_pages, pages mapped into buffers adopted from the CPU backend behave like physical\n"
           "pages: a page mapped at a second address shows the bytes of its first mapping there, and an\n"
           "unmapped page keeps its bytes for its next mapping (prefix sharing's values, on the CPU).\n"
           "With poison_unmapped too, an address is filled with 0xff bytes (NaN in every float dtype) when\n"
           "its page is unmapped: a kernel that reads an unmapped page then shows NaN, as a GPU would fault.")
      .def("fail_on", &FakeDriver::fail_on, "operation"_a, "nth"_a = 1, "after_a_failure"_a = false,
           "Makes the nth next call of operation raise DriverError; with after_a_failure, the nth call\n"
           "after the next injected failure (a call of the undo, say).")
      .def("calls", &FakeDriver::calls, "operation"_a)
      .def_prop_ro("failures_thrown", &FakeDriver::failures_thrown)
      .def_prop_ro("mapped_bytes", &FakeDriver::mapped_bytes)
      .def_prop_ro("live_handles", &FakeDriver::live_handles)
      .def_prop_ro("live_reservations", &FakeDriver::live_reservations)
      .def("is_accessible", &FakeDriver::is_accessible, "address"_a, "bytes"_a)
      .def("mappings", [](const FakeDriver& driver) {
        nb::dict table;
        for (const auto& entry : driver.mappings()) {
          table[nb::cast(entry.address)] = nb::make_tuple(entry.bytes, entry.handle, entry.accessible);
        }
        return table;
      }, "{address: (bytes, handle, accessible)} of every mapping.")
      .def("handles", &FakeDriver::handles, "The live physical handles.")
      .def("reservations", &FakeDriver::reservations, "The bases of the live reservations.")
      .def("discarded", &FakeDriver::discarded, "(address, bytes) of every discard() call.")
      .def("write", [](FakeDriver& driver, std::uint64_t address, nb::bytes data) {
             const auto* begin = static_cast<const unsigned char*>(data.data());
             driver.write(address, std::vector<unsigned char>(begin, begin + data.size()));
           }, "address"_a, "data"_a,
           "Writes `data` at a mapped, accessible address, as a kernel would (DriverError elsewhere).")
      .def("read", [](const FakeDriver& driver, std::uint64_t address, std::size_t size) {
             const std::vector<unsigned char> data = driver.read(address, size);
             return nb::bytes(reinterpret_cast<const char*>(data.data()), data.size());
           }, "address"_a, "size"_a, "Reads `size` bytes at a mapped, accessible address.");

  // Every method that takes the manager's lock lets the GIL go: the lock may be held by the mapping
  // op, on a thread waiting for the device, and the device's work may need the GIL (host callbacks).
  // discard_unmapped is the one exception, on purpose (see its docstring).
  using Release = nb::call_guard<nb::gil_scoped_release>;
  nb::class_<PageManager>(m, "PageManager")
      .def(nb::new_(&make_page_manager), "num_buffers"_a, "max_batch"_a, "capacity"_a, "token_bytes"_a,
           "page_bytes"_a, "driver"_a, "budget_bytes"_a)
      .def("reserve_buffers", &PageManager::reserve_buffers, Release())
      .def("adopt_buffers", &PageManager::adopt_buffers, "bases"_a, Release())
      .def("buffer_bases", &PageManager::buffer_bases, Release())
      .def("alloc", &PageManager::alloc, "prompt_len"_a, "lookahead"_a = 0, Release())
      .def("alloc_shared", [](PageManager& manager, std::size_t prompt_len, std::size_t lookahead,
                              const std::vector<PrefixKey>& keys) {
        SharedAlloc placed;
        {
          nb::gil_scoped_release release;
          placed = manager.alloc_shared(prompt_len, lookahead, keys);
        }
        return nb::make_tuple(placed.slot, placed.shared_pages);
      }, "prompt_len"_a, "lookahead"_a, "keys"_a,
           "alloc() that maps the cached pages of the longest run of `keys` first: (slot, shared pages).")
      .def("publish", &PageManager::publish, "slot"_a, "keys"_a, Release(),
           "Registers the slot's first len(keys) full pages in the prefix cache; returns how many were new.")
      .def("tokens_per_page", &PageManager::tokens_per_page, "0 where prefix sharing is off.")
      .def("slot_pages", [](const PageManager& manager, std::size_t tokens) {
             return manager.geometry().pages_for(tokens) * manager.geometry().num_buffers;
           }, "tokens"_a,
           "Pages a slot of `tokens` tokens holds over every buffer (counted up to the capacity).")
      .def("fork", &PageManager::fork, "parent"_a, "lookahead"_a = 0, Release(),
           "A free slot that holds the same tokens as `parent`: its full pages shared, its last page copied.")
      .def("writable_from", &PageManager::writable_from, "slot"_a, Release())
      .def("check_write", &PageManager::check_write, "slot"_a, "start"_a, Release())
      .def("evict", &PageManager::evict, Release())
      .def("cached_pages", &PageManager::cached_pages, "keys"_a, Release(),
           "How many of `keys` the prefix cache holds at pages 0.., the longest run (no change).")
      .def("set_window", &PageManager::set_window, "window"_a, "windowed"_a, Release(),
           "A sliding window of `window` tokens in the buffers flagged in `windowed` (one flag per buffer):\n"
           "each growth unmaps their pages behind every active slot's window. Before the first alloc.")
      .def_prop_ro("window", &PageManager::window, "The sliding window in tokens; 0: none.")
      .def("set_host_wait", &set_host_wait, "wait"_a.none(),
           "`wait()` (or None): how a call from the host waits for the device's work in flight before it\n"
           "unmaps a page, where the driver cannot (the CPU backend, whose steps XLA runs asynchronously).\n"
           "Called with the GIL, without the manager's lock; an exception it raises is ignored.")
      .def("window_pages_due", &PageManager::window_pages_due, Release(),
           "Pages (over all buffers) the next growth unmaps behind the windows.")
      .def("prefetch", &PageManager::prefetch, "tokens"_a, "max_pages"_a = SIZE_MAX, Release())
      .def("free", &PageManager::free, "slot"_a, Release())
      .def("rewind", &PageManager::rewind, "slot"_a, "length"_a, Release(),
           "Lowers the slot's length to `length` tokens (rejected speculative tokens); its pages stay mapped.")
      .def("grow", [](PageManager& manager, std::size_t tokens) { manager.grow(tokens, nullptr); }, "tokens"_a,
           Release())
      .def("grow_slots", &PageManager::grow_slots, "counts"_a, Release())
      .def("reserve_growth", &PageManager::reserve_growth, "tokens"_a, Release())
      .def("reclaim", &PageManager::reclaim, Release())
      .def("trim", &PageManager::trim, Release())
      .def("release", &PageManager::release, Release())
      .def("discard_unmapped", &discard_if_live, "arrays"_a,
           "Discards the pages unmapped since the last discard if `arrays` (the cache's, K then V) are alive\n"
           "and are the buffers; returns the pages discarded. It checks them and discards with the GIL held,\n"
           "so that no thread can delete or donate them in between. Only for the host driver: its lock\n"
           "holders never wait for the device nor the GIL, so waiting for the lock with the GIL is safe.")
      .def("stats", [](const PageManager& manager) {
        ManagerStats stats;
        {
          nb::gil_scoped_release release;
          stats = manager.stats();
        }
        return stats_dict(stats);
      })
      .def("counters", [](const PageManager& manager) {
        ManagerStats counters;
        {
          nb::gil_scoped_release release;
          counters = manager.counters();
        }
        return counters_dict(counters);
      }, "The counters of stats() that cost nothing to read: for a caller that reads them every step.")
      .def("view", [](const PageManager& manager) {
        ManagerView view;
        {
          nb::gil_scoped_release release;
          view = manager.view();
        }
        return view_dict(view);
      }, "What the manager believes the driver holds: {'slots': [slot][page][buffer] handles, 'bases',\n"
         "'pooled' handles, 'strays': (address, bytes, handle, accessible), 'cache': [{'key', 'page', 'handles',\n"
         "'mappings', 'last_used'}] sorted by key, 'poisoned': first failure or None}.")
      .def("lengths", &PageManager::lengths, Release())
      .def("active", &PageManager::active, Release())
      .def("mapped_pages", &PageManager::mapped_pages, Release());

  m.def("register_manager", [](std::shared_ptr<PageManager> manager) {
    return ManagerRegistry::instance().add(std::move(manager));
  }, "manager"_a, "Makes the manager visible to the FFI handlers; returns its id.");
  m.def("register_group", [](std::vector<std::shared_ptr<PageManager>> managers) {
    return ManagerRegistry::instance().add_group(std::move(managers));
  }, "managers"_a, "Registers the page managers of several devices under one id; returns it. Each device's\n"
     "mapping op finds its own manager by the address of its first cache buffer.");
  m.def("unregister_manager", [](std::uint64_t id) { ManagerRegistry::instance().remove(id); }, "id"_a);

  m.def("device_view", &device_view, "owner"_a, "address"_a, "shape"_a, "dtype_code"_a, "dtype_bits"_a,
        "device_type"_a, "device_id"_a, "A DLPack-exportable array over memory that `owner` keeps alive.");
  m.def("residency", &residency, "address"_a, "bytes"_a,
        "(resident OS pages, OS pages) of the host range, from mincore.");
  m.def("discard_pages", &discard_pages, "address"_a, "bytes"_a,
        "Returns the whole OS pages of the host range to the OS (madvise MADV_DONTNEED).");
  m.def("clear_pages", &clear_pages, "address"_a, "bytes"_a,
        "Zeros the host range: its whole OS pages discarded, the partial ones at its edges written.");
  m.def("os_page_bytes", &os_page_bytes);

  nb::dict cpu_targets;
  cpu_targets["vattention_grow"] = nb::capsule(reinterpret_cast<void*>(VattentionGrowCpu));
  cpu_targets["vattention_uninitialized"] = nb::capsule(reinterpret_cast<void*>(VattentionUninitialized));
  nb::dict cuda_targets;
  cuda_targets["vattention_grow"] = nb::capsule(reinterpret_cast<void*>(VattentionGrowCuda));
  nb::dict targets;
  targets["cpu"] = cpu_targets;
  targets["CUDA"] = cuda_targets;
  m.attr("ffi_targets") = targets;
}
