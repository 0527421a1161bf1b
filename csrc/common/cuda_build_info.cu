// What the CUDA part of the library was compiled for: the toolkit version and the list of
// real architectures nvcc generated code for (__CUDA_ARCH_LIST__, e.g. "800,900").
#include <string>

#define FLOWFORMER_STR2(...) #__VA_ARGS__
#define FLOWFORMER_STR(...) FLOWFORMER_STR2(__VA_ARGS__)

namespace flowformer {

std::string cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return FLOWFORMER_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

std::string cuda_toolkit_version() {
  return std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__);
}

}  // namespace flowformer
