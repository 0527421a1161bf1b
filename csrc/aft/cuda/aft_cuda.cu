// CUDA backend of the AFT ops: the portable implementation (aft/aft_portable.h), one CUDA thread per
// item, on the current stream of the inputs' device.
#include "aft/aft_backend.h"
#include "common/cuda_executor.cuh"

#include <c10/cuda/CUDAGuard.h>

namespace flowformer::aft_cuda {

TORCH_LIBRARY_IMPL(flowformer, CUDA, m) {
  aft_portable::Backend<portable::CudaExecutor, c10::cuda::CUDAGuard, void>::register_to(m);
}

}  // namespace flowformer::aft_cuda
