#include "page_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "errors.h"

namespace vattention {
namespace {

using Clock = std::chrono::steady_clock;

std::string pages_text(std::size_t pages, std::size_t page_bytes) {
  return std::to_string(pages) + " pages (" + std::to_string(pages * page_bytes >> 20) + " MiB)";
}

}  // namespace

void CacheGeometry::validate(std::size_t granularity) const {
  auto require = [](bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
  };
  require(num_buffers > 0, "num_buffers must be positive");
  require(max_batch > 0, "max_batch must be positive");
  require(capacity > 0, "capacity must be positive");
  require(token_bytes > 0, "token_bytes must be positive");
  require(page_bytes > 0 && page_bytes % granularity == 0,
          "page_bytes " + std::to_string(page_bytes) + " must be a positive multiple of the driver's granularity " +
              std::to_string(granularity));
  require(slot_bytes() % page_bytes == 0,
          "a slot of " + std::to_string(capacity) + " tokens x " + std::to_string(token_bytes) +
              " bytes is not a whole number of " + std::to_string(page_bytes) + "-byte pages: round the capacity up");
}

PageManager::PageManager(CacheGeometry geometry, std::shared_ptr<Driver> driver, std::size_t budget_bytes)
    : geometry_(geometry),
      driver_(std::move(driver)),
      pool_(*driver_, geometry.page_bytes, geometry.page_bytes ? budget_bytes / geometry.page_bytes : 0),
      slots_(geometry.max_batch) {
  geometry_.validate(driver_->granularity());
}

PageManager::~PageManager() {
  try {
    release();
  } catch (...) {
    // A destructor cannot report; release() already tried everything it could.
  }
}

void PageManager::check_open() const {
  if (released_) throw std::logic_error("the cache manager was closed");
  if (bases_.empty()) throw std::logic_error("the cache manager has no buffers yet");
}

void PageManager::check_slot(int slot) const {
  if (slot < 0 || static_cast<std::size_t>(slot) >= slots_.size()) {
    throw std::invalid_argument("slot " + std::to_string(slot) + " does not exist: slots are 0.." +
                                std::to_string(slots_.size() - 1));
  }
}

void PageManager::reserve_buffers() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (released_ || !bases_.empty()) throw std::logic_error("the buffers are already set up");
  std::vector<DevicePtr> reserved;
  try {
    for (std::size_t b = 0; b < geometry_.num_buffers; ++b) {
      reserved.push_back(driver_->reserve(geometry_.buffer_bytes(), geometry_.page_bytes));
    }
  } catch (...) {
    for (DevicePtr base : reserved) {
      try {
        driver_->free_reservation(base, geometry_.buffer_bytes());
      } catch (...) {
        // The reservation error is the one to report.
      }
    }
    throw;
  }
  bases_ = std::move(reserved);
  reserved_by_driver_ = true;
}

void PageManager::adopt_buffers(const std::vector<DevicePtr>& bases) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (released_ || !bases_.empty()) throw std::logic_error("the buffers are already set up");
  if (bases.size() != geometry_.num_buffers) {
    throw std::invalid_argument("expected " + std::to_string(geometry_.num_buffers) + " buffers, got " +
                                std::to_string(bases.size()));
  }
  for (DevicePtr base : bases) {
    if (base == 0) throw std::invalid_argument("a buffer address is null");
  }
  bases_ = bases;
}

std::vector<DevicePtr> PageManager::buffer_bases() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return bases_;
}

DevicePtr PageManager::page_address(std::size_t buffer, std::size_t slot, std::size_t page) const {
  return bases_[buffer] + slot * geometry_.slot_bytes() + page * geometry_.page_bytes;
}

std::size_t PageManager::spare_pages(std::size_t slot, std::size_t growth) const {
  const Slot& state = slots_[slot];
  if (!state.active) return state.pages.size();
  const std::size_t keep = geometry_.pages_for(
      std::min(std::max(state.reserved, state.length + growth), geometry_.capacity));
  return state.pages.size() > keep ? state.pages.size() - keep : 0;
}

std::size_t PageManager::reclaimable_pages(std::optional<std::size_t> keep_slot, std::size_t growth) const {
  std::size_t pages = 0;
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    if (keep_slot != s) pages += spare_pages(s, growth) * geometry_.num_buffers;
  }
  return pages;
}

void PageManager::map_up_to(std::size_t slot, std::size_t target) {
  Slot& state = slots_[slot];
  const std::size_t first = state.pages.size();
  if (target <= first) return;
  const std::size_t count = target - first;
  const std::size_t buffers = geometry_.num_buffers;
  const auto start = Clock::now();
  const std::size_t pooled_before = pool_.pooled_pages();
  std::vector<PhysicalHandle> handles = pool_.take(count * buffers);
  std::vector<DevicePtr> mapped;
  try {
    // One set_access per buffer covers all of the slot's new pages there.
    for (std::size_t b = 0; b < buffers; ++b) {
      for (std::size_t p = first; p < target; ++p) {
        const DevicePtr address = page_address(b, slot, p);
        driver_->map(address, geometry_.page_bytes, handles[(p - first) * buffers + b]);
        mapped.push_back(address);
      }
      driver_->set_access(page_address(b, slot, first), count * geometry_.page_bytes);
    }
  } catch (...) {
    for (DevicePtr address : mapped) {
      try {
        driver_->unmap(address, geometry_.page_bytes);
      } catch (...) {
        // The mapping error is the one to report.
      }
    }
    pool_.put(handles);
    pool_.trim(pooled_before);  // release the pages this call created
    throw;
  }
  for (std::size_t p = first; p < target; ++p) {
    state.pages.emplace_back(handles.begin() + (p - first) * buffers, handles.begin() + (p - first + 1) * buffers);
  }
  pages_mapped_total_ += count * buffers;
  map_time_ += Clock::now() - start;
}

void PageManager::unmap_down_to(std::size_t slot, std::size_t target) {
  Slot& state = slots_[slot];
  if (state.pages.size() <= target) return;
  const std::size_t top = state.pages.size();
  const auto start = Clock::now();
  while (state.pages.size() > target) {
    const std::size_t p = state.pages.size() - 1;
    for (std::size_t b = 0; b < geometry_.num_buffers; ++b) {
      driver_->unmap(page_address(b, slot, p), geometry_.page_bytes);
    }
    pool_.put(state.pages.back());
    state.pages.pop_back();
    pages_unmapped_total_ += geometry_.num_buffers;
  }
  for (std::size_t b = 0; b < geometry_.num_buffers; ++b) {
    driver_->discard(page_address(b, slot, target), (top - target) * geometry_.page_bytes);
  }
  unmap_time_ += Clock::now() - start;
}

void PageManager::reclaim_for(std::size_t needed, std::optional<std::size_t> keep_slot, void* stream,
                              std::size_t growth) {
  if (pool_.headroom() >= needed) return;
  const auto start = Clock::now();
  driver_->synchronize(stream);
  unmap_time_ += Clock::now() - start;
  // Free slots before active ones; among each, the slots with the most spare pages first: they
  // are the least likely to be reused whole.
  std::vector<std::size_t> order;
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    if (keep_slot != s && spare_pages(s, growth) > 0) order.push_back(s);
  }
  std::stable_sort(order.begin(), order.end(), [this, growth](std::size_t a, std::size_t b) {
    if (slots_[a].active != slots_[b].active) return !slots_[a].active;
    return spare_pages(a, growth) > spare_pages(b, growth);
  });
  for (std::size_t s : order) {
    const std::size_t missing = needed - pool_.headroom();
    const std::size_t pages = std::min(spare_pages(s, growth), (missing + geometry_.num_buffers - 1) / geometry_.num_buffers);
    unmap_down_to(s, slots_[s].pages.size() - pages);
    if (pool_.headroom() >= needed) return;
  }
}

int PageManager::alloc(std::size_t prompt_len, std::size_t lookahead) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  if (prompt_len > geometry_.capacity) {
    throw std::invalid_argument("a prompt of " + std::to_string(prompt_len) + " tokens does not fit a slot of " +
                                std::to_string(geometry_.capacity) + " tokens");
  }
  const std::size_t need = geometry_.pages_for(std::min(prompt_len + lookahead, geometry_.capacity));
  std::optional<std::size_t> best;
  auto reuse = [&](std::size_t s) { return std::min(slots_[s].pages.size(), need); };
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    if (slots_[s].active) continue;
    if (!best || reuse(s) > reuse(*best) ||
        (reuse(s) == reuse(*best) && slots_[s].pages.size() < slots_[*best].pages.size())) {
      best = s;
    }
  }
  if (!best) throw NoFreeSlot("all " + std::to_string(slots_.size()) + " slots are in use: free one first");
  const std::size_t have = slots_[*best].pages.size();
  const std::size_t extra = need > have ? (need - have) * geometry_.num_buffers : 0;
  if (pool_.headroom() + reclaimable_pages(best) < extra) {
    throw OutOfPages("a prompt of " + std::to_string(prompt_len) + " tokens needs " +
                     pages_text(extra, geometry_.page_bytes) + " but the budget has " +
                     pages_text(pool_.headroom() + reclaimable_pages(best), geometry_.page_bytes) + " left");
  }
  reclaim_for(extra, best, nullptr);
  map_up_to(*best, need);
  slots_[*best].active = true;
  slots_[*best].length = prompt_len;
  slots_[*best].reserved = std::min(prompt_len + lookahead, geometry_.capacity);
  return static_cast<int>(*best);
}

void PageManager::free(int slot) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  check_slot(slot);
  if (!slots_[slot].active) {
    throw std::invalid_argument("slot " + std::to_string(slot) + " is not allocated (freed twice?)");
  }
  slots_[slot].active = false;
  slots_[slot].length = 0;
  slots_[slot].reserved = 0;
}

void PageManager::grow(std::size_t tokens, void* stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  ++grow_calls_;
  map_for_growth(tokens, stream);
  for (Slot& slot : slots_) {
    if (slot.active) slot.length = std::min(slot.length + tokens, geometry_.capacity);
  }
}

std::size_t PageManager::prefetch(std::size_t tokens, std::size_t max_pages) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  std::size_t extra = 0;
  const std::vector<std::size_t> targets = growth_targets(tokens, extra);
  const std::uint64_t mapped_before = pages_mapped_total_;
  while (pages_mapped_total_ - mapped_before < max_pages && pool_.headroom() >= geometry_.num_buffers) {
    std::optional<std::size_t> next;
    std::size_t least_slack = 0;  // bytes mapped beyond the slot's tokens, in each buffer
    for (std::size_t s = 0; s < slots_.size(); ++s) {
      if (!slots_[s].active || slots_[s].pages.size() >= targets[s]) continue;
      const std::size_t slack = slots_[s].pages.size() * geometry_.page_bytes - slots_[s].length * geometry_.token_bytes;
      if (!next || slack < least_slack) {
        next = s;
        least_slack = slack;
      }
    }
    if (!next) break;
    map_up_to(*next, slots_[*next].pages.size() + 1);
  }
  return static_cast<std::size_t>(pages_mapped_total_ - mapped_before);
}

std::vector<std::size_t> PageManager::growth_targets(std::size_t tokens, std::size_t& extra) const {
  std::vector<std::size_t> targets(slots_.size(), 0);
  extra = 0;
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    if (!slots_[s].active) continue;
    const std::size_t length = std::min(slots_[s].length + tokens, geometry_.capacity);
    targets[s] = std::max(geometry_.pages_for(length), slots_[s].pages.size());
    extra += (targets[s] - slots_[s].pages.size()) * geometry_.num_buffers;
  }
  return targets;
}

void PageManager::map_for_growth(std::size_t tokens, void* stream) {
  std::size_t extra = 0;
  std::vector<std::size_t> targets = growth_targets(tokens, extra);
  if (extra > 0) {
    if (pool_.headroom() + reclaimable_pages(std::nullopt, tokens) < extra) {
      throw OutOfPages("growing every active slot by " + std::to_string(tokens) + " tokens needs " +
                       pages_text(extra, geometry_.page_bytes) + " more than the budget holds: call " +
                       "reserve_growth() before the decode loop, or free slots");
    }
    reclaim_for(extra, std::nullopt, stream, tokens);
    targets = growth_targets(tokens, extra);  // spare tails may have gone; the pages missing did not change
    const std::size_t pooled_before = pool_.pooled_pages();
    const std::uint64_t mapped_total_before = pages_mapped_total_;
    const std::uint64_t unmapped_total_before = pages_unmapped_total_;
    std::vector<std::pair<std::size_t, std::size_t>> grown;  // (slot, pages before)
    try {
      for (std::size_t s = 0; s < slots_.size(); ++s) {
        if (!slots_[s].active || targets[s] == slots_[s].pages.size()) continue;
        const std::size_t before = slots_[s].pages.size();
        map_up_to(s, targets[s]);
        grown.emplace_back(s, before);
      }
    } catch (...) {
      // Pages mapped by this call are not used by any work yet.
      for (auto [s, before] : grown) unmap_down_to(s, before);
      pool_.trim(pooled_before);
      pages_mapped_total_ = mapped_total_before;
      pages_unmapped_total_ = unmapped_total_before;
      throw;
    }
  }
}

void PageManager::reserve_growth(std::size_t tokens) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  std::size_t extra = 0;
  growth_targets(tokens, extra);
  if (pool_.headroom() + reclaimable_pages(std::nullopt, tokens) < extra) {
    throw OutOfPages("growing every active slot by " + std::to_string(tokens) + " tokens needs " +
                     pages_text(extra, geometry_.page_bytes) + " but the budget has " +
                     pages_text(pool_.headroom() + reclaimable_pages(std::nullopt, tokens), geometry_.page_bytes) +
                     " left: free slots or lower max_new_tokens");
  }
  reclaim_for(extra, std::nullopt, nullptr, tokens);  // spare tails lie beyond the growth: `extra` holds
  const auto start = Clock::now();
  pool_.fill(extra);
  map_time_ += Clock::now() - start;
  for (Slot& slot : slots_) {
    if (slot.active) slot.reserved = std::max(slot.reserved, std::min(slot.length + tokens, geometry_.capacity));
  }
}

std::size_t PageManager::reclaim() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  const std::size_t before = pages_unmapped_total_;
  const bool deferred = std::any_of(slots_.begin(), slots_.end(),
                                   [](const Slot& slot) { return !slot.active && !slot.pages.empty(); });
  if (!deferred) return 0;
  const auto start = Clock::now();
  driver_->synchronize(nullptr);
  unmap_time_ += Clock::now() - start;
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    if (!slots_[s].active) unmap_down_to(s, 0);
  }
  return pages_unmapped_total_ - before;
}

std::size_t PageManager::trim() {
  std::lock_guard<std::mutex> lock(mutex_);
  return pool_.trim(0);
}

void PageManager::unmap_everything() noexcept {
  if (!reserved_by_driver_) {
    // Adopted buffers belong to XLA, which may already have freed and reused
    // them: forget the mappings without touching the memory.
    for (Slot& slot : slots_) {
      for (const auto& page : slot.pages) pool_.put(page);
      pages_unmapped_total_ += slot.pages.size() * geometry_.num_buffers;
      slot = Slot{};
    }
    return;
  }
  try {
    driver_->synchronize(nullptr);
  } catch (...) {
    // Unmapping below is still the best that can be done.
  }
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    try {
      unmap_down_to(s, 0);
    } catch (...) {
      // Keep going: release what can be released.
    }
    slots_[s].active = false;
    slots_[s].length = 0;
  }
}

void PageManager::release() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (released_) return;
  released_ = true;
  unmap_everything();
  pool_.trim(0);
  if (reserved_by_driver_) {
    for (DevicePtr base : bases_) driver_->free_reservation(base, geometry_.buffer_bytes());
  }
}

ManagerStats PageManager::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  ManagerStats stats;
  stats.page_bytes = geometry_.page_bytes;
  stats.budget_pages = pool_.budget_pages();
  stats.created_pages = pool_.created_pages();
  stats.pooled_pages = pool_.pooled_pages();
  std::size_t active_mapped = 0;
  for (const Slot& slot : slots_) {
    const std::size_t pages = slot.pages.size() * geometry_.num_buffers;
    stats.mapped_pages += pages;
    if (slot.active) {
      ++stats.active_slots;
      stats.used_tokens += slot.length;
      active_mapped += pages;
    } else {
      stats.deferred_pages += pages;
    }
  }
  stats.used_bytes = stats.used_tokens * geometry_.token_bytes * geometry_.num_buffers;
  stats.waste_bytes = active_mapped * geometry_.page_bytes - stats.used_bytes;
  stats.pages_mapped_total = pages_mapped_total_;
  stats.pages_unmapped_total = pages_unmapped_total_;
  stats.grow_calls = grow_calls_;
  stats.map_seconds = std::chrono::duration<double>(map_time_).count();
  stats.unmap_seconds = std::chrono::duration<double>(unmap_time_).count();
  return stats;
}

std::vector<std::size_t> PageManager::lengths() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::size_t> lengths;
  for (const Slot& slot : slots_) lengths.push_back(slot.length);
  return lengths;
}

std::vector<bool> PageManager::active() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<bool> active;
  for (const Slot& slot : slots_) active.push_back(slot.active);
  return active;
}

std::vector<std::size_t> PageManager::mapped_pages() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::size_t> pages;
  for (const Slot& slot : slots_) pages.push_back(slot.pages.size());
  return pages;
}

}  // namespace vattention
