#include "page_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "errors.h"
#include "page_operations.h"

namespace vattention {
namespace {

using Clock = std::chrono::steady_clock;

// Slots and buffers per cache above which something is surely wrong (and the
// statistics' products could overflow).
constexpr std::size_t kMaxBuffers = std::size_t(1) << 16;

std::string pages_text(std::size_t pages, std::size_t page_bytes) {
  return std::to_string(pages) + " pages (" + std::to_string(pages * page_bytes >> 20) + " MiB)";
}

bool multiply(std::size_t a, std::size_t b, std::size_t& product) { return !__builtin_mul_overflow(a, b, &product); }

}  // namespace

void CacheGeometry::validate(std::size_t granularity) const {
  auto require = [](bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
  };
  require(num_buffers > 0, "num_buffers must be positive");
  require(num_buffers <= kMaxBuffers, "num_buffers " + std::to_string(num_buffers) + " is more than " +
                                          std::to_string(kMaxBuffers) + ": check the number of layers");
  require(max_batch > 0, "max_batch must be positive");
  require(capacity > 0, "capacity must be positive");
  require(token_bytes > 0, "token_bytes must be positive");
  require(page_bytes > 0 && page_bytes <= kMaxBufferBytes && page_bytes % granularity == 0,
          "page_bytes " + std::to_string(page_bytes) + " must be a positive multiple of the driver's granularity " +
              std::to_string(granularity) + " of at most 2**48");
  std::size_t slot = 0;
  std::size_t buffer = 0;
  require(multiply(capacity, token_bytes, slot) && multiply(max_batch, slot, buffer) && buffer <= kMaxBufferBytes,
          "a buffer of " + std::to_string(max_batch) + " slots x " + std::to_string(capacity) + " tokens x " +
              std::to_string(token_bytes) + " bytes is larger than 2**48 bytes: lower max_batch or max_len");
  require(slot_bytes() % page_bytes == 0,
          "a slot of " + std::to_string(capacity) + " tokens x " + std::to_string(token_bytes) +
              " bytes is not a whole number of " + std::to_string(page_bytes) + "-byte pages: round the capacity up");
}

PageManager::PageManager(CacheGeometry geometry, std::shared_ptr<Driver> driver, std::size_t budget_bytes)
    : geometry_(geometry),
      driver_(std::move(driver)),
      pool_(*driver_, geometry.page_bytes, geometry.page_bytes ? budget_bytes / geometry.page_bytes : 0) {
  geometry_.validate(driver_->granularity());
  slots_.resize(geometry_.max_batch);
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
  if (!poisoned_.empty()) throw ManagerPoisoned(poisoned_);
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
        // The reservation error is the one to report; release() tries this one again.
        unfreed_reservations_.push_back(base);
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
  const std::size_t keep = geometry_.pages_for(std::max(state.reserved, saturating_add(state.length, growth)));
  return state.pages.size() > keep ? state.pages.size() - keep : 0;
}

std::vector<std::size_t> PageManager::floors(std::optional<std::size_t> keep_slot, std::size_t growth,
                                             std::size_t keep_floor) const {
  std::vector<std::size_t> floors(slots_.size());
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    const std::size_t pages = slots_[s].pages.size();
    floors[s] = keep_slot == s ? std::min(keep_floor, pages) : pages - spare_pages(s, growth);
  }
  return floors;
}

std::size_t PageManager::freeable_pages(const std::vector<std::size_t>& floors,
                                        const std::vector<PrefixKey>& kept) const {
  std::size_t pages = 0;
  std::unordered_map<EntryId, std::size_t> above;  // mappings of each cache entry above the floors
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    for (std::size_t p = floors[s]; p < slots_[s].pages.size(); ++p) {
      if (auto id = prefix_.entry_of(page_handle(slots_[s].pages[p]))) {
        ++above[*id];
      } else {
        pages += mapped_in(slots_[s].pages[p]);
      }
    }
  }
  if (prefix_.size() == 0) return pages;
  const auto mappings = cache_mappings();
  for (const auto& [id, entry] : prefix_.entries()) {
    auto count = mappings.find(id);
    auto freed = above.find(id);
    if (entry.key && std::find(kept.begin(), kept.end(), *entry.key) != kept.end()) continue;
    if (count == mappings.end() || (freed != above.end() && freed->second == count->second)) {
      pages += geometry_.num_buffers;
    }
  }
  return pages;
}

std::size_t PageManager::reclaimable_pages(std::optional<std::size_t> keep_slot, std::size_t growth) const {
  return freeable_pages(floors(keep_slot, growth));
}

std::size_t PageManager::owed_pages(std::size_t slot) const {
  const Slot& state = slots_[slot];
  if (!state.active) return 0;
  const std::size_t promised = geometry_.pages_for(state.reserved);
  return promised > state.pages.size() ? (promised - state.pages.size()) * geometry_.num_buffers : 0;
}

std::size_t PageManager::owed_pages() const {
  std::size_t pages = 0;
  for (std::size_t s = 0; s < slots_.size(); ++s) pages += owed_pages(s);
  return pages;
}

std::size_t PageManager::free_headroom() const {
  const std::size_t owed = owed_pages();
  return pool_.headroom() > owed ? pool_.headroom() - owed : 0;
}

void PageManager::unmap_down_to(std::size_t slot, std::size_t target) {
  const auto start = Clock::now();
  while (slots_[slot].pages.size() > target) unmap_top(slot, true);
  unmap_time_ += Clock::now() - start;
}

void PageManager::reclaim_for(std::size_t needed, std::optional<std::size_t> keep_slot, void* stream,
                              std::size_t growth, const std::vector<PrefixKey>& kept) {
  if (pool_.headroom() >= needed) return;
  wait_for_device(stream);
  // Free slots before active ones; among each, the slots with the most spare pages first: they
  // are the least likely to be reused whole. Between them, the prefix cache's pages that no slot
  // maps: each is worth a prefill, where a free slot's private page is worth only its mapping,
  // and an active slot's spare tail is what its request is about to grow into.
  std::vector<std::size_t> order;
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    if (keep_slot != s && spare_pages(s, growth) > 0) order.push_back(s);
  }
  std::stable_sort(order.begin(), order.end(), [this, growth](std::size_t a, std::size_t b) {
    if (slots_[a].active != slots_[b].active) return !slots_[a].active;
    return spare_pages(a, growth) > spare_pages(b, growth);
  });
  bool evicted = false;
  for (std::size_t s : order) {
    if (slots_[s].active && !evicted) {
      evict_unmapped(needed, kept);
      evicted = true;
      if (pool_.headroom() >= needed) return;
    }
    // A cached page adds nothing to the headroom when unmapped: count only the private ones.
    while (pool_.headroom() < needed && spare_pages(s, growth) > 0) unmap_down_to(s, slots_[s].pages.size() - 1);
    if (pool_.headroom() >= needed) return;
  }
  if (!evicted) evict_unmapped(needed, kept);
}

void PageManager::set_host_wait(std::function<void()> wait) {
  std::lock_guard<std::mutex> lock(mutex_);
  host_wait_ = std::move(wait);
}

void PageManager::wait_for_device(void* stream) {
  if (!waited_) throw WaitOutsideTheLock{};
  if (synchronized_) return;
  const auto start = Clock::now();
  driver_->synchronize(stream);
  synchronized_ = true;
  unmap_time_ += Clock::now() - start;
}

int PageManager::alloc(std::size_t prompt_len, std::size_t lookahead) {
  return locked(nullptr, [&] { return alloc_locked(prompt_len, lookahead, {}); }).slot;
}

SharedAlloc PageManager::alloc_shared(std::size_t prompt_len, std::size_t lookahead,
                                      const std::vector<PrefixKey>& keys) {
  return locked(nullptr, [&] { return alloc_locked(prompt_len, lookahead, keys); });
}

SharedAlloc PageManager::alloc_locked(std::size_t prompt_len, std::size_t lookahead,
                                      const std::vector<PrefixKey>& keys) {
  check_open();
  if (prompt_len > geometry_.capacity) {
    throw std::invalid_argument("a prompt of " + std::to_string(prompt_len) + " tokens does not fit a slot of " +
                                std::to_string(geometry_.capacity) + " tokens");
  }
  const std::size_t tokens = tokens_per_page();
  if (keys.size() > 0 && tokens > 0 && keys.size() > prompt_len / tokens) {
    throw std::invalid_argument(std::to_string(keys.size()) + " prefix keys stand for " +
                                std::to_string(keys.size() * tokens) + " tokens, more than the prompt's " +
                                std::to_string(prompt_len) + ": pass the keys of the prompt's full pages only");
  }
  const std::size_t shared = tokens == 0 ? 0 : cached_run(keys);
  const std::vector<PrefixKey> run(keys.begin(), keys.begin() + shared);
  const std::size_t reserved = std::min(saturating_add(prompt_len, lookahead), geometry_.capacity);
  const std::size_t need = geometry_.pages_for(reserved);
  // The free slot that keeps the most of what the request needs mapped; among equals, the one
  // with the fewest pages, keeping bigger slots for bigger requests.
  std::optional<std::size_t> best;
  std::size_t best_keep = 0;
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    if (slots_[s].active) continue;
    const std::size_t keep = reusable_pages(s, keys, shared);
    if (!best || std::min(keep, need) > std::min(best_keep, need) ||
        (std::min(keep, need) == std::min(best_keep, need) && slots_[s].pages.size() < slots_[*best].pages.size())) {
      best = s;
      best_keep = keep;
    }
  }
  if (!best) throw NoFreeSlot("all " + std::to_string(slots_.size()) + " slots are in use: free one first");
  const std::size_t have = std::max(best_keep, shared);  // mapped once the shared pages are
  const std::size_t extra = need > have ? (need - have) * geometry_.num_buffers : 0;
  // The pool keeps what active slots' reservations are owed.
  const std::size_t owed = owed_pages();
  if (pool_.headroom() < extra + owed &&
      pool_.headroom() + freeable_pages(floors(best, 0, best_keep), run) < extra + owed) {
    const std::size_t freeable = freeable_pages(floors(best, 0, best_keep), run);
    throw OutOfPages("a prompt of " + std::to_string(prompt_len) + " tokens needs " +
                     pages_text(extra, geometry_.page_bytes) + " but the budget has " +
                     pages_text(free_headroom() + freeable, geometry_.page_bytes) + " left (beyond " +
                     pages_text(owed, geometry_.page_bytes) + " reserved for growth)");
  }
  transaction([&] {
    if (slots_[*best].pages.size() > best_keep) {
      // Pages the request may not keep: cached pages it does not share (it would write them), and
      // what lies above them. The slot's last request may still be reading them.
      wait_for_device(nullptr);
      unmap_down_to(*best, best_keep);
    }
    reclaim_for(extra + owed, best, nullptr, 0, run);
    map_cached(*best, keys, shared);
    map_up_to(*best, need);
  });
  slots_[*best].active = true;
  slots_[*best].length = prompt_len;
  slots_[*best].reserved = reserved;
  prefix_.touch(run);
  return SharedAlloc{static_cast<int>(*best), shared};
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

void PageManager::rewind(int slot, std::size_t length) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  check_slot(slot);
  Slot& state = slots_[slot];
  const std::string name = "slot " + std::to_string(slot);
  if (!state.active) throw std::invalid_argument("rewind: " + name + " is not allocated");
  if (length > state.length) {
    throw std::invalid_argument("rewind: " + name + " holds " + std::to_string(state.length) +
                                " tokens; a rewind only lowers the length, not to " + std::to_string(length));
  }
  const std::size_t writable = writable_from_locked(static_cast<std::size_t>(slot));
  if (length < writable) {
    throw std::invalid_argument("rewind: " + name + " cannot go back to " + std::to_string(length) +
                                " tokens: tokens 0.." + std::to_string(writable - 1) +
                                " lie in shared pages, which the next write would overwrite");
  }
  if (window_ != 0) {
    // The page of the first key the next step's first query sees: only leading pages are ever
    // unmapped behind a window, so it is enough that this one is mapped in every buffer.
    const std::size_t first_read = length >= window_ ? length - window_ + 1 : 0;
    const std::size_t page = first_read * geometry_.token_bytes / geometry_.page_bytes;
    const bool unmapped = page < state.pages.size() &&
                          std::find(state.pages[page].begin(), state.pages[page].end(), kNoPage) != state.pages[page].end();
    if (unmapped) {
      throw std::invalid_argument("rewind: " + name + " cannot go back to " + std::to_string(length) +
                                  " tokens: the window of its next query reaches pages already unmapped "
                                  "behind the window");
    }
  }
  state.length = length;
}

void PageManager::grow(std::size_t tokens, void* stream, bool in_program) {
  locked(stream, [&] {
    check_open();
    const std::vector<std::size_t> counts = every_active(tokens);
    transaction([&] {
      unmap_behind_windows(stream);
      map_for_growth(counts, stream);
    });
    add_lengths(counts);
    ++grow_calls_;
    if (in_program) discard_pending();
  }, in_program);
}

void PageManager::grow_slots(const std::vector<std::size_t>& counts) {
  locked(nullptr, [&] {
    check_open();
    if (counts.size() != slots_.size()) {
      throw std::invalid_argument("grow_slots takes one count per slot (" + std::to_string(slots_.size()) +
                                  "), got " + std::to_string(counts.size()));
    }
    for (std::size_t s = 0; s < counts.size(); ++s) {
      if (counts[s] > 0 && !slots_[s].active) {
        throw std::invalid_argument("grow_slots: slot " + std::to_string(s) + " is not allocated");
      }
    }
    transaction([&] {
      unmap_behind_windows(nullptr);
      map_for_growth(counts, nullptr);
    });
    add_lengths(counts);
    ++grow_calls_;
  });
}

std::vector<std::size_t> PageManager::every_active(std::size_t tokens) const {
  std::vector<std::size_t> counts(slots_.size(), 0);
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    if (slots_[s].active) counts[s] = tokens;
  }
  return counts;
}

void PageManager::add_lengths(const std::vector<std::size_t>& counts) {
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    Slot& slot = slots_[s];
    if (slot.active) slot.length = std::min(saturating_add(slot.length, counts[s]), geometry_.capacity);
  }
}

std::size_t PageManager::prefetch(std::size_t tokens, std::size_t max_pages) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  std::size_t extra = 0;
  std::size_t within = 0;
  const std::vector<std::size_t> targets = growth_targets(every_active(tokens), extra, within);
  const std::size_t buffers = geometry_.num_buffers;
  return transaction([&] {
    std::size_t mapped = 0;
    while (mapped < max_pages) {
      // A slot may take a page its reservation is owed; any other page must come from the free headroom.
      const bool free_page = free_headroom() >= buffers;
      std::optional<std::size_t> next;
      std::size_t least_slack = 0;  // bytes mapped beyond the slot's tokens, in each buffer
      for (std::size_t s = 0; s < slots_.size(); ++s) {
        if (!slots_[s].active || slots_[s].pages.size() >= targets[s]) continue;
        if (!free_page && owed_pages(s) == 0) continue;
        const std::size_t slack = slots_[s].pages.size() * geometry_.page_bytes - slots_[s].length * geometry_.token_bytes;
        if (!next || slack < least_slack) {
          next = s;
          least_slack = slack;
        }
      }
      if (!next) break;
      map_up_to(*next, slots_[*next].pages.size() + 1);
      mapped += buffers;
    }
    return mapped;
  });
}

std::vector<std::size_t> PageManager::growth_targets(const std::vector<std::size_t>& counts, std::size_t& extra,
                                                     std::size_t& owed) const {
  std::vector<std::size_t> targets(slots_.size(), 0);
  extra = 0;
  owed = 0;
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    if (!slots_[s].active) continue;
    targets[s] = std::max(geometry_.pages_for(saturating_add(slots_[s].length, counts[s])), slots_[s].pages.size());
    const std::size_t pages = (targets[s] - slots_[s].pages.size()) * geometry_.num_buffers;
    extra += pages;
    owed += std::min(pages, owed_pages(s));
  }
  return targets;
}

void PageManager::map_for_growth(const std::vector<std::size_t>& counts, void* stream) {
  std::size_t extra = 0;
  std::size_t within = 0;
  std::vector<std::size_t> targets = growth_targets(counts, extra, within);
  // Pages past a slot's length plus the largest count stay spare for reclaiming.
  const std::size_t tokens = counts.empty() ? 0 : *std::max_element(counts.begin(), counts.end());
  if (extra == 0) return;
  // What the growing slots' reservations hold is theirs; the pool keeps the other slots' share.
  const std::size_t needed = extra + owed_pages() - within;
  // The headroom alone mostly suffices: only then is the costlier count of what reclaiming frees skipped.
  if (pool_.headroom() < needed && pool_.headroom() + reclaimable_pages(std::nullopt, tokens) < needed) {
    throw OutOfPages("growing the active slots by up to " + std::to_string(tokens) + " tokens needs " +
                     pages_text(extra - within, geometry_.page_bytes) + " more than the budget holds: call " +
                     "reserve_growth() before the decode loop, or free slots");
  }
  reclaim_for(needed, std::nullopt, stream, tokens);
  targets = growth_targets(counts, extra, within);  // spare tails may have gone; the pages missing did not change
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    if (slots_[s].active && targets[s] > slots_[s].pages.size()) map_up_to(s, targets[s]);
  }
}

void PageManager::reserve_growth(std::size_t tokens) {
  locked(nullptr, [&] { reserve_growth_locked(tokens); });
}

void PageManager::reserve_growth_locked(std::size_t tokens) {
  check_open();
  std::vector<std::size_t> reserved(slots_.size(), 0);
  std::size_t owed = 0;
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    const Slot& slot = slots_[s];
    if (!slot.active) continue;
    reserved[s] = std::max(slot.reserved, std::min(saturating_add(slot.length, tokens), geometry_.capacity));
    const std::size_t promised = geometry_.pages_for(reserved[s]);
    if (promised > slot.pages.size()) owed += (promised - slot.pages.size()) * geometry_.num_buffers;
  }
  if (pool_.headroom() + reclaimable_pages(std::nullopt, tokens) < owed) {
    throw OutOfPages("growing every active slot by " + std::to_string(tokens) + " tokens needs " +
                     pages_text(owed, geometry_.page_bytes) + " reserved but the budget has " +
                     pages_text(pool_.headroom() + reclaimable_pages(std::nullopt, tokens), geometry_.page_bytes) +
                     " for it: free slots or lower max_new_tokens");
  }
  transaction([&] {
    reclaim_for(owed, std::nullopt, nullptr, tokens);  // spare tails lie beyond the growth: `owed` holds
    const auto start = Clock::now();
    pool_.fill(owed);
    map_time_ += Clock::now() - start;
  });
  for (std::size_t s = 0; s < slots_.size(); ++s) {
    if (slots_[s].active) slots_[s].reserved = reserved[s];
  }
}

std::size_t PageManager::reclaim() {
  return locked(nullptr, [&]() -> std::size_t {
    check_open();
    const bool deferred = std::any_of(slots_.begin(), slots_.end(),
                                      [](const Slot& slot) { return !slot.active && !slot.pages.empty(); });
    if (!deferred) return 0;
    const std::uint64_t before = pages_unmapped_total_;
    transaction([&] {
      wait_for_device(nullptr);
      for (std::size_t s = 0; s < slots_.size(); ++s) {
        if (!slots_[s].active) unmap_down_to(s, 0);
      }
    });
    return static_cast<std::size_t>(pages_unmapped_total_ - before);
  });
}

std::size_t PageManager::trim() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  return pool_.trim(std::min(owed_pages(), pool_.pooled_pages()));
}

std::size_t PageManager::discard_unmapped(const std::vector<DevicePtr>& live_bases) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (released_ || live_bases != bases_) return 0;
  const std::size_t windowed = static_cast<std::size_t>(std::count(windowed_.begin(), windowed_.end(), true));
  const std::size_t pages = undiscarded_.size() * geometry_.num_buffers + undiscarded_window_pages_.size() * windowed;
  discard_pending();
  return pages;
}

void PageManager::discard_pending() noexcept {
  // Runs of adjacent pages go in one call, so that OS pages straddling two of our pages go too.
  auto page = undiscarded_.begin();
  while (page != undiscarded_.end()) {
    const auto [slot, first] = *page;
    std::size_t count = 0;
    while (page != undiscarded_.end() && page->first == slot && page->second == first + count) {
      ++page;
      ++count;
    }
    for (std::size_t b = 0; b < geometry_.num_buffers; ++b) {
      try {
        driver_->discard(page_address(b, slot, first), count * geometry_.page_bytes);
      } catch (...) {
        // Discarding only lowers the memory in use; what failed stays resident and holds nothing.
      }
    }
  }
  undiscarded_.clear();
  discard_window_pages();
}

}  // namespace vattention
