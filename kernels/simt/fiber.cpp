#include "simt/fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <new>

#if defined(__SANITIZE_ADDRESS__)
#define FLOWFORMER_SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FLOWFORMER_SIMT_ASAN 1
#endif
#endif
#if defined(FLOWFORMER_SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(FLOWFORMER_SIMT_USE_UCONTEXT)
// ff_simt_switch(save, to): pushes the callee-saved registers and the floating-point control words, stores
// the stack pointer in *save, loads `to` and pops the same frame from it. ff_simt_trampoline is where a new
// fiber's first switch returns to: it calls r13(r12), which never returns.
extern "C" void ff_simt_switch(void** save, void* to);
extern "C" void ff_simt_trampoline();
asm(R"(
    .text
    .globl ff_simt_switch
    .type ff_simt_switch, @function
ff_simt_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size ff_simt_switch, .-ff_simt_switch

    .globl ff_simt_trampoline
    .type ff_simt_trampoline, @function
ff_simt_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size ff_simt_trampoline, .-ff_simt_trampoline
    .section .note.GNU-stack,"",@progbits
    .text
)");
#endif

namespace flowformer::simt {
namespace {

#if defined(FLOWFORMER_SIMT_USE_UCONTEXT)
// makecontext passes int arguments only: the starting fiber travels through this.
thread_local Fiber* starting_fiber = nullptr;
#endif

std::size_t page_size() {
  static const std::size_t size = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

}  // namespace

Fiber::Fiber(std::size_t stack_bytes) {
  const std::size_t page = page_size();
  stack_bytes_ = (stack_bytes + page - 1) / page * page;
  mapped_bytes_ = stack_bytes_ + page;
  void* mapping = mmap(nullptr, mapped_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
  if (mapping == MAP_FAILED) {
    throw std::bad_alloc();
  }
  mprotect(mapping, page, PROT_NONE);  // the guard page
  stack_ = static_cast<char*>(mapping) + page;
}

Fiber::~Fiber() {
  munmap(stack_ - page_size(), mapped_bytes_);
}

const char* Fiber::implementation() {
#if defined(FLOWFORMER_SIMT_USE_UCONTEXT)
  return "ucontext";
#else
  return "x86-64 assembly";
#endif
}

void Fiber::start(Entry entry, void* arg) {
  entry_ = entry;
  arg_ = arg;
#if defined(FLOWFORMER_SIMT_ASAN)
  // A fiber abandoned after a fatal error left its frames' redzones poisoned.
  __asan_unpoison_memory_region(stack_, stack_bytes_);
#endif
#if defined(FLOWFORMER_SIMT_USE_UCONTEXT)
  getcontext(&context_);
  context_.uc_stack.ss_sp = stack_;
  context_.uc_stack.ss_size = stack_bytes_;
  context_.uc_link = nullptr;
  makecontext(&context_, reinterpret_cast<void (*)()>(+[] { run(starting_fiber); }), 0);
#else
  // The frame ff_simt_switch pops: control words, r15, r14, r13 (run), r12 (this), rbx, rbp, return
  // address (the trampoline). The top is 16-byte aligned and the frame is 64 bytes, so the trampoline
  // starts with a 16-byte aligned stack, as a call expects.
  auto* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack_ + stack_bytes_) & ~uintptr_t(15)) - 16);
  uint64_t* frame = top - 8;
  frame[0] = 0x037f00001f80ull;  // MXCSR 0x1f80 (defaults) in the low half, x87 control word 0x037f above it
  frame[1] = 0;                  // r15
  frame[2] = 0;                  // r14
  frame[3] = reinterpret_cast<uint64_t>(&Fiber::run);  // r13
  frame[4] = reinterpret_cast<uint64_t>(this);         // r12
  frame[5] = 0;                                  // rbx
  frame[6] = 0;                                  // rbp
  frame[7] = reinterpret_cast<uint64_t>(&ff_simt_trampoline);
  sp_ = frame;
#endif
  fake_stack_ = nullptr;
}

void Fiber::run(Fiber* self) {
#if defined(FLOWFORMER_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, const_cast<const void**>(&self->scheduler_stack_bottom_),
                                  &self->scheduler_stack_bytes_);
#endif
  self->entry_(self->arg_);
  self->switch_out(true);
  std::abort();  // a finished fiber is never resumed
}

void Fiber::resume() {
#if defined(FLOWFORMER_SIMT_USE_UCONTEXT)
  starting_fiber = this;
#endif
#if defined(FLOWFORMER_SIMT_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, stack_, stack_bytes_);
#endif
#if defined(FLOWFORMER_SIMT_USE_UCONTEXT)
  swapcontext(&scheduler_, &context_);
#else
  ff_simt_switch(&scheduler_sp_, sp_);
#endif
#if defined(FLOWFORMER_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

void Fiber::switch_out(bool finishing) {
#if defined(FLOWFORMER_SIMT_ASAN)
  // A finishing fiber passes no fake-stack slot: AddressSanitizer then releases its fake stack.
  __sanitizer_start_switch_fiber(finishing ? nullptr : &fake_stack_, scheduler_stack_bottom_, scheduler_stack_bytes_);
#else
  (void)finishing;
#endif
#if defined(FLOWFORMER_SIMT_USE_UCONTEXT)
  swapcontext(&context_, &scheduler_);
#else
  ff_simt_switch(&sp_, scheduler_sp_);
#endif
#if defined(FLOWFORMER_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack_, const_cast<const void**>(&scheduler_stack_bottom_),
                                  &scheduler_stack_bytes_);
#endif
}

void Fiber::suspend() {
  switch_out(false);
}

}  // namespace flowformer::simt
