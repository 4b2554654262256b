// Physical pages that are created but not mapped, under a budget.
//
// Creating a page (cuMemCreate) costs about as much as mapping it, so pages
// that are unmapped go back here instead of being released, and a request for
// pages takes pooled ones first. The budget caps the pages alive at once,
// pooled or mapped. Not thread-safe: the PageManager's lock guards it.
#pragma once

#include <cstddef>
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
  // Pages that take() can still hand out: pooled ones plus the budget not yet created.
  std::size_t headroom() const { return free_.size() + (budget_pages_ - created_); }

  // Hands out `count` pages, creating those the pool lacks. All or nothing:
  // throws OutOfPages when the headroom is short and DriverError when a
  // creation fails, with the pool as it was before the call.
  std::vector<PhysicalHandle> take(std::size_t count);
  void put(const std::vector<PhysicalHandle>& handles);
  // Creates pages until `count` are pooled (eager allocation); all or nothing.
  void fill(std::size_t count);
  // Releases pooled pages beyond `keep`; returns how many were released.
  std::size_t trim(std::size_t keep);

 private:
  Driver& driver_;
  std::size_t page_bytes_;
  std::size_t budget_pages_;
  std::size_t created_ = 0;
  std::vector<PhysicalHandle> free_;
};

}  // namespace vattention
