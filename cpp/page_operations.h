// How a PageManager operation runs: under the lock, waiting for the device
// without it (locked), and all or nothing (transaction). Templates, so they
// live in this header, which only the files that define operations include.
#pragma once

#include <exception>
#include <functional>
#include <mutex>
#include <type_traits>

#include "page_manager.h"

namespace vattention {

// Thrown under the lock where the device must be waited for and the caller has not waited yet.
struct WaitOutsideTheLock {};

template <class Body>
auto PageManager::transaction(Body&& body) -> decltype(body()) {
  const Checkpoint before = checkpoint();
  unmapped_log_.clear();
  evicted_log_.clear();
  forked_log_.clear();
  written_log_.clear();
  window_log_.clear();
  pool_.begin_log();
  try {
    if constexpr (std::is_void_v<decltype(body())>) {
      body();
      commit();
    } else {
      auto result = body();
      commit();
      return result;
    }
  } catch (const std::exception& error) {
    rollback(before, error.what());
    throw;
  } catch (...) {
    rollback(before, "an unknown error");
    throw;
  }
}

template <class Operation>
auto PageManager::locked(void* stream, Operation&& operation, bool in_program) -> decltype(operation()) {
  for (bool waited = false;; waited = true) {
    std::function<void()> host_wait;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      waited_ = waited;
      synchronized_ = false;
      try {
        return operation();
      } catch (const WaitOutsideTheLock&) {
        // Nothing was changed yet: the wait is the first thing an operation does with the driver.
        if (!in_program) host_wait = host_wait_;
      }
    }
    // The long wait, for all the work in flight, happens without the lock so that other callers
    // (the mapping op of the next step, Python threads) go on meanwhile. The operation then runs
    // again and waits once more under the lock, which finds little or nothing left to wait for.
    driver_->synchronize(stream);
    if (host_wait) host_wait();
  }
}

}  // namespace vattention
