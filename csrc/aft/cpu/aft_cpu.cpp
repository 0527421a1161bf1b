// CPU backend of the AFT ops: the portable implementation (aft/aft_portable.h) on host threads.
#include "aft/aft_backend.h"
#include "common/host_executor.h"

#include "common/emulated_executor.h"  // last: simt.h defines CUDA names as macros

namespace flowformer::aft_cpu {
namespace {

struct NoGuard {
  explicit NoGuard(const c10::Device&) {}
};

}  // namespace

TORCH_LIBRARY_IMPL(flowformer, CPU, m) {
  aft_portable::Backend<portable::HostExecutor, NoGuard, portable::EmulatedExecutor>::register_to(m);
}

}  // namespace flowformer::aft_cpu
