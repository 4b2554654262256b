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
}

std::shared_ptr<PageManager> ManagerRegistry::find(std::uint64_t id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = managers_.find(id);
  return it == managers_.end() ? nullptr : it->second;
}

}  // namespace vattention
