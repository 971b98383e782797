// mmap/munmap exposed as zero-copy external ArrayBuffers.
#include "common.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <mutex>
#include <unordered_map>

namespace vfio {
namespace {

// One record per mapping, used as the ArrayBuffer finalizer hint. The
// registry (keyed by address) lets munmap() find it; the `unmapped` flag
// keeps a late finalizer from unmapping an unrelated mapping that the
// kernel placed at the same address after an explicit munmap().
struct Mapping {
  void* addr;
  size_t length;
  bool unmapped;
};

// Addresses are process-wide, so the registry is too (workers share it).
std::mutex registryMutex;
std::unordered_map<void*, Mapping*> registry;

void FinalizeMapping(Napi::Env, void*, Mapping* m) {
  {
    std::lock_guard<std::mutex> lock(registryMutex);
    if (!m->unmapped) {
      registry.erase(m->addr);
      munmap(m->addr, m->length);
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

  auto* m = new Mapping{addr, static_cast<size_t>(length), false};
  {
    std::lock_guard<std::mutex> lock(registryMutex);
    registry[addr] = m;
  }
  try {
    return Napi::ArrayBuffer::New(env, addr, m->length, FinalizeMapping, m);
  } catch (...) {
    std::lock_guard<std::mutex> lock(registryMutex);
    registry.erase(addr);
    munmap(addr, m->length);
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
  munmap(addr, length);
  return env.Undefined();
}

}  // namespace

void InitMemory(Napi::Env env, Napi::Object exports, AddonData*) {
  exports.Set("mmap", Napi::Function::New(env, Mmap, "mmap"));
  exports.Set("munmap", Napi::Function::New(env, Munmap, "munmap"));
}

}  // namespace vfio
