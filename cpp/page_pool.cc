#include "page_pool.h"

#include <string>

#include "errors.h"

namespace vattention {

PagePool::PagePool(Driver& driver, std::size_t page_bytes, std::size_t budget_pages)
    : driver_(driver), page_bytes_(page_bytes), budget_pages_(budget_pages) {}

PagePool::~PagePool() {
  for (PhysicalHandle handle : free_) {
    try {
      driver_.release(handle);
    } catch (...) {
      // A destructor cannot report; the driver frees the page with the context.
    }
  }
}

std::vector<PhysicalHandle> PagePool::take(std::size_t count) {
  if (count > headroom()) {
    throw OutOfPages("needs " + std::to_string(count) + " pages of " + std::to_string(page_bytes_) +
                     " bytes but only " + std::to_string(headroom()) + " of the budget of " +
                     std::to_string(budget_pages_) + " are free");
  }
  std::vector<PhysicalHandle> created;
  const std::size_t from_pool = std::min(count, free_.size());
  try {
    while (created.size() < count - from_pool) created.push_back(driver_.create(page_bytes_));
  } catch (...) {
    for (PhysicalHandle handle : created) {
      try {
        driver_.release(handle);
      } catch (...) {
        // The creation error is the one to report.
      }
    }
    throw;
  }
  created_ += created.size();
  std::vector<PhysicalHandle> taken(free_.end() - from_pool, free_.end());
  free_.resize(free_.size() - from_pool);
  taken.insert(taken.end(), created.begin(), created.end());
  return taken;
}

void PagePool::put(const std::vector<PhysicalHandle>& handles) {
  free_.insert(free_.end(), handles.begin(), handles.end());
}

void PagePool::fill(std::size_t count) {
  if (count <= free_.size()) return;
  // take() hands out the pooled pages first and creates the rest, so putting
  // everything back leaves exactly `count` pooled.
  put(take(count));
}

std::size_t PagePool::trim(std::size_t keep) {
  std::size_t released = 0;
  while (free_.size() > keep) {
    try {
      driver_.release(free_.back());
    } catch (...) {
      if (released == 0) throw;
      return released;
    }
    free_.pop_back();
    --created_;
    ++released;
  }
  return released;
}

}  // namespace vattention
