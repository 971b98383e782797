// mmap/munmap exposed as zero-copy external ArrayBuffers, and the SIGBUS guard that keeps a peer
// who shrinks the file behind a mapping from killing the process.
#include "common.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <unordered_map>

namespace vfio {
namespace {

// ---- SIGBUS guard -------------------------------------------------------------------------------
//
// Guest memory is an fd the client owns, mapped MAP_SHARED. If the client shrinks that file
// (ftruncate), every load or store of ours to a page past its new end raises SIGBUS, whose default
// action ends the process and every controller it serves. QEMU's memory-backend-memfd seals its
// memfd against shrinking, but memory-backend-file on /dev/shm or hugetlbfs cannot be sealed, and
// a hostile client need not use either. So every mapping made here is registered in a fixed
// table, and a SIGBUS handler that finds the faulting address inside a registered mapping:
//   1. replaces the whole mapping with anonymous zero pages (mmap MAP_FIXED|MAP_PRIVATE|
//      MAP_ANONYMOUS, same protection: a single syscall, safe in a signal handler), so the faulting
//      instruction - a JIT-compiled store into an ArrayBuffer, a memcpy - retries and completes
//      harmlessly, and so does every later access (no fault per page);
//   2. bumps the mapping's poison counter, which JS reads through an external buffer
//      (poisonCounts[guardSlot(buffer)]): the DMA table then refuses the mapping and fails any
//      access that saw the counter move, until the client unmaps it.
// Faults at other addresses, and SIGBUS sent by kill(), go to whoever handled SIGBUS before us
// (or get the default action back, which the retried instruction or the re-raised signal meets).
//
// The handler reads the table without locks: slots are published with release stores (length and
// protection before the start address) and retired by clearing the start address before munmap.
// Only this process's JS thread touches guest memory from user space (the threadpool's readv/writev
// into it fault inside the kernel and get EFAULT, no signal), so a slot is never retired while the
// handler looks at it on another thread. Kernel I/O that lands in a mapping after it was replaced
// reads or writes the zero pages; the DMA table's poison check after the I/O reports it.

constexpr size_t kGuardSlots = 16384;

struct GuardSlot {
  std::atomic<bool> used{false};
  std::atomic<uintptr_t> start{0};  // 0: not published
  std::atomic<size_t> length{0};
  std::atomic<int> prot{0};
};

GuardSlot guardSlots[kGuardSlots];
// Monotonic per slot (a reused slot keeps counting), read by JS as a Uint32Array.
uint32_t poisonCounts[kGuardSlots];
struct sigaction previousBusAction;

bool SealedAgainstShrink(int fd) {
  int seals = fcntl(fd, F_GET_SEALS);
  return seals >= 0 && (seals & F_SEAL_SHRINK) != 0;
}

int ClaimGuardSlot(void* addr, size_t length, int prot) {
  for (size_t i = 0; i < kGuardSlots; i++) {
    bool expected = false;
    if (!guardSlots[i].used.compare_exchange_strong(expected, true)) continue;
    guardSlots[i].length.store(length, std::memory_order_relaxed);
    guardSlots[i].prot.store(prot, std::memory_order_relaxed);
    guardSlots[i].start.store(reinterpret_cast<uintptr_t>(addr), std::memory_order_release);
    return static_cast<int>(i);
  }
  return -1;
}

void RetireGuardSlot(int slot) {
  if (slot < 0) return;
  guardSlots[slot].start.store(0, std::memory_order_release);
  guardSlots[slot].used.store(false, std::memory_order_release);
}

void RestoreDefaultBusAction() {
  struct sigaction dfl = {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(SIGBUS, &dfl, nullptr);
}

void OnSigbus(int sig, siginfo_t* info, void* context) {
  // si_code > 0: the kernel raised it for a memory access (not kill()/sigqueue()).
  if (info->si_code > 0) {
    uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
    for (size_t i = 0; i < kGuardSlots; i++) {
      uintptr_t start = guardSlots[i].start.load(std::memory_order_acquire);
      if (start == 0 || addr < start) continue;
      size_t length = guardSlots[i].length.load(std::memory_order_relaxed);
      if (addr - start >= length) continue;
      void* replaced = mmap(reinterpret_cast<void*>(start), length, guardSlots[i].prot.load(std::memory_order_relaxed),
                            MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (replaced == MAP_FAILED) break;  // out of memory: nothing safe left to do but die
      __atomic_add_fetch(&poisonCounts[i], 1, __ATOMIC_RELEASE);
      return;
    }
  }
  // Not ours: behave as if we had never been installed.
  if (previousBusAction.sa_flags & SA_SIGINFO) {
    if (previousBusAction.sa_sigaction) {
      previousBusAction.sa_sigaction(sig, info, context);
      return;
    }
  } else if (previousBusAction.sa_handler != SIG_DFL && previousBusAction.sa_handler != SIG_IGN) {
    previousBusAction.sa_handler(sig);
    return;
  }
  RestoreDefaultBusAction();
  // A fault repeats when the instruction retries; a sent signal must be raised again (it is
  // blocked while we run, so it lands right after we return).
  if (info->si_code <= 0) raise(sig);
}

void InstallSigbusGuard() {
  static std::once_flag installed;
  std::call_once(installed, [] {
    struct sigaction action = {};
    action.sa_sigaction = OnSigbus;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, &previousBusAction);
  });
}

// ---- mappings -----------------------------------------------------------------------------------

// One record per mapping, used as the ArrayBuffer finalizer hint. The
// registry (keyed by address) lets munmap() find it; the `unmapped` flag
// keeps a late finalizer from unmapping an unrelated mapping that the
// kernel placed at the same address after an explicit munmap().
struct Mapping {
  void* addr;
  size_t length;
  bool unmapped;
  int guardSlot;  // -1: not guarded (sealed against shrinking and the guard table was full)
};

// Addresses are process-wide, so the registry is too (workers share it).
std::mutex registryMutex;
std::unordered_map<void*, Mapping*> registry;

void Unmap(Mapping* m) {
  RetireGuardSlot(m->guardSlot);
  munmap(m->addr, m->length);
}

void FinalizeMapping(Napi::Env, void*, Mapping* m) {
  {
    std::lock_guard<std::mutex> lock(registryMutex);
    if (!m->unmapped) {
      registry.erase(m->addr);
      Unmap(m);
    }
  }
  delete m;
}

Napi::Value Mmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0, "fd");
  if (!info[1].IsBigInt()) throw Napi::TypeError::New(env, "offset must be a bigint");
  if (!info[2].IsNumber()) throw Napi::TypeError::New(env, "length must be a number");
  if (!info[3].IsBoolean()) throw Napi::TypeError::New(env, "writable must be a boolean");
  bool lossless = false;
  int64_t offset = info[1].As<Napi::BigInt>().Int64Value(&lossless);
  double length = info[2].As<Napi::Number>().DoubleValue();
  bool writable = info[3].As<Napi::Boolean>().Value();
  long page = sysconf(_SC_PAGESIZE);
  // Bounded by what an ArrayBuffer can describe in JS.
  if (!lossless || offset < 0 || offset % page != 0 || !(length > 0 && length <= 9007199254740991.0) ||
      std::floor(length) != length)
    throw ErrnoError(env, EINVAL, "mmap");

  int prot = PROT_READ | (writable ? PROT_WRITE : 0);
  void* addr = mmap(nullptr, static_cast<size_t>(length), prot, MAP_SHARED, fd, static_cast<off_t>(offset));
  if (addr == MAP_FAILED) throw ErrnoError(env, errno, "mmap");

  auto* m = new Mapping{addr, static_cast<size_t>(length), false, ClaimGuardSlot(addr, static_cast<size_t>(length), prot)};
  if (m->guardSlot < 0 && !SealedAgainstShrink(fd)) {
    // Unguarded memory that its owner can shrink would let that owner kill the process.
    munmap(addr, m->length);
    delete m;
    throw ErrnoError(env, ENOSPC, "mmap");
  }
  {
    std::lock_guard<std::mutex> lock(registryMutex);
    registry[addr] = m;
  }
  try {
    return Napi::ArrayBuffer::New(env, addr, m->length, FinalizeMapping, m);
  } catch (...) {
    std::lock_guard<std::mutex> lock(registryMutex);
    registry.erase(addr);
    Unmap(m);
    delete m;
    throw;
  }
}

Napi::Value Munmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsArrayBuffer()) throw Napi::TypeError::New(env, "buffer must be an ArrayBuffer");
  Napi::ArrayBuffer ab = info[0].As<Napi::ArrayBuffer>();
  void* addr = ab.Data();
  size_t length = ab.ByteLength();
  Mapping* m;
  {
    std::lock_guard<std::mutex> lock(registryMutex);
    auto it = (addr && length) ? registry.find(addr) : registry.end();
    if (it == registry.end() || it->second->length != length) throw ErrnoError(env, EINVAL, "munmap");
    m = it->second;
    registry.erase(it);
    m->unmapped = true;  // the finalizer still owns (and deletes) m
  }
  int guardSlot = m->guardSlot;
  // Detach before unmapping so no view can ever see unmapped memory. Detach
  // may run the finalizer synchronously, so m must not be used after it.
  try {
    ab.Detach();
  } catch (...) {
    std::lock_guard<std::mutex> lock(registryMutex);
    m->unmapped = false;
    registry[addr] = m;
    throw;
  }
  RetireGuardSlot(guardSlot);
  munmap(addr, length);
  return env.Undefined();
}

// The guard slot of a live mapping made by Mmap, or -1 if it has none.
Napi::Value GuardSlot(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsArrayBuffer()) throw Napi::TypeError::New(env, "buffer must be an ArrayBuffer");
  Napi::ArrayBuffer ab = info[0].As<Napi::ArrayBuffer>();
  std::lock_guard<std::mutex> lock(registryMutex);
  auto it = ab.ByteLength() ? registry.find(ab.Data()) : registry.end();
  if (it == registry.end()) throw ErrnoError(env, EINVAL, "guardSlot");
  return Napi::Number::New(env, it->second->guardSlot);
}

}  // namespace

bool FdSealedAgainstShrink(int fd) { return SealedAgainstShrink(fd); }

void InitMemory(Napi::Env env, Napi::Object exports, AddonData*) {
  InstallSigbusGuard();
  exports.Set("mmap", Napi::Function::New(env, Mmap, "mmap"));
  exports.Set("munmap", Napi::Function::New(env, Munmap, "munmap"));
  exports.Set("guardSlot", Napi::Function::New(env, GuardSlot, "guardSlot"));
  // Static storage that outlives every environment: no finalizer.
  Napi::ArrayBuffer counts = Napi::ArrayBuffer::New(env, poisonCounts, sizeof poisonCounts);
  exports.Set("poisonCounts", Napi::Uint32Array::New(env, kGuardSlots, counts, 0));
}

}  // namespace vfio
