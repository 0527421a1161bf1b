// The sample kernels' CUDA build, for the static checks (tests/static): a library of their sm_90 code.
#include "samples/block_reduce.cuh"
#include "samples/layout_probe.cuh"
#include "samples/mma_gemm.cuh"
#include "samples/tiled_matmul.cuh"

namespace flowformer::simt_samples::cuda {

void launch_all(const MatmulParams& matmul, const ReduceParams& reduce, const GemmParams<simt::bf16>& bf16_gemm,
                const GemmParams<simt::half>& half_gemm, uint32_t* probe) {
  run_tiled_matmul<16>(matmul);
  run_block_reduce<256>(reduce);
  run_mma_gemm<simt::bf16>(bf16_gemm);
  run_mma_gemm<simt::half>(half_gemm);
  run_layout_probe(probe);
}

}  // namespace flowformer::simt_samples::cuda
