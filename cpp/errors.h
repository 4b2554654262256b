// Exceptions of the page manager that are not driver failures. Each maps to a
// Python exception of its own in the bindings.
#pragma once

#include <exception>
#include <stdexcept>
#include <string>

namespace vattention {

// The page budget cannot cover a request. Back-pressure, not a bug: the
// caller can free slots, reclaim, or wait. Nothing was changed.
class OutOfPages : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Every slot is in use.
class NoFreeSlot : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Undoing a failed operation failed too, so the manager can no longer promise
// that its view of the pages matches the driver's. Every later call but
// stats() and release() raises this, naming the first failure; release()
// still frees everything it can.
class ManagerPoisoned : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The message of a caught exception, for an error that reports what failed before it.
inline std::string error_message(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "an unknown error";
  }
}

}  // namespace vattention
