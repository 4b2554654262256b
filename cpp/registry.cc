#include "registry.h"

namespace vattention {

ManagerRegistry& ManagerRegistry::instance() {
  static ManagerRegistry registry;
  return registry;
}

std::uint64_t ManagerRegistry::add(std::shared_ptr<PageManager> manager) {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::uint64_t id = next_id_++;
  managers_.emplace(id, std::move(manager));
  return id;
}

void ManagerRegistry::remove(std::uint64_t id) {
  std::lock_guard<std::mutex> lock(mutex_);
  managers_.erase(id);
  groups_.erase(id);
}

std::uint64_t ManagerRegistry::add_group(std::vector<std::shared_ptr<PageManager>> managers) {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::uint64_t id = next_id_++;
  groups_.emplace(id, std::move(managers));
  return id;
}

std::shared_ptr<PageManager> ManagerRegistry::find_for(std::uint64_t id, DevicePtr first_operand) const {
  std::vector<std::shared_ptr<PageManager>> members;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (auto it = managers_.find(id); it != managers_.end()) return it->second;
    auto group = groups_.find(id);
    if (group == groups_.end()) return nullptr;
    members = group->second;
  }
  // Outside the registry's lock: reading a manager's bases may wait for that manager's own lock.
  for (const auto& manager : members) {
    const std::vector<DevicePtr> bases = manager->buffer_bases();
    if (!bases.empty() && bases.front() == first_operand) return manager;
  }
  return nullptr;
}

bool ManagerRegistry::is_group(std::uint64_t id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return groups_.count(id) != 0;
}

std::shared_ptr<PageManager> ManagerRegistry::find(std::uint64_t id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = managers_.find(id);
  return it == managers_.end() ? nullptr : it->second;
}

}  // namespace vattention
