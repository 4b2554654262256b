// Exceptions of the page manager that are not driver failures. Each maps to a
// Python exception of its own in the bindings.
#pragma once

#include <stdexcept>

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

}  // namespace vattention
