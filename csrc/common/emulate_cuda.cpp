#include "common/emulate_cuda.h"

#include <cstdlib>
#include <cstring>

namespace flowformer {

bool emulate_cuda_requested() {
  const char* flag = std::getenv("FLOWFORMER_EMULATE_CUDA");
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

}  // namespace flowformer
