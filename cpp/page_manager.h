// Physical pages mapped on demand into a cache's virtual buffers.
//
// A cache has `num_buffers` buffers (the K and V of every layer), each shaped
// [max_batch, capacity, kv_heads, head_dim]. Slot s of every buffer is one
// virtually contiguous span; its first pages are mapped as its sequence grows:
//
//   buffer k[0]:  | slot 0: ##__________ | slot 1: ###_________ | slot 2: ____________ |
//   buffer v[0]:  | slot 0: ##__________ | slot 1: ###_________ | slot 2: ____________ |
//                   # mapped page, _ reserved only (no physical memory)
//
// Every slot has the same number of pages mapped in every buffer, so a slot's
// mapped capacity is one number. A freed slot keeps its pages for the next
// request placed there (deferred reclamation) until another slot needs them.
// All methods are thread-safe; any error leaves the state as it was.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "driver.h"
#include "page_pool.h"

namespace vattention {

struct CacheGeometry {
  std::size_t num_buffers = 0;
  std::size_t max_batch = 0;
  std::size_t capacity = 0;     // tokens per slot
  std::size_t token_bytes = 0;  // one token of one buffer: kv_heads * head_dim * itemsize
  std::size_t page_bytes = 0;

  std::size_t slot_bytes() const { return capacity * token_bytes; }
  std::size_t buffer_bytes() const { return max_batch * slot_bytes(); }
  // Pages of one buffer that hold the first `tokens` tokens of a slot.
  std::size_t pages_for(std::size_t tokens) const {
    return (tokens * token_bytes + page_bytes - 1) / page_bytes;
  }
  // Throws std::invalid_argument naming the first inconsistent field.
  void validate(std::size_t granularity) const;
};

struct ManagerStats {
  std::size_t page_bytes = 0;
  std::size_t budget_pages = 0;
  std::size_t created_pages = 0;   // alive: mapped or pooled
  std::size_t pooled_pages = 0;    // created, not mapped
  std::size_t mapped_pages = 0;    // over all buffers and slots
  std::size_t deferred_pages = 0;  // mapped to free slots, reclaimable
  std::size_t active_slots = 0;
  std::size_t used_tokens = 0;     // sum of the active slots' lengths
  std::size_t used_bytes = 0;      // bytes those tokens occupy over all buffers
  std::size_t waste_bytes = 0;     // mapped to active slots but holding no token
  std::uint64_t pages_mapped_total = 0;
  std::uint64_t pages_unmapped_total = 0;
  std::uint64_t grow_calls = 0;
  double map_seconds = 0;    // time spent creating and mapping pages
  double unmap_seconds = 0;  // time spent waiting for the device and unmapping
};

class PageManager {
 public:
  PageManager(CacheGeometry geometry, std::shared_ptr<Driver> driver, std::size_t budget_bytes);
  PageManager(const PageManager&) = delete;
  PageManager& operator=(const PageManager&) = delete;
  // Waits for the device, unmaps and releases everything. Never throws.
  ~PageManager();

  const CacheGeometry& geometry() const { return geometry_; }

  // Reserves the virtual buffers with the driver (the CUDA backend)...
  void reserve_buffers();
  // ...or adopts buffers allocated elsewhere (XLA's, on the CPU backend).
  void adopt_buffers(const std::vector<DevicePtr>& bases);
  std::vector<DevicePtr> buffer_bases() const;

  // Places a request of `prompt_len` tokens in a free slot, maps the pages
  // of its first `prompt_len + lookahead` tokens (eager allocation) and
  // returns the slot. Prefers a slot whose deferred pages cover the most.
  int alloc(std::size_t prompt_len, std::size_t lookahead = 0);
  // Ends the request in `slot`; its pages stay mapped for the next one.
  void free(int slot);
  // Adds `tokens` to every active slot (up to the capacity) and maps the
  // pages that takes. `stream` is XLA's when called from the mapping op.
  void grow(std::size_t tokens, void* stream);
  // Maps now, without growing, pages that growing every active slot by
  // `tokens` will need: the host maps ahead while the device computes. One
  // slot's next page (in every buffer) at a time, the slot closest to the end
  // of its pages first, until `max_pages` or more are mapped. Best effort: it
  // stops when the budget has no free page (it never waits for the device to
  // reclaim free slots' pages). Returns the pages mapped.
  std::size_t prefetch(std::size_t tokens, std::size_t max_pages = SIZE_MAX);
  // Makes sure that growing every active slot by `tokens` cannot run out of
  // pages: creates the missing physical pages now (eager allocation).
  void reserve_growth(std::size_t tokens);
  // Unmaps the pages of free slots once the device is done with them.
  std::size_t reclaim();
  // Releases pooled pages to the device; returns how many.
  std::size_t trim();
  // Unmaps and releases everything and frees the reservations; idempotent.
  void release();

  ManagerStats stats() const;
  std::vector<std::size_t> lengths() const;
  std::vector<bool> active() const;
  std::vector<std::size_t> mapped_pages() const;

 private:
  struct Slot {
    bool active = false;
    std::size_t length = 0;
    // Tokens the slot was promised (its prompt and lookahead, or a reserved growth): the pages
    // that hold them stay; pages beyond are spare and can be reclaimed under memory pressure.
    std::size_t reserved = 0;
    // pages[p][b]: the physical page behind page p of this slot in buffer b.
    std::vector<std::vector<PhysicalHandle>> pages;
  };

  void check_open() const;
  void check_slot(int slot) const;
  DevicePtr page_address(std::size_t buffer, std::size_t slot, std::size_t page) const;
  // Pages of `slot` that can be taken under memory pressure, in each buffer: all of a free slot's;
  // an active slot's beyond what its reserved tokens, and `growth` tokens past its length, need.
  std::size_t spare_pages(std::size_t slot, std::size_t growth) const;
  // Spare pages of every slot but `keep_slot`, over all buffers.
  std::size_t reclaimable_pages(std::optional<std::size_t> keep_slot, std::size_t growth = 0) const;
  // Maps pages of `slot` until it has `target`; all or nothing.
  void map_up_to(std::size_t slot, std::size_t target);
  // Unmaps pages of `slot` above `target`, returning them to the pool.
  void unmap_down_to(std::size_t slot, std::size_t target);
  // Unmaps spare pages until the pool's headroom reaches `needed`: free slots' first (those holding
  // the most first), then active slots' spare tails. Waits for the device first.
  void reclaim_for(std::size_t needed, std::optional<std::size_t> keep_slot, void* stream,
                   std::size_t growth = 0);
  // Pages each slot needs to hold `tokens` more (its current count if inactive or already
  // covered); `extra` gets the pages to map over all buffers.
  std::vector<std::size_t> growth_targets(std::size_t tokens, std::size_t& extra) const;
  // Maps pages for every active slot to hold `tokens` more; all or nothing.
  void map_for_growth(std::size_t tokens, void* stream);
  void unmap_everything() noexcept;

  mutable std::mutex mutex_;
  CacheGeometry geometry_;
  std::shared_ptr<Driver> driver_;
  PagePool pool_;
  std::vector<DevicePtr> bases_;
  bool reserved_by_driver_ = false;
  bool released_ = false;
  std::vector<Slot> slots_;
  std::uint64_t pages_mapped_total_ = 0;
  std::uint64_t pages_unmapped_total_ = 0;
  std::uint64_t grow_calls_ = 0;
  std::chrono::nanoseconds map_time_{0};
  std::chrono::nanoseconds unmap_time_{0};
};

}  // namespace vattention
