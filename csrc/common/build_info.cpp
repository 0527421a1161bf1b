// flowformer::_build_info() -> str: "cuda" entries tell whether CUDA kernels are compiled in.
#include <flowformer/build_info.h>

#include <torch/library.h>

#include <string>

namespace flowformer {

#ifdef FLOWFORMER_WITH_CUDA
std::string cuda_arch_list();  // cuda_build_info.cu
std::string cuda_toolkit_version();
#endif

bool cuda_compiled() {
#ifdef FLOWFORMER_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// "key=value" pairs separated by ';', parsed by flowformer.build_info() in Python.
static std::string build_info() {
#ifdef FLOWFORMER_WITH_CUDA
  return "cuda=1;cuda_version=" + cuda_toolkit_version() + ";cuda_archs=" + cuda_arch_list();
#else
  return "cuda=0";
#endif
}

TORCH_LIBRARY_FRAGMENT(flowformer, m) {
  m.def("_build_info() -> str", &build_info);
}

}  // namespace flowformer
