// What a kernel's host build calls (simt.h maps the CUDA names onto these): thread coordinates,
// __syncthreads, warp collectives, and shared memory through checked pointers.
#pragma once

#include "simt/emulator.h"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <string>
#include <type_traits>
#include <utility>

namespace flowformer::simt {
namespace detail {
struct Region;
}

const Uint3& thread_idx();
const Uint3& block_idx();
const Dim3& block_dim();
const Dim3& grid_dim();
unsigned lane_id();
unsigned thread_rank();  // the linear index of the thread in its block

void syncthreads(Site site);
void syncwarp(Site site, unsigned mask = 0xffffffffu);

// A warp collective: every lane of `mask` arrives with its input; when the last one does, run() computes
// every lane's output from all inputs (in[lane], out[lane] for the lanes of mask).
struct CollectiveView {
  unsigned mask;
  const void* const* in;
  void* const* out;
};
using CollectiveRun = void (*)(const CollectiveView& view, const void* context);
void collective(const char* op, Site site, unsigned mask, const void* in, void* out, CollectiveRun run,
                const void* context);

template <typename In, typename Out, typename Compute>
Out warp_collective(const char* op, Site site, unsigned mask, const In& in, const Compute& compute) {
  Out out{};
  collective(op, site, mask, &in, &out,
             [](const CollectiveView& view, const void* context) {
               (*static_cast<const Compute*>(context))(view.mask, reinterpret_cast<const In* const*>(view.in),
                                                       reinterpret_cast<Out* const*>(view.out));
             },
             &compute);
  return out;
}

// --- warp shuffles and votes, with CUDA's semantics (width: a power of two up to 32) ---

namespace detail {
enum class ShuffleKind { Index, Up, Down, Xor };
int shuffle_source(ShuffleKind kind, unsigned lane, int operand, int width);
}  // namespace detail

template <typename T>
T shuffle(detail::ShuffleKind kind, const char* op, Site site, unsigned mask, T value, int operand, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a 1 to 8 byte value");
  struct In {
    T value;
    int source;
  };
  const In in{value, detail::shuffle_source(kind, lane_id(), operand, width)};
  return warp_collective<In, T>(op, site, mask, in, [](unsigned m, const In* const* ins, T* const* outs) {
    for (unsigned lane = 0; lane < 32; ++lane) {
      if (m >> lane & 1u) {
        const int source = ins[lane]->source;
        // Reading a lane outside the mask is undefined in CUDA: here it yields the caller's own value.
        *outs[lane] = (m >> source & 1u) ? ins[source]->value : ins[lane]->value;
      }
    }
  });
}

template <typename T>
T shfl_sync(Site site, unsigned mask, T value, int source_lane, int width = 32) {
  return shuffle(detail::ShuffleKind::Index, "__shfl_sync", site, mask, value, source_lane, width);
}
template <typename T>
T shfl_up_sync(Site site, unsigned mask, T value, unsigned delta, int width = 32) {
  return shuffle(detail::ShuffleKind::Up, "__shfl_up_sync", site, mask, value, int(delta), width);
}
template <typename T>
T shfl_down_sync(Site site, unsigned mask, T value, unsigned delta, int width = 32) {
  return shuffle(detail::ShuffleKind::Down, "__shfl_down_sync", site, mask, value, int(delta), width);
}
template <typename T>
T shfl_xor_sync(Site site, unsigned mask, T value, int lane_mask, int width = 32) {
  return shuffle(detail::ShuffleKind::Xor, "__shfl_xor_sync", site, mask, value, lane_mask, width);
}

unsigned ballot_sync(Site site, unsigned mask, int predicate);
int any_sync(Site site, unsigned mask, int predicate);
int all_sync(Site site, unsigned mask, int predicate);

// --- shared memory ---

// An index that remembers where it was written, for hazard reports (operator[] takes no default argument).
struct Index {
  int64_t value;
  Site site;
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  Index(I i, std::source_location at = std::source_location::current())  // NOLINT: implicit on purpose
      : value(static_cast<int64_t>(i)), site{at.file_name(), static_cast<int>(at.line())} {}
};

namespace detail {
[[noreturn]] void fail(const std::string& message);  // a fatal error of the current thread (KernelError)
// Checked accesses of `bytes` bytes at `offset` of a region within the allocation [begin, end); `as_thread`
// names the thread the access is attributed to (-1: the current one; ldmatrix reads for other lanes).
void shared_read(Region* region, std::size_t begin, std::size_t end, std::size_t offset, std::size_t bytes,
                 std::size_t align, Site site, void* destination, int as_thread = -1);
void shared_write(Region* region, std::size_t begin, std::size_t end, std::size_t offset, std::size_t bytes,
                  std::size_t align, Site site, const void* source);
Region* static_shared(Site site, std::size_t bytes, std::size_t type_id, std::size_t* offset);
// Counting (counters.h): whether this block counts; an ldmatrix (rows: the byte offsets of its 8 N rows); a
// lane's global load or store.
bool counting();
void note_ldmatrix(Site site, const uint64_t* rows, int matrices);
void count_global(Site site, const void* address, std::size_t bytes, bool store);
Region* dynamic_shared(std::size_t* bytes);
template <typename T>
std::size_t type_id() {
  static const char tag = 0;
  return reinterpret_cast<std::size_t>(&tag);
}
}  // namespace detail

// A reference to one element of shared memory. Reads and writes happen where the expression is used
// (operator T() and operator= are for temporaries only: `auto x = tile[i];` does not compile into a
// later, unchecked read).
template <typename T>
class SharedRef {
 public:
  SharedRef(detail::Region* region, std::size_t begin, std::size_t end, std::size_t offset, Site site)
      : region_(region), begin_(begin), end_(end), offset_(offset), site_(site) {}

  operator T() && { return load(); }  // NOLINT: implicit, as a T& would be
  void operator=(T value) && { store(value); }
  void operator=(const SharedRef& other) && { store(other.load()); }
  template <typename U>
  void operator+=(const U& value) && { store(static_cast<T>(load() + value)); }
  template <typename U>
  void operator-=(const U& value) && { store(static_cast<T>(load() - value)); }
  template <typename U>
  void operator*=(const U& value) && { store(static_cast<T>(load() * value)); }

 private:
  T load() const {
    T value;
    detail::shared_read(region_, begin_, end_, offset_, sizeof(T), alignof(T), site_, &value);
    return value;
  }
  void store(const T& value) const {
    detail::shared_write(region_, begin_, end_, offset_, sizeof(T), alignof(T), site_, &value);
  }

  detail::Region* region_;
  std::size_t begin_, end_, offset_;
  Site site_;
};

// A pointer into one shared-memory allocation (the host build of `T*` to __shared__ memory).
template <typename T>
class SharedPtr {
 public:
  SharedPtr() = default;
  SharedPtr(detail::Region* region, std::size_t begin, std::size_t end, std::size_t offset)
      : region_(region), begin_(begin), end_(end), offset_(offset) {}

  SharedRef<T> operator[](Index i) const {
    return SharedRef<T>(region_, begin_, end_, offset_ + static_cast<std::size_t>(i.value * int64_t(sizeof(T))),
                        i.site);
  }
  SharedRef<T> operator*() const { return (*this)[0]; }
  SharedPtr operator+(int64_t n) const {
    return {region_, begin_, end_, offset_ + std::size_t(n * int64_t(sizeof(T)))};
  }
  SharedPtr operator-(int64_t n) const { return *this + (-n); }
  SharedPtr& operator+=(int64_t n) { return *this = *this + n; }
  // The same bytes as another type (reinterpret_cast of a shared pointer).
  template <typename U>
  SharedPtr<U> as() const {
    return {region_, begin_, end_, offset_};
  }

  detail::Region* region() const { return region_; }
  std::size_t begin() const { return begin_; }
  std::size_t end() const { return end_; }
  std::size_t offset() const { return offset_; }  // byte offset in the block's static or dynamic window

 private:
  detail::Region* region_ = nullptr;
  std::size_t begin_ = 0, end_ = 0, offset_ = 0;
};

template <typename T>
SharedPtr<T> static_shared(Site site, std::size_t count) {
  std::size_t offset = 0;
  detail::Region* region = detail::static_shared(site, count * sizeof(T), detail::type_id<T>(), &offset);
  return {region, offset, offset + count * sizeof(T), offset};
}

template <typename T>
SharedPtr<T> dynamic_shared() {
  std::size_t bytes = 0;
  detail::Region* region = detail::dynamic_shared(&bytes);
  return {region, 0, bytes, 0};
}

}  // namespace flowformer::simt
