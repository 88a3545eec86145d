// Linked instead of csrc/cuda/ when the extension is built without CUDA.
#include <string>

namespace gradstab {

std::string cuda_build_info() {
  return "cuda: not built";
}

}  // namespace gradstab
