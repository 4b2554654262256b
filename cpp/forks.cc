// Forks in the PageManager: a second slot that holds the same tokens as an
// active one, sharing its full pages and holding a copy of its last page.
//
//   buffer k[0]:  | parent: ABC#__ | child: ABC%__ |
//                   A, B, C: the parent's full pages, one physical page each, mapped in both slots
//                   #: the parent's partly filled last page   %: the child's copy of it
//
// The full pages become forked pages of the prefix cache (entries without a
// key): read-only in both slots (check_write refuses a write into them),
// refcounted by their mappings as cached pages are, and back to the pool with
// their last mapping. The copy is the only write the manager ever makes: once,
// at the fork, after the device finished writing the parent; from then on the
// two slots write only their own pages.
#include <algorithm>
#include <string>

#include "errors.h"
#include "page_manager.h"
#include "page_operations.h"

namespace vattention {
namespace {

using Clock = std::chrono::steady_clock;

}  // namespace

int PageManager::fork(int parent, std::size_t lookahead) {
  return locked(nullptr, [&] { return fork_locked(parent, lookahead); });
}

std::size_t PageManager::fork_reusable_pages(std::size_t slot, std::size_t parent, std::size_t full) const {
  const auto& pages = slots_[slot].pages;
  const auto& source = slots_[parent].pages;
  std::size_t p = 0;
  while (p < pages.size() && (p < full ? pages[p] == source[p] : !is_cached(pages[p]))) ++p;
  return p;
}

void PageManager::share_full_pages(std::size_t parent, std::size_t full) {
  for (std::size_t p = 0; p < full; ++p) {
    const std::vector<PhysicalHandle>& page = slots_[parent].pages[p];
    if (!is_cached(page)) forked_log_.push_back(prefix_.insert(std::nullopt, p, page));
  }
}

int PageManager::fork_locked(int parent, std::size_t lookahead) {
  check_open();
  check_slot(parent);
  const std::size_t source = static_cast<std::size_t>(parent);
  if (!slots_[source].active) {
    throw std::invalid_argument("slot " + std::to_string(parent) + " holds no request to fork");
  }
  if (!driver_->can_alias()) {
    throw std::invalid_argument("forking needs a driver that maps one physical page at several addresses; the " +
                                driver_->name() + " driver cannot (the CPU backend's pages are XLA's memory)");
  }
  const auto& parent_pages = slots_[source].pages;
  if (!parent_pages.empty() && mapped_in(parent_pages.front()) < geometry_.num_buffers) {
    throw std::invalid_argument("slot " + std::to_string(parent) + " has pages unmapped behind its sliding window: "
                                "a fork shares a slot's pages from page 0, so fork before the window moves on");
  }
  const std::size_t length = slots_[source].length;
  const std::size_t bytes = length * geometry_.token_bytes;
  const std::size_t full = bytes / geometry_.page_bytes;
  const std::size_t tail = bytes - full * geometry_.page_bytes;  // bytes of the partly filled last page
  const std::size_t reserved = std::min(saturating_add(length, lookahead), geometry_.capacity);
  const std::size_t need = geometry_.pages_for(reserved);
  // As alloc(): the free slot that keeps the most of what the fork needs mapped, then the fewest pages.
  std::optional<std::size_t> best;
  std::size_t best_keep = 0;
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    if (slots_[s].active) continue;
    const std::size_t keep = fork_reusable_pages(s, source, full);
    if (!best || std::min(keep, need) > std::min(best_keep, need) ||
        (std::min(keep, need) == std::min(best_keep, need) && slots_[s].pages.size() < slots_[*best].pages.size())) {
      best = s;
      best_keep = keep;
    }
  }
  if (!best) {
    throw NoFreeSlot("all " + std::to_string(slots_.size()) + " slots are in use: free one before forking slot " +
                     std::to_string(parent));
  }
  const std::size_t child = *best;
  const std::size_t have = std::max(best_keep, full);  // mapped once the shared pages are
  const std::size_t extra = need > have ? (need - have) * geometry_.num_buffers : 0;
  const std::size_t owed = owed_pages();
  if (pool_.headroom() < extra + owed &&
      pool_.headroom() + freeable_pages(floors(child, 0, best_keep)) < extra + owed) {
    throw OutOfPages("forking slot " + std::to_string(parent) + " (" + std::to_string(length) + " tokens) needs " +
                     std::to_string(extra) + " pages of " + std::to_string(geometry_.page_bytes) +
                     " bytes but the budget has " +
                     std::to_string(free_headroom() + freeable_pages(floors(child, 0, best_keep))) + " left (beyond " +
                     std::to_string(owed) + " reserved for growth)");
  }
  transaction([&] {
    // The copy reads what the device wrote last into the parent; the child slot's last request may
    // still read the pages it is about to lose.
    if (tail > 0 || slots_[child].pages.size() > best_keep) wait_for_device(nullptr);
    unmap_down_to(child, best_keep);
    reclaim_for(extra + owed, child, nullptr);
    share_full_pages(source, full);
    const auto& shared = slots_[source].pages;
    const std::size_t mapped = slots_[child].pages.size();
    if (mapped < full) map_pages(child, {shared.begin() + mapped, shared.begin() + full});
    if (tail > 0 && slots_[child].pages.size() == full) {
      // The copy's page: not one this operation evicted from the cache, where that can be helped,
      // since a failure would have to give that entry back with its contents.
      std::vector<PhysicalHandle> evicted;
      for (const auto& [id, entry] : evicted_log_) {
        evicted.insert(evicted.end(), entry.handles.begin(), entry.handles.end());
      }
      const auto start = Clock::now();
      std::vector<PhysicalHandle> page = pool_.take(geometry_.num_buffers, evicted);
      map_time_ += Clock::now() - start;
      map_pages(child, {page});
    }
    map_up_to(child, need);
    for (std::size_t b = 0; tail > 0 && b < geometry_.num_buffers; ++b) {
      written_log_.push_back(slots_[child].pages[full][b]);
      driver_->copy(page_address(b, child, full), page_address(b, source, full), tail);
    }
  });
  slots_[child].active = true;
  slots_[child].length = length;
  slots_[child].reserved = reserved;
  return static_cast<int>(child);
}

}  // namespace vattention
