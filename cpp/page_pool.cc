#include "page_pool.h"

#include <algorithm>
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

std::vector<PhysicalHandle> PagePool::take(std::size_t count, const std::vector<PhysicalHandle>& last) {
  if (count > headroom()) {
    throw OutOfPages("needs " + std::to_string(count) + " pages of " + std::to_string(page_bytes_) +
                     " bytes but only " + std::to_string(headroom()) + " of the budget of " +
                     std::to_string(budget_pages_) + " are free");
  }
  // Pooled pages go out from the back: those of `last` move to the front, behind new pages too.
  std::size_t kept_back = 0;
  if (!last.empty()) {
    const auto others = std::stable_partition(free_.begin(), free_.end(), [&last](PhysicalHandle handle) {
      return std::find(last.begin(), last.end(), handle) != last.end();
    });
    kept_back = static_cast<std::size_t>(others - free_.begin());
  }
  const std::size_t others = std::min(count, free_.size() - kept_back);
  const std::size_t to_create = std::min(count - others, budget_pages_ - created_);
  const std::size_t from_pool = count - to_create;
  std::vector<PhysicalHandle> created;
  try {
    while (created.size() < to_create) created.push_back(driver_.create(page_bytes_));
  } catch (...) {
    for (PhysicalHandle handle : created) {
      try {
        driver_.release(handle);
      } catch (...) {
        // The creation error is the one to report; the page is alive, so it is pooled.
        free_.push_back(handle);
        ++created_;
        created_log_.push_back(handle);
      }
    }
    throw;
  }
  created_ += created.size();
  created_log_.insert(created_log_.end(), created.begin(), created.end());
  std::vector<PhysicalHandle> taken(free_.end() - from_pool, free_.end());
  free_.resize(free_.size() - from_pool);
  taken.insert(taken.end(), created.begin(), created.end());
  return taken;
}

void PagePool::put(const std::vector<PhysicalHandle>& handles) {
  free_.insert(free_.end(), handles.begin(), handles.end());
}

bool PagePool::remove(const std::vector<PhysicalHandle>& handles) {
  std::vector<PhysicalHandle> rest = free_;
  for (PhysicalHandle handle : handles) {
    auto it = std::find(rest.begin(), rest.end(), handle);
    if (it == rest.end()) return false;
    rest.erase(it);
  }
  free_ = std::move(rest);
  return true;
}

void PagePool::fill(std::size_t count) {
  if (count <= free_.size()) return;
  // take() hands out the pooled pages first and creates the rest, so putting
  // everything back leaves exactly `count` pooled.
  put(take(count));
}

std::size_t PagePool::trim(std::size_t keep) {
  std::size_t released = 0;
  std::vector<PhysicalHandle> failed;
  std::string first_error;
  while (free_.size() > keep) {
    const PhysicalHandle handle = free_.back();
    free_.pop_back();
    try {
      driver_.release(handle);
      --created_;
      ++released;
    } catch (const std::exception& error) {
      if (first_error.empty()) first_error = error.what();
      failed.push_back(handle);
    }
  }
  free_.insert(free_.end(), failed.begin(), failed.end());
  if (!failed.empty()) {
    throw DriverError(first_error + " (" + std::to_string(released) + " pooled pages released, " +
                      std::to_string(failed.size()) + " stay pooled: try again)");
  }
  return released;
}

std::string PagePool::release_created() noexcept {
  std::string first_error;
  for (auto it = created_log_.rbegin(); it != created_log_.rend(); ++it) {
    auto pooled = std::find(free_.begin(), free_.end(), *it);
    if (pooled == free_.end()) continue;  // still mapped: an undo kept its page
    try {
      driver_.release(*it);
      free_.erase(pooled);
      --created_;
    } catch (const std::exception& error) {
      if (first_error.empty()) first_error = error.what();
    }
  }
  created_log_.clear();
  return first_error;
}

}  // namespace vattention
