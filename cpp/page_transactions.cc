// Mapping and unmapping pages, undoing a failed operation, and release: the
// parts of the PageManager that keep its view equal to the driver's.
//
// Every driver call either succeeds or changes nothing (a failed map maps
// nothing, a failed unmap leaves the page mapped), so the manager always
// knows what the driver holds. An operation runs as a transaction: if a call
// fails, rollback() maps back what it unmapped, unmaps what it mapped and
// releases what it created. A page that then fails to unmap stays listed with
// its slot, the view still exact; only a page left mapped in some buffers but
// not others (a "stray") cannot be listed, and poisons the manager.
//
// Pages of the prefix cache may be mapped in several slots: unmapping one
// drops that mapping only (the page stays with the cache, or goes back to the
// pool with its last mapping if it is a forked page), and an eviction the
// operation made is undone by taking the page back from the pool.
#include <algorithm>
#include <iterator>
#include <string>

#include "errors.h"
#include "page_manager.h"

namespace vattention {
namespace {

using Clock = std::chrono::steady_clock;

}  // namespace

PageManager::Checkpoint PageManager::checkpoint() const {
  Checkpoint checkpoint;
  checkpoint.slots.reserve(slots_.size());
  for (const Slot& slot : slots_) {
    checkpoint.slots.push_back(Slot{slot.active, slot.length, slot.reserved, {}});
    checkpoint.page_counts.push_back(slot.pages.size());
  }
  checkpoint.pages_mapped_total = pages_mapped_total_;
  checkpoint.pages_unmapped_total = pages_unmapped_total_;
  checkpoint.pages_evicted_total = pages_evicted_total_;
  checkpoint.window_pages_unmapped_total = window_pages_unmapped_total_;
  return checkpoint;
}

void PageManager::commit() {
  for (const UnmappedPage& page : unmapped_log_) undiscarded_.emplace(page.slot, page.page);
  for (const UnmappedPage& page : window_log_) undiscarded_window_pages_.emplace(page.slot, page.page);
  unmapped_log_.clear();
  window_log_.clear();
  evicted_log_.clear();
  forked_log_.clear();
  written_log_.clear();
  pool_.begin_log();
}

void PageManager::give_back(PhysicalHandle handle) {
  if (handle != kNoPage && !prefix_.holds(handle)) pool_.put({handle});
}

std::size_t PageManager::mappings_of(const std::vector<PhysicalHandle>& handles, std::size_t page) const {
  std::size_t count = 0;
  for (const Slot& slot : slots_) {
    if (slot.pages.size() <= page || mapped_in(slot.pages[page]) == 0) continue;
    // A slot maps the page where its handles are the page's, but in buffers unmapped behind a window.
    bool maps = true;
    for (std::size_t b = 0; b < handles.size() && maps; ++b) {
      maps = slot.pages[page][b] == kNoPage || slot.pages[page][b] == handles[b];
    }
    count += maps;
  }
  for (const StrayMapping& stray : strays_) {
    count += std::find(handles.begin(), handles.end(), stray.handle) != handles.end();
  }
  return count;
}

void PageManager::drop_if_unmapped(const std::vector<PhysicalHandle>& handles, std::size_t page) {
  const std::optional<EntryId> id = prefix_.entry_of(page_handle(handles));
  if (!id || prefix_.at(*id).key || mappings_of(prefix_.at(*id).handles, page) > 0) return;
  PrefixCache::Entry entry = prefix_.erase(*id);
  pool_.put(entry.handles);
  evicted_log_.emplace_back(*id, std::move(entry));
}

void PageManager::poison(const std::string& what) noexcept {
  if (!poisoned_.empty()) return;
  poisoned_ = "the cache manager is unusable: " +
              (undoing_.empty() ? std::string() : "undoing a failed operation (" + undoing_ + ") failed: ") + what +
              ". Its view of the pages may no longer match the driver's: close it (that frees what it can) and "
              "create a new one";
}

std::string PageManager::unmap_or_stray(const std::vector<DevicePtr>& addresses,
                                        const std::vector<PhysicalHandle>& handles,
                                        const std::vector<bool>& accessible) noexcept {
  std::string failure;
  for (std::size_t i = addresses.size(); i-- > 0;) {
    try {
      driver_->unmap(addresses[i], geometry_.page_bytes);
      give_back(handles[i]);
    } catch (const std::exception& error) {
      if (failure.empty()) failure = error.what();
      strays_.push_back(StrayMapping{addresses[i], geometry_.page_bytes, handles[i], accessible[i]});
    }
  }
  return failure;
}

void PageManager::map_pages(std::size_t slot, const std::vector<std::vector<PhysicalHandle>>& pages) {
  Slot& state = slots_[slot];
  const std::size_t first = state.pages.size();
  const std::size_t count = pages.size();
  if (count == 0) return;
  const std::size_t buffers = geometry_.num_buffers;
  const auto start = Clock::now();
  std::vector<DevicePtr> mapped;
  std::vector<PhysicalHandle> mapped_handles;
  std::vector<bool> accessible;
  try {
    // Buffer by buffer, so that one set_access per buffer covers the whole run there (a run for each
    // stretch of pages mapped in the buffer: a page unmapped behind a window, kNoPage, is skipped).
    for (std::size_t b = 0; b < buffers; ++b) {
      const std::size_t before = mapped.size();
      for (std::size_t i = 0; i < count; ++i) {
        if (pages[i][b] == kNoPage) continue;
        const DevicePtr address = page_address(b, slot, first + i);
        driver_->map(address, geometry_.page_bytes, pages[i][b]);
        mapped.push_back(address);
        mapped_handles.push_back(pages[i][b]);
        accessible.push_back(false);
      }
      for (std::size_t i = 0, done = before; i < count;) {
        if (pages[i][b] == kNoPage) {
          ++i;
          continue;
        }
        std::size_t end = i;
        while (end < count && pages[end][b] != kNoPage) ++end;
        driver_->set_access(page_address(b, slot, first + i), (end - i) * geometry_.page_bytes);
        std::fill(accessible.begin() + done, accessible.begin() + done + (end - i), true);
        done += end - i;
        i = end;
      }
    }
  } catch (...) {
    const std::exception_ptr error = std::current_exception();
    const std::string undo = unmap_or_stray(mapped, mapped_handles, accessible);
    // The handles the loop did not reach go back where they belong too (the pool, or the prefix cache).
    for (std::size_t b = 0; b < buffers; ++b) {
      for (std::size_t i = 0; i < count; ++i) {
        const PhysicalHandle handle = pages[i][b];
        if (std::find(mapped_handles.begin(), mapped_handles.end(), handle) == mapped_handles.end()) give_back(handle);
      }
    }
    if (!undo.empty()) {
      poison("mapping pages " + std::to_string(first) + ".." + std::to_string(first + count - 1) + " of slot " +
             std::to_string(slot) + " failed (" + error_message(error) +
             ") and unmapping what was mapped failed too (" + undo + ")");
    }
    std::rethrow_exception(error);
  }
  for (std::size_t i = 0; i < count; ++i) {
    state.pages.push_back(pages[i]);
    listed_handles_ += mapped_in(pages[i]);
    undiscarded_.erase({slot, first + i});  // mapped again: it holds the new request's tokens now
    undiscarded_window_pages_.erase({slot, first + i});
  }
  pages_mapped_total_ += count * buffers;
  map_time_ += Clock::now() - start;
}

void PageManager::map_up_to(std::size_t slot, std::size_t target) {
  const std::size_t first = slots_[slot].pages.size();
  if (target <= first) return;
  const std::size_t buffers = geometry_.num_buffers;
  const auto start = Clock::now();
  const std::vector<PhysicalHandle> handles = pool_.take((target - first) * buffers);
  map_time_ += Clock::now() - start;
  std::vector<std::vector<PhysicalHandle>> pages;
  for (auto page = handles.begin(); page != handles.end(); page += buffers) pages.emplace_back(page, page + buffers);
  map_pages(slot, pages);
}

void PageManager::unmap_top(std::size_t slot, bool log) {
  Slot& state = slots_[slot];
  const std::size_t page = state.pages.size() - 1;
  const std::vector<PhysicalHandle> handles = state.pages.back();
  std::size_t b = 0;
  try {
    for (; b < geometry_.num_buffers; ++b) {
      if (handles[b] != kNoPage) driver_->unmap(page_address(b, slot, page), geometry_.page_bytes);
    }
  } catch (...) {
    // Buffers [0, b) are unmapped, [b, num_buffers) are not: map the first ones back so that the
    // page is whole again, as the manager lists it.
    const std::exception_ptr error = std::current_exception();
    std::string undo;
    std::vector<bool> mapped(geometry_.num_buffers, true);
    std::vector<bool> accessible(geometry_.num_buffers, true);
    for (std::size_t i = 0; i < geometry_.num_buffers; ++i) {
      if (handles[i] == kNoPage) mapped[i] = accessible[i] = false;
    }
    for (std::size_t i = 0; i < b; ++i) {
      if (handles[i] == kNoPage) continue;
      const DevicePtr address = page_address(i, slot, page);
      try {
        driver_->map(address, geometry_.page_bytes, handles[i]);
      } catch (const std::exception& e) {
        if (undo.empty()) undo = e.what();
        mapped[i] = accessible[i] = false;
        continue;
      }
      try {
        driver_->set_access(address, geometry_.page_bytes);
      } catch (const std::exception& e) {
        if (undo.empty()) undo = e.what();
        accessible[i] = false;
      }
    }
    if (!undo.empty()) {
      // The page is now mapped in some buffers and not others: what is still mapped becomes stray.
      for (std::size_t i = 0; i < geometry_.num_buffers; ++i) {
        if (mapped[i]) {
          strays_.push_back(StrayMapping{page_address(i, slot, page), geometry_.page_bytes, handles[i], accessible[i]});
        } else {
          give_back(handles[i]);
        }
      }
      state.pages.pop_back();
      listed_handles_ -= mapped_in(handles);
      poison("unmapping page " + std::to_string(page) + " of slot " + std::to_string(slot) + " failed (" +
             error_message(error) + ") and mapping it back failed too (" + undo + ")");
    }
    std::rethrow_exception(error);
  }
  for (PhysicalHandle handle : handles) give_back(handle);
  state.pages.pop_back();
  listed_handles_ -= mapped_in(handles);
  drop_if_unmapped(handles, page);
  pages_unmapped_total_ += mapped_in(handles);
  if (log) unmapped_log_.push_back(UnmappedPage{slot, page, handles});
}

bool PageManager::map_back(std::size_t slot, const std::vector<PhysicalHandle>& handles,
                           std::string& failure) noexcept {
  try {
    map_pages(slot, {handles});
    return true;
  } catch (const std::exception& error) {
    failure = error.what();
  } catch (...) {
    failure = "an unknown error";
  }
  return false;
}

void PageManager::rollback(const Checkpoint& before, const std::string& failure) noexcept {
  undoing_ = failure;
  // Pages the operation mapped: unmap them, top first. It may have mapped them where it unmapped
  // others first (a reused slot), so each slot goes down to the lowest page count it had. One that
  // fails to unmap stays listed with its slot (and the pages below it too): the view stays exact,
  // and the slot merely has a spare page.
  std::vector<std::size_t> lowest = before.page_counts;
  for (const UnmappedPage& page : unmapped_log_) lowest[page.slot] = std::min(lowest[page.slot], page.page);
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    while (slots_[s].pages.size() > lowest[s]) {
      try {
        unmap_top(s, false);
      } catch (...) {
        break;
      }
    }
  }
  // Forked pages the operation made of a slot's private pages: private again where that slot is
  // the only one left that maps them (an undo above that failed may have left another mapping).
  for (EntryId id : forked_log_) {
    if (prefix_.entries().count(id) == 0) continue;
    const PrefixCache::Entry& entry = prefix_.at(id);
    if (mappings_of(entry.handles, entry.page) <= 1) prefix_.erase(id);
  }
  // Cache entries the operation evicted (and forked pages it unmapped for the last time): back from
  // the pool (all of them are there unless an undo above failed), before the pages below are mapped
  // back, since a cached page is mapped from the cache. Not an entry whose pages the operation wrote:
  // its contents are gone, so it stays in the pool. Nor one the operation made.
  std::vector<PrefixCache::Entry> restored_forked;
  for (auto it = evicted_log_.rbegin(); it != evicted_log_.rend(); ++it) {
    const auto& handles = it->second.handles;
    const bool written = std::any_of(handles.begin(), handles.end(), [this](PhysicalHandle handle) {
      return std::find(written_log_.begin(), written_log_.end(), handle) != written_log_.end();
    });
    const bool made = std::find(forked_log_.begin(), forked_log_.end(), it->first) != forked_log_.end();
    if (written || made || !pool_.remove(handles)) continue;
    prefix_.restore(it->first, it->second);
    if (!it->second.key) restored_forked.push_back(it->second);
  }
  evicted_log_.clear();
  forked_log_.clear();
  written_log_.clear();
  // Pages the operation unmapped: map them back, lowest first. One that fails stays unmapped and
  // pooled (or cached: it was spare), and the pages above it too.
  for (auto it = unmapped_log_.rbegin(); it != unmapped_log_.rend(); ++it) {
    if (slots_[it->slot].pages.size() != it->page) continue;
    std::vector<PhysicalHandle> pooled;  // the page's handles, but in buffers unmapped behind a window
    std::copy_if(it->handles.begin(), it->handles.end(), std::back_inserter(pooled),
                 [](PhysicalHandle handle) { return handle != kNoPage; });
    if (!is_cached(it->handles) && !pool_.remove(pooled)) continue;
    std::string ignored;
    map_back(it->slot, it->handles, ignored);
  }
  unmapped_log_.clear();
  // Pages unmapped behind windows: mapped back (one that cannot stays unmapped and listed so).
  const std::size_t behind_windows = restore_window_pages();
  // A forked page that no slot maps again (its mapping back failed) goes to the pool, as it would
  // have with its last mapping.
  for (const PrefixCache::Entry& entry : restored_forked) drop_if_unmapped(entry.handles, entry.page);
  evicted_log_.clear();
  pool_.release_created();  // a page that fails to release stays pooled: still exact
  std::size_t kept = 0;
  std::size_t lost = 0;
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    const std::size_t pages = slots_[s].pages.size();
    const std::size_t was = before.page_counts[s];
    if (pages > was) kept += pages - was;
    if (pages < was) lost += was - pages;
    slots_[s].active = before.slots[s].active;
    slots_[s].length = before.slots[s].length;
    slots_[s].reserved = before.slots[s].reserved;
  }
  pages_mapped_total_ = before.pages_mapped_total + kept * geometry_.num_buffers;
  pages_unmapped_total_ = before.pages_unmapped_total + lost * geometry_.num_buffers + behind_windows;
  pages_evicted_total_ = before.pages_evicted_total;
  window_pages_unmapped_total_ = before.window_pages_unmapped_total + behind_windows;
  undoing_.clear();
}

void PageManager::release() {
  std::lock_guard<std::mutex> lock(mutex_);
  released_ = true;
  undiscarded_.clear();  // the buffers may be gone: nothing may be discarded any more
  undiscarded_window_pages_.clear();
  std::string first_error;
  auto note = [&first_error](const std::exception& error) {
    if (first_error.empty()) first_error = error.what();
  };
  // Every page goes its own way, so that one failure stops nothing: what fails stays as a stray.
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    for (std::size_t p = 0; p < slots_[s].pages.size(); ++p) {
      for (std::size_t b = 0; b < geometry_.num_buffers; ++b) {
        if (slots_[s].pages[p][b] == kNoPage) continue;
        strays_.push_back(StrayMapping{page_address(b, s, p), geometry_.page_bytes, slots_[s].pages[p][b], true});
      }
    }
    slots_[s] = Slot{};
  }
  listed_handles_ = 0;
  if (!strays_.empty()) {
    try {
      driver_->synchronize(nullptr);
    } catch (const std::exception& error) {
      note(error);  // unmapping is still the best that can be done
    }
  }
  std::vector<StrayMapping> left;
  for (const StrayMapping& stray : strays_) {
    try {
      driver_->unmap(stray.address, stray.bytes);
      pages_unmapped_total_ += 1;
      give_back(stray.handle);
    } catch (const std::exception& error) {
      note(error);
      left.push_back(stray);
    }
  }
  strays_ = std::move(left);
  // The cache's pages go with the rest, but those still mapped somewhere: the next release() tries again.
  for (EntryId id : prefix_.eviction_order()) {
    const std::vector<PhysicalHandle>& handles = prefix_.at(id).handles;
    const bool mapped = std::any_of(strays_.begin(), strays_.end(), [&](const StrayMapping& stray) {
      return std::find(handles.begin(), handles.end(), stray.handle) != handles.end();
    });
    if (!mapped) pool_.put(prefix_.erase(id).handles);
  }
  try {
    pool_.trim(0);
  } catch (const std::exception& error) {
    note(error);
  }
  std::vector<DevicePtr> reservations = unfreed_reservations_;
  if (reserved_by_driver_) reservations.insert(reservations.end(), bases_.begin(), bases_.end());
  unfreed_reservations_.clear();
  for (DevicePtr base : reservations) {
    try {
      driver_->free_reservation(base, geometry_.buffer_bytes());
    } catch (const std::exception& error) {
      note(error);
      unfreed_reservations_.push_back(base);
    }
  }
  if (reserved_by_driver_) bases_.clear();
  if (!first_error.empty()) {
    throw DriverError("release: " + first_error + "; left: " + std::to_string(strays_.size()) + " pages mapped, " +
                      std::to_string(pool_.created_pages()) + " pages alive, " +
                      std::to_string(unfreed_reservations_.size()) + " reservations. Call release() again");
  }
}

}  // namespace vattention
