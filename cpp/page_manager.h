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
// Every slot has the same number of pages in every buffer, so a slot's
// mapped capacity is one number; only a sliding window (window_pages.cc) unmaps
// a slot's leading pages in some buffers, behind the window. A freed slot keeps its pages for the next
// request placed there (deferred reclamation) until another slot needs them.
// All methods are thread-safe. The safety promise: nothing done through this
// API reaches an unmapped page, and any error leaves the state as it was; after
// a driver failure the manager's view equals the driver's, page for page. If
// undoing a failed operation fails too, the manager is poisoned (see
// ManagerPoisoned in errors.h) rather than carry on with a wrong view.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <unordered_map>
#include <string>
#include <utility>
#include <vector>

#include "driver.h"
#include "page_pool.h"
#include "prefix_cache.h"

namespace vattention {

struct CacheGeometry {
  std::size_t num_buffers = 0;
  std::size_t max_batch = 0;
  std::size_t capacity = 0;     // tokens per slot
  std::size_t token_bytes = 0;  // one token of one buffer: kv_heads * head_dim * itemsize
  std::size_t page_bytes = 0;

  // validate() makes sure that these products cannot overflow.
  std::size_t slot_bytes() const { return capacity * token_bytes; }
  std::size_t buffer_bytes() const { return max_batch * slot_bytes(); }
  // Pages of one buffer that hold the first `tokens` tokens of a slot (at most the capacity).
  std::size_t pages_for(std::size_t tokens) const {
    return (std::min(tokens, capacity) * token_bytes + page_bytes - 1) / page_bytes;
  }
  // Throws std::invalid_argument naming the first inconsistent field, or the
  // size that is too large (no buffer may exceed kMaxBufferBytes).
  void validate(std::size_t granularity) const;
};

// The handle of a page that is not mapped: a windowed buffer's page behind every window
// (window_pages.cc). No driver hands it out (the CUDA driver's handles are never 0, ours count from 1).
constexpr PhysicalHandle kNoPage = 0;

// The largest buffer a cache may have: 2**48 bytes (256 TiB), beyond any
// device's virtual address space, and small enough that no size derived from
// it overflows, in C++ or in XLA's shapes.
constexpr std::size_t kMaxBufferBytes = std::size_t(1) << 48;

// `a + b`, or SIZE_MAX where that overflows: token counts are clamped to the
// capacity afterwards, so a sum past every capacity is as good as the exact one.
inline std::size_t saturating_add(std::size_t a, std::size_t b) { return a > SIZE_MAX - b ? SIZE_MAX : a + b; }

struct ManagerStats {
  std::size_t page_bytes = 0;
  std::size_t budget_pages = 0;
  std::size_t created_pages = 0;   // alive: mapped or pooled
  std::size_t pooled_pages = 0;    // created, not mapped
  std::size_t mapped_pages = 0;    // over all buffers and slots
  std::size_t deferred_pages = 0;  // mapped to free slots, reclaimable
  std::size_t reserved_pages = 0;  // pooled pages earmarked for active slots' reserved growth
  std::size_t active_slots = 0;
  std::size_t used_tokens = 0;     // sum of the active slots' lengths
  std::size_t used_bytes = 0;      // bytes those tokens occupy over all buffers
  std::size_t waste_bytes = 0;     // mapped to active slots but holding no token
  std::uint64_t pages_mapped_total = 0;
  std::uint64_t pages_unmapped_total = 0;
  std::uint64_t grow_calls = 0;
  // Prefix sharing (prefix_pages.cc). Pages count one per buffer, as mapped_pages does.
  std::size_t cached_pages = 0;     // held by the prefix cache under a key, mapped or not
  std::size_t forked_pages = 0;     // full pages that forks share, without a key (prefix_cache.h)
  std::size_t shared_pages = 0;     // physical pages mapped in more than one slot
  std::size_t bytes_saved = 0;      // every mapping of a physical page beyond its first, in bytes
  std::uint64_t pages_evicted_total = 0;
  // Sliding windows (window_pages.cc): pages of windowed buffers unmapped behind the windows, now
  // (over all buffers, as mapped_pages) and ever.
  std::size_t window_unmapped_pages = 0;
  std::uint64_t window_pages_unmapped_total = 0;
  double map_seconds = 0;    // time spent creating and mapping pages
  double unmap_seconds = 0;  // time spent waiting for the device and unmapping
  bool poisoned = false;
};

// A page the driver maps but no slot lists: left by an undo that failed (the
// manager is then poisoned); release() unmaps it.
struct StrayMapping {
  DevicePtr address = 0;
  std::size_t bytes = 0;
  PhysicalHandle handle = 0;
  bool accessible = false;
};

// A page of the prefix cache, as view() reports it.
struct CachedPage {
  std::optional<PrefixKey> key;         // none for a forked page
  std::size_t page = 0;                 // its page index in every slot that maps it
  std::vector<PhysicalHandle> handles;  // one per buffer
  std::size_t mappings = 0;             // slots that map it: its reference count (+1, the cache's, if keyed)
  std::uint64_t last_used = 0;
};

// Everything the manager believes the driver holds, for tests that compare it
// with the driver's own table. A handle of the prefix cache may be mapped at
// several addresses; any other handle is mapped once, pooled, or stray.
struct ManagerView {
  // slots[s][p][b]: the physical page behind page p of slot s in buffer b (kNoPage: unmapped
  // behind a sliding window).
  std::vector<std::vector<std::vector<PhysicalHandle>>> slots;
  std::vector<DevicePtr> bases;
  std::vector<PhysicalHandle> pooled;
  std::vector<StrayMapping> strays;
  std::vector<CachedPage> cache;
  std::string poisoned;  // the first failure, empty if none
};

// What alloc_shared placed: the slot, and how many of its first pages map pages of the prefix cache.
struct SharedAlloc {
  int slot = 0;
  std::size_t shared_pages = 0;
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
  // Prefix sharing (prefix_pages.cc). A page of the prefix cache is one page index in every buffer,
  // registered by publish() under a key that stands for all the tokens up to its end. Pages of the
  // cache are read-only: they are mapped in several slots at once, so no slot writes them.
  //
  // Tokens that one page holds in a buffer; 0 where prefix sharing is off: pages that split a
  // token, or a driver that cannot map one page at two addresses (the CPU backend's).
  std::size_t tokens_per_page() const;
  // alloc() that first maps the longest run of cached pages whose keys are `keys[0..k)` at pages
  // 0..k-1 of the slot (shared, read-only), then private pages up to `prompt_len + lookahead`.
  // `keys.size()` pages must lie within the prompt. Prefers a free slot that already maps the most
  // of the wanted pages (a slot's cached page that the request does not share is unmapped there,
  // never written). The request must write only from token k * tokens_per_page() (check_write).
  SharedAlloc alloc_shared(std::size_t prompt_len, std::size_t lookahead, const std::vector<PrefixKey>& keys);
  // Registers pages 0..keys.size()-1 of the active `slot` in the prefix cache under `keys`: they
  // must be full (below the slot's length). A page already cached is kept as it is, as is a page
  // whose key another page holds already (no duplicates). No driver call. Returns the pages
  // registered (entries: one page index in every buffer).
  std::size_t publish(int slot, const std::vector<PrefixKey>& keys);
  // The first token of `slot` that may be written: the end of its last cached or forked page.
  std::size_t writable_from(int slot) const;
  // Throws std::invalid_argument if writing `slot` from token `start` would touch a cached or forked page.
  void check_write(int slot, std::size_t start) const;
  // Forks (forks.cc). Places a copy of the request in the active slot `parent` in a free slot and
  // returns it: the new slot's length is the parent's, its full pages are the parent's own physical
  // pages (read-only in both slots from now on: forked pages of the prefix cache), and its partly
  // filled last page is a private copy of the parent's, made once, here, after the device finished
  // writing it. The pages of `lookahead` more tokens are mapped too, as alloc() maps them. Prefers a
  // free slot that already maps the most of the parent's pages. Throws std::invalid_argument for a
  // free parent or a driver that cannot map one page at two addresses, NoFreeSlot, OutOfPages.
  int fork(int parent, std::size_t lookahead = 0);
  // Releases to the pool every page of the prefix cache that no slot maps; returns the pages.
  std::size_t evict();
  // How many of `keys` the prefix cache holds at pages 0.., the longest run: what alloc_shared() would
  // share now. No driver call, nothing changes (the entries are not marked as used).
  std::size_t cached_pages(const std::vector<PrefixKey>& keys) const;

  // Ends the request in `slot`; its pages stay mapped for the next one.
  void free(int slot);
  // Lowers the active `slot`'s length to `length` tokens (at most its length): the tokens past it are
  // dropped, e.g. a step's rejected speculative tokens. No driver call: the pages stay mapped for the
  // next growth, which writes over what was dropped. Refused (std::invalid_argument, nothing changed)
  // where the next write would start inside a cached or forked page (below writable_from), or where
  // the next step's queries would read a page already unmapped behind a sliding window.
  void rewind(int slot, std::size_t length);
  // Adds `tokens` to every active slot (up to the capacity) and maps the
  // pages that takes. `stream` is XLA's when called from the mapping op,
  // which passes `in_program` after checking that its operands are the
  // buffers: only then may unmapped pages be discarded (see discard_unmapped),
  // and there the host's wait (set_host_wait) is not needed: XLA runs the op
  // after the program's earlier work.
  // A growth within every active slot's reservation (alloc's lookahead,
  // reserve_growth) never runs out of pages: only a driver failure fails it.
  void grow(std::size_t tokens, void* stream, bool in_program = false);
  // Adds `counts[s]` tokens to slot `s` (one count per slot, zero for a free
  // slot) and maps the pages that takes, all or nothing: the host's growth
  // for a step whose slots gain different counts (a prefill chunk, a decode).
  void grow_slots(const std::vector<std::size_t>& counts);
  // Maps now, without growing, pages that growing every active slot by
  // `tokens` will need: the host maps ahead while the device computes. One
  // slot's next page (in every buffer) at a time, the slot closest to the end
  // of its pages first, until `max_pages` or more are mapped. Best effort: it
  // stops when the budget has no free page (it never waits for the device to
  // reclaim free slots' pages, nor takes pages reserved for other slots).
  // Returns the pages mapped.
  std::size_t prefetch(std::size_t tokens, std::size_t max_pages = SIZE_MAX);
  // Makes sure that growing every active slot by `tokens` cannot run out of
  // pages: creates the missing physical pages now (eager allocation) and
  // earmarks them, so that no alloc, prefetch or later reservation takes them.
  void reserve_growth(std::size_t tokens);
  // Unmaps the pages of free slots once the device is done with them.
  std::size_t reclaim();
  // Releases pooled pages to the device, except those earmarked for reserved
  // growth; returns how many. Not undone on failure (a released page cannot
  // come back): it tries every page, keeps pooled those the driver failed to
  // release, and then throws DriverError.
  std::size_t trim();
  // Unmaps and releases everything and frees the reservations, all it can,
  // also when poisoned. Throws DriverError if something could not be freed;
  // calling it again retries what is left. Nothing is left after a success.
  void release();

  // Discards (returns to the OS, on the CPU backend) the pages unmapped since
  // the last discard, if `live_bases` — the addresses of the cache arrays the
  // caller has checked to be alive — are the buffers. Why the proof: adopted
  // buffers belong to XLA, and once the cache's arrays are copied and dropped
  // their memory may hold someone else's data, which a discard would zero.
  // Returns the pages discarded.
  std::size_t discard_unmapped(const std::vector<DevicePtr>& live_bases);

  // Sliding windows (window_pages.cc). Sets the window of the buffers marked in `windowed` (one
  // flag per buffer): a step whose slot is `length` tokens long has its queries at `length` and
  // later, and each sees only the `window` positions up to its own, so the keys below
  // `length - window + 1` are never read again. Each growth (grow, grow_slots) first unmaps, in
  // the windowed buffers, every page of an active slot that lies wholly below that, once the
  // device is done with it; the slot keeps its reserved range, and the other buffers keep their
  // pages. Only while no page is mapped (before the first alloc); window 0 turns it off.
  void set_window(std::size_t window, const std::vector<bool>& windowed);
  // How a call from the host waits for the device's work before it unmaps a page, where the
  // driver's synchronize() cannot: the CPU backend, whose steps XLA runs asynchronously, and
  // whose drivers know nothing of them. Called without the lock, after synchronize(); an empty
  // function (the default) waits for nothing more.
  void set_host_wait(std::function<void()> wait);
  std::size_t window() const;
  // Pages (over all buffers) that the next growth will unmap behind the windows.
  std::size_t window_pages_due() const;

  ManagerStats stats() const;
  // The counters of stats() that cost nothing to read, for a caller that reads them every step:
  // page_bytes, budget_pages, created_pages, pooled_pages, mapped_pages, the running totals,
  // the seconds and poisoned (stats() also walks the slots and the prefix cache). Its other
  // fields stay 0.
  ManagerStats counters() const;
  std::vector<std::size_t> lengths() const;
  std::vector<bool> active() const;
  std::vector<std::size_t> mapped_pages() const;
  // Works on a poisoned or released manager too.
  ManagerView view() const;

 private:
  struct Slot {
    bool active = false;
    std::size_t length = 0;
    // Tokens the slot was promised (its prompt and lookahead, or a reserved growth): the pages
    // that hold them stay, or are earmarked in the pool; pages beyond are spare and can be
    // reclaimed under memory pressure.
    std::size_t reserved = 0;
    // pages[p][b]: the physical page behind page p of this slot in buffer b (kNoPage: unmapped
    // behind the window, in a windowed buffer; only leading pages are).
    std::vector<std::vector<PhysicalHandle>> pages;
  };
  // A page (in every buffer) unmapped by the current operation, to map back if it fails.
  struct UnmappedPage {
    std::size_t slot;
    std::size_t page;
    std::vector<PhysicalHandle> handles;
  };
  // What an operation may change, to restore if it fails.
  struct Checkpoint {
    std::vector<Slot> slots;  // without their pages: only the counts matter
    std::vector<std::size_t> page_counts;
    std::uint64_t pages_mapped_total;
    std::uint64_t pages_unmapped_total;
    std::uint64_t pages_evicted_total;
    std::uint64_t window_pages_unmapped_total;
  };

  void check_open() const;
  void check_slot(int slot) const;
  DevicePtr page_address(std::size_t buffer, std::size_t slot, std::size_t page) const;
  // Pages of `slot` that can be taken under memory pressure, in each buffer: all of a free slot's;
  // an active slot's beyond what its reserved tokens, and `growth` tokens past its length, need.
  std::size_t spare_pages(std::size_t slot, std::size_t growth) const;
  // Pages reclaim_for() can add to the pool's headroom while every slot keeps its first `floors[s]`
  // pages: the private pages above the floors, and the cache's pages that are mapped only above them.
  // The entries of `kept` (a prefix a request is about to map) count as staying.
  std::size_t freeable_pages(const std::vector<std::size_t>& floors, const std::vector<PrefixKey>& kept = {}) const;
  // The floors of reclaim_for(): a slot keeps all but its spare pages, and `keep_slot` keeps `keep_floor`.
  std::vector<std::size_t> floors(std::optional<std::size_t> keep_slot, std::size_t growth,
                                  std::size_t keep_floor = SIZE_MAX) const;
  // freeable_pages() with every slot but `keep_slot` giving up its spare pages.
  std::size_t reclaimable_pages(std::optional<std::size_t> keep_slot, std::size_t growth = 0) const;
  // Pages (over all buffers) that `slot`'s reservation still needs mapped, and their sum over all
  // slots: earmarked in the pool, so that only the reserving slots' growth takes them.
  std::size_t owed_pages(std::size_t slot) const;
  std::size_t owed_pages() const;
  // The pool's headroom that new work may take: what is not owed to reservations.
  std::size_t free_headroom() const;
  // Unmaps spare pages until the pool's headroom reaches `needed`, in this order: (1) free slots'
  // pages (those holding the most first; a cached page only loses that mapping), (2) pages of the
  // prefix cache that no slot maps, least recently used first (evict_unmapped), (3) active slots'
  // spare tails. Waits for the device before it unmaps.
  // The entries of `kept` (a prefix about to be mapped) are not evicted.
  void reclaim_for(std::size_t needed, std::optional<std::size_t> keep_slot, void* stream,
                   std::size_t growth = 0, const std::vector<PrefixKey>& kept = {});
  // Pages each slot needs to hold `tokens` more (its current count if inactive or already
  // covered); `extra` gets the pages to map over all buffers, `owed` the part of them that
  // the slots' reservations already hold in the pool.
  std::vector<std::size_t> growth_targets(const std::vector<std::size_t>& counts, std::size_t& extra,
                                         std::size_t& owed) const;
  // `tokens` for every active slot, zero for the others.
  std::vector<std::size_t> every_active(std::size_t tokens) const;
  // Maps pages for every active slot to hold `tokens` more.
  void map_for_growth(const std::vector<std::size_t>& counts, void* stream);
  SharedAlloc alloc_locked(std::size_t prompt_len, std::size_t lookahead, const std::vector<PrefixKey>& keys);
  // Whether the page (its handles in every buffer) belongs to the prefix cache.
  bool is_cached(const std::vector<PhysicalHandle>& page) const { return prefix_.holds(page_handle(page)); }
  // Where a handle goes once a mapping of it is gone: a cached one stays with the cache, any other to the pool.
  void give_back(PhysicalHandle handle);
  // How many slots map each entry of the prefix cache.
  std::unordered_map<EntryId, std::size_t> cache_mappings() const;
  // How many slots and strays map the page `handles` (its handle in every buffer) at `page`.
  std::size_t mappings_of(const std::vector<PhysicalHandle>& handles, std::size_t page) const;
  // Where the last mapping of a page has gone: a forked page goes back to the pool (and to
  // evicted_log_, so that a failed operation can take it back); anything else stays where it is.
  void drop_if_unmapped(const std::vector<PhysicalHandle>& handles, std::size_t page);
  // Evicts entries that nothing maps but `kept`, least recently used first, until the headroom
  // reaches `needed`.
  void evict_unmapped(std::size_t needed, const std::vector<PrefixKey>& kept = {});
  // Cached pages `keys` matches at pages 0.., the longest run.
  std::size_t cached_run(const std::vector<PrefixKey>& keys) const;
  // Leading pages of `slot` a request sharing `keys[0..shared)` may keep: cached pages of those keys
  // below `shared`, private pages from there on.
  std::size_t reusable_pages(std::size_t slot, const std::vector<PrefixKey>& keys, std::size_t shared) const;
  // Maps the cached pages of `keys[pages.size()..last)` as the next pages of `slot`; all or nothing.
  void map_cached(std::size_t slot, const std::vector<PrefixKey>& keys, std::size_t last);
  void reserve_growth_locked(std::size_t tokens);
  int fork_locked(int parent, std::size_t lookahead);
  // Leading pages of the free `slot` that a fork of `parent` with `full` full pages may keep: the
  // parent's own pages below `full`, private pages from there on.
  std::size_t fork_reusable_pages(std::size_t slot, std::size_t parent, std::size_t full) const;
  // Makes pages 0..full-1 of `parent` forked pages of the prefix cache, where they are private (no
  // driver call; forked_log_ lists them for rollback).
  void share_full_pages(std::size_t parent, std::size_t full);
  // Runs `operation` under the lock. Where it must wait for the device (wait_for_device), it
  // is run again after a wait without the lock: see page_operations.h.
  // `in_program`: called by the mapping op, inside the program whose earlier work it follows.
  template <class Operation>
  auto locked(void* stream, Operation&& operation, bool in_program = false) -> decltype(operation());
  // Waits for the device's work (`stream`'s, or all of it if null) before pages are unmapped.
  void wait_for_device(void* stream);
  void add_lengths(const std::vector<std::size_t>& counts);
  // counters() under the lock.
  ManagerStats counters_locked() const;
  // writable_from() under the lock.
  std::size_t writable_from_locked(std::size_t slot) const;
  void discard_pending() noexcept;

  // Sliding windows (window_pages.cc).
  //
  // A page's handle in its first buffer that maps it (kNoPage if none does): what names the page,
  // e.g. in the prefix cache, where some of its buffers are unmapped behind a window.
  static PhysicalHandle page_handle(const std::vector<PhysicalHandle>& page);
  // How many buffers map the page.
  static std::size_t mapped_in(const std::vector<PhysicalHandle>& page);
  // Leading pages of `slot` unmapped in every windowed buffer.
  std::size_t window_holes(std::size_t slot) const;
  // Leading pages of the active `slot` that no query of its next step or later reads in a windowed buffer.
  std::size_t dead_pages(std::size_t slot) const;
  // Unmaps, in the windowed buffers, every active slot's pages between its holes and its dead pages,
  // after waiting for the device; logged for rollback.
  void unmap_behind_windows(void* stream);
  // Unmaps page `page` of `slot` in the windowed buffers; all or nothing, except that a buffer the
  // undo cannot map back stays unmapped (it lies behind the window: the view stays exact).
  void unmap_window_page(std::size_t slot, std::size_t page);
  // Maps `handle` back at page `page` of `slot` in `buffer`; false (and the page stays unmapped,
  // its handle given back) where that fails; poisons where it can neither map nor unmap it.
  bool map_window_back(std::size_t slot, std::size_t page, std::size_t buffer, PhysicalHandle handle) noexcept;
  // Rollback: maps back what unmap_behind_windows unmapped in the operation; returns the buffers'
  // pages that stay unmapped.
  std::size_t restore_window_pages() noexcept;
  // Discards (CPU backend) the windowed buffers' pages unmapped since the last discard.
  void discard_window_pages() noexcept;

  // Page mapping, unmapping and undoing them (page_transactions.cc; transaction() is a template
  // in page_operations.h).
  //
  // Runs `body` as one operation: if it throws, rollback() restores what it
  // changed before the exception goes on, and the exception is the original one.
  template <class Body>
  auto transaction(Body&& body) -> decltype(body());
  Checkpoint checkpoint() const;
  // Commits the operation: the pages it unmapped may be discarded from now on.
  void commit();
  // Undoes everything since `before`; never throws. Where an undo fails but
  // the view can stay exact (a page that failed to unmap stays listed), it
  // stays; where it cannot, the manager is poisoned.
  void rollback(const Checkpoint& before, const std::string& failure) noexcept;
  // Records the first failure that left the view unsure; `what` says what failed.
  void poison(const std::string& what) noexcept;
  // Maps `pages` (pages[i][b]: the handle of buffer b) as the next pages of `slot`, with one
  // set_access per buffer over the run, and lists them. All or nothing: if a driver call fails,
  // what it mapped is unmapped and every handle goes back where it belongs (give_back), then the
  // error goes on; a page that fails to unmap stays mapped as a stray and poisons the manager.
  // Every run of pages the manager maps goes through here.
  void map_pages(std::size_t slot, const std::vector<std::vector<PhysicalHandle>>& pages);
  // Maps pages of `slot` from the pool until it has `target`; all or nothing (or poisoned).
  void map_up_to(std::size_t slot, std::size_t target);
  // Unmaps the top page of `slot` in every buffer and pools its handles; all
  // or nothing: if one buffer fails, the others are mapped back (or poisoned).
  void unmap_top(std::size_t slot, bool log);
  // Unmaps pages of `slot` above `target`, returning them to the pool.
  void unmap_down_to(std::size_t slot, std::size_t target);
  // Maps `handles` as the next page of `slot` for rollback; false if it failed.
  bool map_back(std::size_t slot, const std::vector<PhysicalHandle>& handles, std::string& failure) noexcept;
  // Unmaps `addresses` (mapped to `handles`), best effort; those that fail become strays.
  // Returns the first failure's message, empty if none.
  std::string unmap_or_stray(const std::vector<DevicePtr>& addresses, const std::vector<PhysicalHandle>& handles,
                             const std::vector<bool>& accessible) noexcept;

  mutable std::mutex mutex_;
  CacheGeometry geometry_;
  std::shared_ptr<Driver> driver_;
  PagePool pool_;
  std::vector<DevicePtr> bases_;
  bool reserved_by_driver_ = false;
  bool released_ = false;
  std::string poisoned_;
  bool waited_ = false;  // whether the operation in progress waited for the device without the lock
  bool synchronized_ = false;  // whether it waited under the lock: once is enough
  std::function<void()> host_wait_;  // see set_host_wait
  std::size_t listed_handles_ = 0;  // handles the slots' page tables list (stats' mapped_pages)
  std::string undoing_;  // the failure being undone, while rollback() runs
  std::vector<DevicePtr> unfreed_reservations_;  // left by a failed reserve_buffers or release
  std::vector<Slot> slots_;
  std::vector<StrayMapping> strays_;
  PrefixCache prefix_;
  std::vector<std::pair<EntryId, PrefixCache::Entry>> evicted_log_;  // of the operation in progress
  std::vector<EntryId> forked_log_;  // entries the operation in progress made of private pages
  // Pages the operation in progress wrote (a fork's copy): an entry it evicted whose pages these
  // are cannot be restored if it fails, its contents are gone.
  std::vector<PhysicalHandle> written_log_;
  std::uint64_t pages_evicted_total_ = 0;
  std::vector<UnmappedPage> unmapped_log_;  // of the operation in progress
  std::size_t window_ = 0;  // 0: no sliding window
  std::vector<bool> windowed_;  // per buffer, whether the window applies
  std::vector<UnmappedPage> window_log_;  // of the operation in progress: handles unmapped behind windows
  std::set<std::pair<std::size_t, std::size_t>> undiscarded_window_pages_;  // (slot, page), windowed buffers only
  std::uint64_t window_pages_unmapped_total_ = 0;
  // (slot, page) of unmapped pages not yet discarded; a page mapped again leaves it.
  std::set<std::pair<std::size_t, std::size_t>> undiscarded_;
  std::uint64_t pages_mapped_total_ = 0;
  std::uint64_t pages_unmapped_total_ = 0;
  std::uint64_t grow_calls_ = 0;
  std::chrono::nanoseconds map_time_{0};
  std::chrono::nanoseconds unmap_time_{0};
};

}  // namespace vattention
