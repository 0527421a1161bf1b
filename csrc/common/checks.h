// Argument checks shared by every op. Each message names the op, the argument,
// what was expected and what came, e.g.
//   "flowformer::flow_attention: key must have batch size B = 2 (as query), got 3".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <vector>

namespace flowformer {

// rank == `rank`; `layout` names the dimensions, e.g. "(B, H, L, D)".
void check_rank(const char* op, const char* arg, const at::Tensor& t, int64_t rank, const char* layout);

// float32, float16, bfloat16 or float64.
void check_floating(const char* op, const char* arg, const at::Tensor& t);

// Same dtype and device as the reference argument `ref_arg`.
void check_like(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg, const at::Tensor& ref);

// t.size(dim) == expected; `what` names the size, e.g. "batch size B", `source` where it came from.
void check_size(const char* op, const char* arg, const at::Tensor& t, int64_t dim,
                const c10::SymInt& expected, const char* what, const char* source);

// A padding mask: bool, (B, len), on the device of `ref` (True marks padding).
void check_padding_mask(const char* op, const char* arg, const std::optional<at::Tensor>& mask,
                        const at::Tensor& ref, const c10::SymInt& batch, const c10::SymInt& len,
                        const char* len_name);

void check_non_negative(const char* op, const char* arg, double value);

// grad_out of an op whose output is (B, H, L, M): B, H, L of query and M of value, on query's device.
void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& value);

// Packed sequences (the FlashAttention convention): cu_seqlens int32 or int64, (N + 1,) with N >= 0, on the
// device of query or on the CPU (a CPU cu_seqlens spares a CUDA backend a device-to-host copy); query must
// then have B == 1. Shapes and dtypes only: the values are checked by cu_seqlens_values, in the backends.
void check_cu_seqlens(const char* op, const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& query);

// The number of independent sequences, each with its own state: N = cu_seqlens.size(0) - 1 (packed
// sequences, B == 1), else the batch size B.
c10::SymInt sequence_count(const at::Tensor& query, const std::optional<at::Tensor>& cu_seqlens);

// Packed sequences: cu_seqlens (already checked by check_cu_seqlens) on the host as int64, after checking
// its values against the length L: cu_seqlens[0] == 0, non-decreasing, cu_seqlens[N] == L. Empty when not
// given (a given one has N + 1 >= 1 elements). Reads the data: the backends call it, not the Meta kernels;
// a CUDA cu_seqlens costs one small device-to-host copy (it waits for the stream).
std::vector<int64_t> cu_seqlens_values(const char* op, const std::optional<at::Tensor>& cu_seqlens, int64_t L);

// float64 inputs accumulate in float64, all others in float32.
at::ScalarType accumulate_type(at::ScalarType input);

// A new output tensor. With FLOWFORMER_POISON_OUTPUTS=1 in the environment it is filled with NaN
// first, so tests can check that a kernel writes every element.
at::Tensor new_output(c10::SymIntArrayRef sizes, const at::TensorOptions& options);

}  // namespace flowformer
