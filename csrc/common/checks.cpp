#include "common/checks.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace flowformer {

void check_rank(const char* op, const char* arg, const at::Tensor& t, int64_t rank, const char* layout) {
  TORCH_CHECK(t.dim() == rank, op, ": ", arg, " must be a ", rank, "-D tensor ", layout, ", got a ",
              t.dim(), "-D tensor of shape ", t.sym_sizes());
}

void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, op, ": ", arg,
              " must be float32, float16, bfloat16 or float64, got ", s);
}

void check_like(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " must have the dtype of ", ref_arg, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " must be on the device of ", ref_arg, " (",
              ref.device(), "), got ", t.device());
}

void check_size(const char* op, const char* arg, const at::Tensor& t, int64_t dim,
                const c10::SymInt& expected, const char* what, const char* source) {
  TORCH_CHECK(t.sym_size(dim) == expected, op, ": ", arg, " must have ", what, " = ", expected, " (", source,
              "), got ", t.sym_size(dim), " (shape ", t.sym_sizes(), ")");
}

void check_padding_mask(const char* op, const char* arg, const std::optional<at::Tensor>& mask,
                        const at::Tensor& ref, const c10::SymInt& batch, const c10::SymInt& len,
                        const char* len_name) {
  if (!mask.has_value()) {
    return;
  }
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool, op, ": ", arg, " must be a bool tensor (True marks padding), got ",
              m.scalar_type());
  TORCH_CHECK(m.device() == ref.device(), op, ": ", arg, " must be on the device of query (", ref.device(),
              "), got ", m.device());
  TORCH_CHECK(m.dim() == 2 && m.sym_size(0) == batch && m.sym_size(1) == len, op, ": ", arg,
              " must have shape (B, ", len_name, ") = (", batch, ", ", len, "), got ", m.sym_sizes());
}

void check_non_negative(const char* op, const char* arg, double value) {
  TORCH_CHECK(value >= 0.0, op, ": ", arg, " must be >= 0, got ", value);
}

void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& value) {
  check_rank(op, "grad_out", grad_out, 4, "(B, H, L, M)");
  check_floating(op, "grad_out", grad_out);
  TORCH_CHECK(grad_out.device() == query.device(), op, ": grad_out must be on the device of query (",
              query.device(), "), got ", grad_out.device());
  check_size(op, "grad_out", grad_out, 0, query.sym_size(0), "batch size B", "as query");
  check_size(op, "grad_out", grad_out, 1, query.sym_size(1), "heads H", "as query");
  check_size(op, "grad_out", grad_out, 2, query.sym_size(2), "length L", "as query");
  check_size(op, "grad_out", grad_out, 3, value.sym_size(3), "value size M", "as value");
}

void check_cu_seqlens(const char* op, const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& query) {
  if (!cu_seqlens.has_value()) {
    return;
  }
  const at::Tensor& cu = *cu_seqlens;
  TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, op,
              ": cu_seqlens must be int32 or int64, got ", cu.scalar_type());
  check_rank(op, "cu_seqlens", cu, 1, "(N + 1,)");
  TORCH_CHECK(cu.sym_size(0) >= 1, op, ": cu_seqlens must have N + 1 >= 1 elements (offsets of N sequences, ",
              "starting with 0), got shape ", cu.sym_sizes());
  TORCH_CHECK(cu.device() == query.device() || cu.device().is_cpu(), op,
              ": cu_seqlens must be on the device of query (", query.device(), ") or on the CPU, got ", cu.device());
  check_size(op, "query", query, 0, 1, "batch size B", "packed sequences: cu_seqlens given");
}


c10::SymInt sequence_count(const at::Tensor& query, const std::optional<at::Tensor>& cu_seqlens) {
  return cu_seqlens.has_value() ? cu_seqlens->sym_size(0) - 1 : query.sym_size(0);
}

std::vector<int64_t> cu_seqlens_values(const char* op, const std::optional<at::Tensor>& cu_seqlens, int64_t L) {
  if (!cu_seqlens.has_value()) {
    return {};
  }
  // The one device-to-host copy of a CUDA cu_seqlens (N + 1 integers); it waits for the stream.
  const at::Tensor host = cu_seqlens->to(at::kCPU, at::kLong).contiguous();
  const int64_t* cu = host.const_data_ptr<int64_t>();
  std::vector<int64_t> values(cu, cu + host.numel());
  TORCH_CHECK(values.front() == 0, op, ": cu_seqlens must start with 0, got cu_seqlens[0] = ", values.front());
  for (size_t n = 1; n < values.size(); ++n) {
    TORCH_CHECK(values[n] >= values[n - 1], op, ": cu_seqlens must be non-decreasing, got cu_seqlens[", n,
                "] = ", values[n], " < cu_seqlens[", n - 1, "] = ", values[n - 1]);
  }
  const size_t N = values.size() - 1;
  TORCH_CHECK(values.back() == L, op, ": cu_seqlens must end with the total length L = ", L,
              " (the length of query), got cu_seqlens[", N, "] = ", values.back());
  return values;
}

at::ScalarType accumulate_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

static bool poison_outputs() {
  const char* flag = std::getenv("FLOWFORMER_POISON_OUTPUTS");
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

at::Tensor new_output(c10::SymIntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty_symint(sizes, options);
  if (poison_outputs() && !out.is_meta()) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

}  // namespace flowformer
