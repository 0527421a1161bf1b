// A fiber: a function running on its own stack, switched to and from explicitly (one emulated CUDA thread).
// x86-64: a small hand-written context switch (callee-saved registers, MXCSR and the x87 control word);
// elsewhere, or with FLOWFORMER_SIMT_UCONTEXT defined, ucontext's swapcontext. Stacks are mmap'ed with a
// guard page below them (an overflow faults instead of corrupting a neighbour). AddressSanitizer is told
// of every switch.
#pragma once

#include <cstddef>

#if !defined(__x86_64__) || defined(FLOWFORMER_SIMT_UCONTEXT)
#define FLOWFORMER_SIMT_USE_UCONTEXT 1
#include <ucontext.h>
#endif

namespace flowformer::simt {

class Fiber {
 public:
  using Entry = void (*)(void*);

  explicit Fiber(std::size_t stack_bytes);
  ~Fiber();
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  // Makes the next resume() start entry(arg) from the top of the stack; when entry returns, the fiber
  // has finished and switches back to the scheduler for good.
  void start(Entry entry, void* arg);
  // From the scheduler: runs the fiber until it calls suspend() or its entry returns.
  void resume();
  // From inside the fiber: back to the scheduler; resume() continues after this call.
  void suspend();
  static const char* implementation();  // "x86-64 assembly" or "ucontext"

 private:
  static void run(Fiber* self);
  void switch_out(bool finishing);

  Entry entry_ = nullptr;
  void* arg_ = nullptr;
  char* stack_ = nullptr;  // lowest address of the usable stack (the guard page lies below it)
  std::size_t stack_bytes_ = 0, mapped_bytes_ = 0;
  void* scheduler_stack_bottom_ = nullptr;  // for AddressSanitizer
  std::size_t scheduler_stack_bytes_ = 0;
  void* fake_stack_ = nullptr;
#if defined(FLOWFORMER_SIMT_USE_UCONTEXT)
  ucontext_t context_{}, scheduler_{};
#else
  void* sp_ = nullptr;            // the fiber's saved stack pointer
  void* scheduler_sp_ = nullptr;  // the scheduler's, while the fiber runs
#endif
};

}  // namespace flowformer::simt
