// CPU backend of the AFT ops: the portable implementation (aft/aft_portable.h) on host threads.
#include "aft/aft_backend.h"
#include "common/host_executor.h"

namespace flowformer::aft_cpu {
namespace {

struct NoGuard {
  explicit NoGuard(const c10::Device&) {}
};

}  // namespace

TORCH_LIBRARY_IMPL(flowformer, CPU, m) {
  aft_portable::Backend<portable::HostExecutor, NoGuard>::register_to(m);
}

}  // namespace flowformer::aft_cpu
