#pragma once

namespace flowformer {

// True when this build of the library holds CUDA kernels.
bool cuda_compiled();

}  // namespace flowformer
