// What the PageManager reports: statistics, the slots' lengths, and its whole
// view of the pages for tests. A poisoned manager reports only its statistics
// and its view: its lengths may no longer be what the device holds.
#include <algorithm>
#include <chrono>

#include "errors.h"
#include "page_manager.h"

namespace vattention {

ManagerStats PageManager::counters() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return counters_locked();
}

ManagerStats PageManager::counters_locked() const {
  ManagerStats stats;
  stats.page_bytes = geometry_.page_bytes;
  stats.budget_pages = pool_.budget_pages();
  stats.created_pages = pool_.created_pages();
  stats.pooled_pages = pool_.pooled_pages();
  stats.mapped_pages = listed_handles_;
  stats.pages_mapped_total = pages_mapped_total_;
  stats.pages_unmapped_total = pages_unmapped_total_;
  stats.grow_calls = grow_calls_;
  stats.pages_evicted_total = pages_evicted_total_;
  stats.window_pages_unmapped_total = window_pages_unmapped_total_;
  stats.map_seconds = std::chrono::duration<double>(map_time_).count();
  stats.unmap_seconds = std::chrono::duration<double>(unmap_time_).count();
  stats.poisoned = !poisoned_.empty();
  return stats;
}

ManagerStats PageManager::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  ManagerStats stats = counters_locked();
  stats.reserved_pages = owed_pages();
  std::size_t mapped = 0;
  std::size_t active_mapped = 0;
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    const Slot& slot = slots_[s];
    std::size_t pages = 0;
    for (const auto& page : slot.pages) pages += mapped_in(page);
    mapped += pages;
    stats.window_unmapped_pages += slot.pages.size() * geometry_.num_buffers - pages;
    if (slot.active) {
      ++stats.active_slots;
      stats.used_tokens += slot.length;
      active_mapped += pages;
      // The bytes of the slot's tokens in the pages it maps: a windowed buffer lacks those behind its holes.
      const std::size_t bytes = slot.length * geometry_.token_bytes;
      for (std::size_t b = 0; b < geometry_.num_buffers; ++b) {
        std::size_t holes = 0;
        while (holes < slot.pages.size() && slot.pages[holes][b] == kNoPage) ++holes;
        stats.used_bytes += bytes - std::min(bytes, holes * geometry_.page_bytes);
      }
    } else {
      stats.deferred_pages += pages;
    }
  }
  stats.mapped_pages = mapped;  // counted here; counters() keeps the same number as the tables change
  stats.waste_bytes = active_mapped * geometry_.page_bytes - stats.used_bytes;
  stats.cached_pages = (prefix_.size() - prefix_.forked()) * geometry_.num_buffers;
  stats.forked_pages = prefix_.forked() * geometry_.num_buffers;
  for (const auto& [id, mappings] : cache_mappings()) {
    if (mappings > 1) {
      stats.shared_pages += geometry_.num_buffers;
      stats.bytes_saved += (mappings - 1) * geometry_.num_buffers * geometry_.page_bytes;
    }
  }
  return stats;
}

std::vector<std::size_t> PageManager::lengths() const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!poisoned_.empty()) throw ManagerPoisoned(poisoned_);
  std::vector<std::size_t> lengths;
  for (const Slot& slot : slots_) lengths.push_back(slot.length);
  return lengths;
}

std::vector<bool> PageManager::active() const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!poisoned_.empty()) throw ManagerPoisoned(poisoned_);
  std::vector<bool> active;
  for (const Slot& slot : slots_) active.push_back(slot.active);
  return active;
}

std::vector<std::size_t> PageManager::mapped_pages() const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!poisoned_.empty()) throw ManagerPoisoned(poisoned_);
  std::vector<std::size_t> pages;
  for (const Slot& slot : slots_) pages.push_back(slot.pages.size());
  return pages;
}

ManagerView PageManager::view() const {
  std::lock_guard<std::mutex> lock(mutex_);
  ManagerView view;
  for (const Slot& slot : slots_) view.slots.push_back(slot.pages);
  view.bases = bases_;
  view.pooled = pool_.pooled();
  view.strays = strays_;
  const auto mappings = cache_mappings();
  for (const auto& [id, entry] : prefix_.entries()) {
    auto count = mappings.find(id);
    view.cache.push_back(CachedPage{entry.key, entry.page, entry.handles,
                                    count == mappings.end() ? 0 : count->second, entry.last_used});
  }
  // Cached pages by key, then forked pages by their handles.
  std::sort(view.cache.begin(), view.cache.end(), [](const CachedPage& a, const CachedPage& b) {
    return std::make_pair(!a.key.has_value(), a.key ? *a.key : a.handles.front()) <
           std::make_pair(!b.key.has_value(), b.key ? *b.key : b.handles.front());
  });
  view.poisoned = poisoned_;
  return view;
}

}  // namespace vattention
