// Physical pages that are created but not mapped, under a budget.
//
// Creating a page (cuMemCreate) costs about as much as mapping it, so pages
// that are unmapped go back here instead of being released, and a request for
// pages takes pooled ones first. The budget caps the pages alive at once,
// pooled or mapped. Not thread-safe: the PageManager's lock guards it.
//
// The pool logs the pages it creates so that a PageManager operation that
// fails can release exactly the pages it created (release_created), and its
// view always matches the driver: a page the driver failed to release stays
// pooled and counted instead of being forgotten.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "driver.h"

namespace vattention {

class PagePool {
 public:
  PagePool(Driver& driver, std::size_t page_bytes, std::size_t budget_pages);
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;
  // Releases the pooled pages. Pages handed out must have been put back.
  ~PagePool();

  std::size_t budget_pages() const { return budget_pages_; }
  std::size_t created_pages() const { return created_; }
  std::size_t pooled_pages() const { return free_.size(); }
  const std::vector<PhysicalHandle>& pooled() const { return free_; }
  // Pages that take() can still hand out: pooled ones plus the budget not yet created.
  std::size_t headroom() const { return free_.size() + (budget_pages_ - created_); }

  // Hands out `count` pages, creating those the pool lacks. All or nothing:
  // throws OutOfPages when the headroom is short and DriverError when a
  // creation fails, with the pool as it was before the call (except a page
  // the driver then failed to release: it stays pooled). Pooled pages listed
  // in `last` are handed out only where neither other pooled pages nor new
  // ones can be: a page whose contents may still be needed.
  std::vector<PhysicalHandle> take(std::size_t count, const std::vector<PhysicalHandle>& last = {});
  void put(const std::vector<PhysicalHandle>& handles);
  // Takes these pooled pages out of the pool; false (and nothing taken) if one is not pooled.
  bool remove(const std::vector<PhysicalHandle>& handles);
  // Creates pages until `count` are pooled (eager allocation); all or nothing.
  void fill(std::size_t count);
  // Releases pooled pages beyond `keep`, all it can: a page the driver fails
  // to release stays pooled. Returns how many were released; throws the first
  // DriverError after trying every page if any failed.
  std::size_t trim(std::size_t keep);

  // Starts a new log of created pages (at the start of a PageManager operation).
  void begin_log() { created_log_.clear(); }
  // Releases the pooled pages created since begin_log(); never throws. Returns
  // the message of the first failure (empty if none); a page that failed stays pooled.
  std::string release_created() noexcept;

 private:
  Driver& driver_;
  std::size_t page_bytes_;
  std::size_t budget_pages_;
  std::size_t created_ = 0;
  std::vector<PhysicalHandle> free_;
  std::vector<PhysicalHandle> created_log_;
};

}  // namespace vattention
