// Where XLA FFI handlers find the page managers that Python owns.
//
// A handler gets a manager's id as an attribute of the custom call; Python
// registers a manager when it creates one and removes it when it closes it.
// The registry only holds shared references, so a manager removed while a
// handler still uses it stays alive until the handler returns.
//
// A group (tensor parallelism) is one id for the page managers of several
// devices: every device runs the same program with the same id, and each
// handler picks the manager whose first buffer is its own first operand.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "page_manager.h"

namespace vattention {

class ManagerRegistry {
 public:
  // The process-wide registry: handlers have no other way to reach Python state.
  static ManagerRegistry& instance();

  std::uint64_t add(std::shared_ptr<PageManager> manager);
  void remove(std::uint64_t id);
  // Null when no manager has that id.
  std::shared_ptr<PageManager> find(std::uint64_t id) const;

  // Registers the managers of a group under one new id (removed by remove()).
  std::uint64_t add_group(std::vector<std::shared_ptr<PageManager>> managers);
  // The manager registered as `id`, or the member of group `id` whose first
  // buffer base is `first_operand`; null when none matches.
  std::shared_ptr<PageManager> find_for(std::uint64_t id, DevicePtr first_operand) const;
  // True when `id` names a group.
  bool is_group(std::uint64_t id) const;

 private:
  mutable std::mutex mutex_;
  std::uint64_t next_id_ = 1;
  std::unordered_map<std::uint64_t, std::shared_ptr<PageManager>> managers_;
  std::unordered_map<std::uint64_t, std::vector<std::shared_ptr<PageManager>>> groups_;
};

}  // namespace vattention
