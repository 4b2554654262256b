// Sliding windows in the PageManager: the pages behind every query's window go back to the pool
// while the request goes on.
//
// A layer with a window of W tokens attends, for a query at position p, only to keys p - W < s <= p.
// A slot's next step has its queries at the slot's length L and later, so its keys below
// L - W + 1 are never read again, in the buffers of windowed layers. Each growth first unmaps
// those buffers' pages that lie wholly below that (after the device is done with the steps that
// may still read them); the slot keeps its reserved range, and the other buffers their pages:
//
//   buffer k[0] (windowed):  | slot 0: ___###____ |     _ unmapped behind the window
//   buffer k[1] (full):      | slot 0: ######____ |     # mapped
//                                      ^ L - W + 1 (the page holding it stays)
//
// An unmapped page of a windowed buffer is kNoPage in the slot's page table; only leading pages
// are. A slot's pages above stay whole, so mapping and reclaiming from the top is unchanged, and a
// free slot with holes is reused from page 0 (its pages are unmapped first: see reusable_pages).
// A cached page of the prefix cache that falls behind a window only loses this slot's mapping in
// the windowed buffers; it stays cached. Failures follow page_transactions.cc: the growth that
// unmapped is a transaction, and its rollback maps the pages back; a page that cannot be mapped
// back stays unmapped and listed so (it lies behind the window: nothing reads it).
#include <algorithm>
#include <string>

#include "errors.h"
#include "page_manager.h"

namespace vattention {

void PageManager::set_window(std::size_t window, const std::vector<bool>& windowed) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (released_) throw std::logic_error("the cache manager was closed");
  if (windowed.size() != geometry_.num_buffers) {
    throw std::invalid_argument("set_window takes one flag per buffer (" + std::to_string(geometry_.num_buffers) +
                                "), got " + std::to_string(windowed.size()));
  }
  const bool mapped = std::any_of(slots_.begin(), slots_.end(), [](const Slot& slot) { return !slot.pages.empty(); });
  if (mapped) throw std::logic_error("set_window: set the window before the first alloc, while no page is mapped");
  window_ = std::any_of(windowed.begin(), windowed.end(), [](bool flag) { return flag; }) ? window : 0;
  windowed_ = windowed;
}

std::size_t PageManager::window() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return window_;
}

std::size_t PageManager::window_pages_due() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::size_t pages = 0;
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    const std::size_t dead = dead_pages(s);
    for (std::size_t p = window_holes(s); p < dead; ++p) {
      for (std::size_t b = 0; b < geometry_.num_buffers; ++b) pages += windowed_[b] && slots_[s].pages[p][b] != kNoPage;
    }
  }
  return pages;
}

PhysicalHandle PageManager::page_handle(const std::vector<PhysicalHandle>& page) {
  for (PhysicalHandle handle : page) {
    if (handle != kNoPage) return handle;
  }
  return kNoPage;
}

std::size_t PageManager::mapped_in(const std::vector<PhysicalHandle>& page) {
  return static_cast<std::size_t>(std::count_if(page.begin(), page.end(), [](PhysicalHandle h) { return h != kNoPage; }));
}

std::size_t PageManager::window_holes(std::size_t slot) const {
  if (window_ == 0) return 0;
  const auto& pages = slots_[slot].pages;
  std::size_t p = 0;
  for (; p < pages.size(); ++p) {
    bool unmapped = true;
    for (std::size_t b = 0; b < geometry_.num_buffers && unmapped; ++b) unmapped = !windowed_[b] || pages[p][b] == kNoPage;
    if (!unmapped) break;
  }
  return p;
}

std::size_t PageManager::dead_pages(std::size_t slot) const {
  const Slot& state = slots_[slot];
  if (window_ == 0 || !state.active || state.length < window_) return 0;
  const std::size_t first_read = state.length - window_ + 1;  // the first key the next query sees
  return std::min(first_read * geometry_.token_bytes / geometry_.page_bytes, state.pages.size());
}

void PageManager::unmap_behind_windows(void* stream) {
  if (window_ == 0) return;
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    const std::size_t dead = dead_pages(s);
    for (std::size_t p = window_holes(s); p < dead; ++p) {
      // The steps in flight may still read these pages: their queries sat below the slot's length.
      wait_for_device(stream);
      const auto start = std::chrono::steady_clock::now();
      unmap_window_page(s, p);
      unmap_time_ += std::chrono::steady_clock::now() - start;
    }
  }
}

void PageManager::unmap_window_page(std::size_t slot, std::size_t page) {
  std::vector<PhysicalHandle>& handles = slots_[slot].pages[page];
  std::vector<PhysicalHandle> unmapped(geometry_.num_buffers, kNoPage);
  for (std::size_t b = 0; b < geometry_.num_buffers; ++b) {
    if (!windowed_[b] || handles[b] == kNoPage) continue;
    try {
      driver_->unmap(page_address(b, slot, page), geometry_.page_bytes);
    } catch (...) {
      // The buffers unmapped before this one go back, so that the page is as it was; one that
      // cannot stays unmapped, and listed so.
      const std::exception_ptr error = std::current_exception();
      std::vector<PhysicalHandle> stuck(geometry_.num_buffers, kNoPage);
      for (std::size_t i = 0; i < b; ++i) {
        if (unmapped[i] == kNoPage) continue;
        if (map_window_back(slot, page, i, unmapped[i])) {
          handles[i] = unmapped[i];
          ++listed_handles_;
        } else {
          stuck[i] = unmapped[i];
        }
      }
      if (mapped_in(stuck) > 0) window_log_.push_back(UnmappedPage{slot, page, stuck});  // the rollback tries again
      std::rethrow_exception(error);
    }
    unmapped[b] = handles[b];
    give_back(handles[b]);
    handles[b] = kNoPage;
    --listed_handles_;
  }
  const std::size_t count = mapped_in(unmapped);
  pages_unmapped_total_ += count;
  window_pages_unmapped_total_ += count;
  window_log_.push_back(UnmappedPage{slot, page, unmapped});
  std::vector<PhysicalHandle> original = handles;  // a forked page no slot maps any more goes to the pool
  for (std::size_t b = 0; b < geometry_.num_buffers; ++b) {
    if (unmapped[b] != kNoPage) original[b] = unmapped[b];
  }
  drop_if_unmapped(original, page);
}

bool PageManager::map_window_back(std::size_t slot, std::size_t page, std::size_t buffer,
                                  PhysicalHandle handle) noexcept {
  const DevicePtr address = page_address(buffer, slot, page);
  if (!prefix_.holds(handle) && !pool_.remove({handle})) return false;  // taken since: the page stays unmapped
  try {
    driver_->map(address, geometry_.page_bytes, handle);
  } catch (...) {
    give_back(handle);
    return false;
  }
  try {
    driver_->set_access(address, geometry_.page_bytes);
  } catch (const std::exception& error) {
    try {
      driver_->unmap(address, geometry_.page_bytes);
      give_back(handle);
    } catch (const std::exception& undo) {
      strays_.push_back(StrayMapping{address, geometry_.page_bytes, handle, false});
      poison("mapping page " + std::to_string(page) + " of slot " + std::to_string(slot) + " back behind its window "
             "failed (" + error.what() + ") and unmapping it failed too (" + undo.what() + ")");
    }
    return false;
  }
  undiscarded_window_pages_.erase({slot, page});
  return true;
}

std::size_t PageManager::restore_window_pages() noexcept {
  std::size_t unmapped = 0;
  for (auto entry = window_log_.rbegin(); entry != window_log_.rend(); ++entry) {
    for (std::size_t b = 0; b < geometry_.num_buffers; ++b) {
      const PhysicalHandle handle = entry->handles[b];
      if (handle == kNoPage) continue;
      std::vector<PhysicalHandle>& page = slots_[entry->slot].pages[entry->page];
      if (page[b] == kNoPage && map_window_back(entry->slot, entry->page, b, handle)) {
        page[b] = handle;
        ++listed_handles_;
      } else {
        ++unmapped;
      }
    }
  }
  window_log_.clear();
  return unmapped;
}

void PageManager::discard_window_pages() noexcept {
  for (const auto& [slot, page] : undiscarded_window_pages_) {
    for (std::size_t b = 0; b < geometry_.num_buffers; ++b) {
      if (!windowed_[b]) continue;
      try {
        driver_->discard(page_address(b, slot, page), geometry_.page_bytes);
      } catch (...) {
        // Discarding only lowers the memory in use; what failed stays resident and holds nothing.
      }
    }
  }
  undiscarded_window_pages_.clear();
}

}  // namespace vattention
