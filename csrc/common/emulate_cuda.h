// Test mode of the CPU backends: with FLOWFORMER_EMULATE_CUDA=1 in the environment, an op on CPU
// tensors runs the algorithm of its CUDA backend (the portable item kernels of kernels/, on host
// threads) instead of its CPU kernels, so that the test suite checks the CUDA algorithms on a machine
// without a GPU.
#pragma once

namespace flowformer {

bool emulate_cuda_requested();

}  // namespace flowformer
