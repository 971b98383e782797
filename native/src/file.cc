// Block-file operations Node's fs module lacks. Anything that may wait for a disk runs on the libuv
// threadpool (AsyncWorker) so a slow filesystem never stalls the event loop that serves the guest;
// the inline calls run on the event loop's thread only where they cannot wait for a disk: with
// RWF_NOWAIT (the kernel refuses rather than wait) or on a file that lives in memory.
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>

#include "common.h"

namespace vfio {
namespace {

// One blocking file operation on the threadpool: `op` runs on a duplicate of the caller's fd, so a
// close() on the JS side meanwhile cannot make it act on a closed or reused descriptor. It returns
// 0, or the errno and the name of the call that failed.
class FileOpWorker : public Napi::AsyncWorker {
 public:
  using Op = std::function<std::pair<int, const char*>(int fd)>;

  static Napi::Promise Queue(Napi::Env env, int fd, Op op) {
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0) {
      // A bad fd rejects like any other failure of the operation, not as a synchronous throw.
      auto failed = Napi::Promise::Deferred::New(env);
      failed.Reject(ErrnoError(env, errno, "dup").Value());
      return failed.Promise();
    }
    auto* worker = new FileOpWorker(env, own, std::move(op));
    Napi::Promise promise = worker->deferred_.Promise();
    worker->Napi::AsyncWorker::Queue();
    return promise;
  }

  ~FileOpWorker() override { close(fd_); }

  void Execute() override { result_ = op_(fd_); }

  void OnOK() override {
    if (result_.first != 0) {
      deferred_.Reject(ErrnoError(Env(), result_.first, result_.second).Value());
    } else {
      deferred_.Resolve(Env().Undefined());
    }
  }

  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  FileOpWorker(Napi::Env env, int fd, Op op)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), fd_(fd), op_(std::move(op)) {}

  Napi::Promise::Deferred deferred_;
  int fd_;
  Op op_;
  std::pair<int, const char*> result_{0, nullptr};
};

int64_t ArgNonNegative(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (info.Length() <= i || !info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a number");
  double value = info[i].As<Napi::Number>().DoubleValue();
  if (!(value >= 0) || value > 9007199254740991.0 || value != static_cast<double>(static_cast<int64_t>(value))) {
    throw Napi::RangeError::New(info.Env(), std::string(name) + " must be a non-negative safe integer");
  }
  return static_cast<int64_t>(value);
}

// fallocate(mode | KEEP_SIZE) over [offset, offset + length) on the threadpool. KEEP_SIZE: what a
// namespace does to its blocks must never change its size.
Napi::Value FallocateRange(const Napi::CallbackInfo& info, int mode) {
  int fd = ArgFd(info, 0, "fd");
  int64_t offset = ArgNonNegative(info, 1, "offset");
  int64_t length = ArgNonNegative(info, 2, "length");
  if (length == 0) throw Napi::RangeError::New(info.Env(), "length must be positive");
  return FileOpWorker::Queue(info.Env(), fd, [mode, offset, length](int own) -> std::pair<int, const char*> {
    if (fallocate(own, mode | FALLOC_FL_KEEP_SIZE, offset, length) != 0) return {errno, "fallocate"};
    return {0, nullptr};
  });
}

// Deallocates a range (Dataset Management, Write Zeroes with DEAC): it then reads as zeros.
Napi::Value PunchHole(const Napi::CallbackInfo& info) { return FallocateRange(info, FALLOC_FL_PUNCH_HOLE); }

// Zeroes a range without writing data (unwritten extents on ext4 and XFS), as QEMU's file driver
// serves Write Zeroes; the blocks stay allocated, so a later write to them cannot fail for lack of space.
Napi::Value ZeroRange(const Napi::CallbackInfo& info) { return FallocateRange(info, FALLOC_FL_ZERO_RANGE); }

// Writes the file's dirty pages back, then drops its clean pages from the page cache, so the next
// reads come from storage: after a migration another host may have written the file (shared
// storage), and what this host cached is stale. The kernel keeps pages that are dirty, locked or
// mapped; none are, after the fdatasync, for a file we only read and write.
Napi::Value DropPageCache(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0, "fd");
  return FileOpWorker::Queue(info.Env(), fd, [](int own) -> std::pair<int, const char*> {
    if (fdatasync(own) != 0) return {errno, "fdatasync"};
    // posix_fadvise returns its error number instead of setting errno.
    int err = posix_fadvise(own, 0, 0, POSIX_FADV_DONTNEED);
    if (err != 0) return {err, "posix_fadvise"};
    return {0, nullptr};
  });
}

// At most this many buffers per call (Linux's UIO_MAXIOV); the caller continues after a short count.
constexpr size_t kMaxIov = 1024;

// preadv2/pwritev2 on this thread, with RWF_NOWAIT when asked: bytes transferred (maybe short), -1
// when the kernel would have to wait (not in the page cache, writeback throttling), -2 when the file
// or kernel does not offer RWF_NOWAIT for this direction. Other errors throw, with .code as node's
// fs does.
Napi::Value VectoredInline(const Napi::CallbackInfo& info, bool write) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0, "fd");
  if (info.Length() <= 1 || !info[1].IsArray()) throw Napi::TypeError::New(env, "views must be an array");
  int64_t offset = ArgNonNegative(info, 2, "offset");
  if (info.Length() <= 3 || !info[3].IsBoolean()) throw Napi::TypeError::New(env, "noWait must be a boolean");
  int flags = info[3].As<Napi::Boolean>().Value() ? RWF_NOWAIT : 0;
  Napi::Array views = info[1].As<Napi::Array>();
  size_t count = std::min<size_t>(views.Length(), kMaxIov);
  struct iovec iov[kMaxIov];
  for (size_t i = 0; i < count; i++) {
    Napi::Value v = views.Get(static_cast<uint32_t>(i));
    if (!v.IsTypedArray()) throw Napi::TypeError::New(env, "views must be Uint8Arrays");
    Napi::TypedArray t = v.As<Napi::TypedArray>();
    // A detached buffer (its mapping was removed) has no data: refuse it like a bad address.
    uint8_t* base = static_cast<uint8_t*>(t.ArrayBuffer().Data());
    if (base == nullptr && t.ByteLength() > 0) throw ErrnoError(env, EFAULT, write ? "pwritev2" : "preadv2");
    iov[i].iov_base = base + t.ByteOffset();
    iov[i].iov_len = t.ByteLength();
  }
  ssize_t n;
  do {
    n = write ? pwritev2(fd, iov, static_cast<int>(count), offset, flags)
              : preadv2(fd, iov, static_cast<int>(count), offset, flags);
  } while (n < 0 && errno == EINTR);
  if (n >= 0) return Napi::Number::New(env, static_cast<double>(n));
  if (errno == EAGAIN) return Napi::Number::New(env, -1);
  if (errno == EOPNOTSUPP || errno == ENOSYS) return Napi::Number::New(env, -2);
  throw ErrnoError(env, errno, write ? "pwritev2" : "preadv2");
}

Napi::Value PreadvInline(const Napi::CallbackInfo& info) { return VectoredInline(info, false); }
Napi::Value PwritevInline(const Napi::CallbackInfo& info) { return VectoredInline(info, true); }

// tmpfs, ramfs and hugetlbfs keep their files in memory: a transfer is a copy and never waits for a
// disk (short of swap, which guest RAM itself is exposed to).
Napi::Value MemoryBackedFile(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0, "fd");
  struct statfs st;
  if (fstatfs(fd, &st) != 0) throw ErrnoError(info.Env(), errno, "fstatfs");
  auto type = static_cast<unsigned long>(st.f_type);
  return Napi::Boolean::New(info.Env(), type == TMPFS_MAGIC || type == RAMFS_MAGIC || type == HUGETLBFS_MAGIC);
}

// statx(STATX_DIOALIGN), Linux 6.1: what O_DIRECT transfers on `fd` must align to, memory
// addresses and file offsets (and lengths). Zeros where the file system does not say (tmpfs, whose
// O_DIRECT is a plain copy, or an older kernel).
Napi::Value DirectIoAlignment(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0, "fd");
  struct statx st;
  if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &st) != 0) throw ErrnoError(env, errno, "statx");
  bool known = (st.stx_mask & STATX_DIOALIGN) != 0;
  Napi::Object out = Napi::Object::New(env);
  out.Set("memory", Napi::Number::New(env, known ? st.stx_dio_mem_align : 0));
  out.Set("offset", Napi::Number::New(env, known ? st.stx_dio_offset_align : 0));
  return out;
}

uint32_t ArgPowerOfTwo(const Napi::CallbackInfo& info, size_t i, const char* name) {
  int64_t value = ArgNonNegative(info, i, name);
  if (value == 0 || value > (1 << 20) || (value & (value - 1)) != 0) {
    throw Napi::RangeError::New(info.Env(), std::string(name) + " must be a power of two up to 1 MiB");
  }
  return static_cast<uint32_t>(value);
}

// Whether every view starts at an address that is a multiple of `memory` and is a multiple of
// `length` bytes long, as O_DIRECT needs of each buffer (JS cannot see the addresses). An empty
// view (a detached one is empty) transfers nothing and does not count.
Napi::Value AlignedForDirectIo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsArray()) throw Napi::TypeError::New(env, "views must be an array");
  uint32_t memory = ArgPowerOfTwo(info, 1, "memory");
  uint32_t length = ArgPowerOfTwo(info, 2, "length");
  Napi::Array views = info[0].As<Napi::Array>();
  for (uint32_t i = 0; i < views.Length(); i++) {
    Napi::Value v = views.Get(i);
    if (!v.IsTypedArray()) throw Napi::TypeError::New(env, "views must be Uint8Arrays");
    Napi::TypedArray t = v.As<Napi::TypedArray>();
    if (t.ByteLength() == 0) continue;
    auto* base = static_cast<uint8_t*>(t.ArrayBuffer().Data());
    if (base == nullptr) return Napi::Boolean::New(env, false);
    auto address = reinterpret_cast<uintptr_t>(base + t.ByteOffset());
    if ((address & (memory - 1)) != 0 || (t.ByteLength() & (length - 1)) != 0) return Napi::Boolean::New(env, false);
  }
  return Napi::Boolean::New(env, true);
}

// A zeroed ArrayBuffer of `size` bytes whose memory starts at a multiple of `alignment`: the bounce
// buffer of an O_DIRECT transfer whose guest buffers are not aligned. Freed when collected.
Napi::Value AlignedBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t size = ArgNonNegative(info, 0, "size");
  uint32_t alignment = std::max<uint32_t>(ArgPowerOfTwo(info, 1, "alignment"), sizeof(void*));
  if (size == 0 || size > (int64_t{1} << 30)) throw Napi::RangeError::New(env, "size must be 1 byte to 1 GiB");
  void* memory = nullptr;
  int err = posix_memalign(&memory, alignment, static_cast<size_t>(size));
  if (err != 0) throw ErrnoError(env, err, "posix_memalign");
  std::memset(memory, 0, static_cast<size_t>(size));
  return Napi::ArrayBuffer::New(env, memory, static_cast<size_t>(size), [](Napi::Env, void* data) { std::free(data); });
}

}  // namespace

void InitFile(Napi::Env env, Napi::Object exports) {
  exports.Set("punchHole", Napi::Function::New(env, PunchHole, "punchHole"));
  exports.Set("zeroRange", Napi::Function::New(env, ZeroRange, "zeroRange"));
  exports.Set("dropPageCache", Napi::Function::New(env, DropPageCache, "dropPageCache"));
  exports.Set("preadvInline", Napi::Function::New(env, PreadvInline, "preadvInline"));
  exports.Set("pwritevInline", Napi::Function::New(env, PwritevInline, "pwritevInline"));
  exports.Set("memoryBackedFile", Napi::Function::New(env, MemoryBackedFile, "memoryBackedFile"));
  exports.Set("directIoAlignment", Napi::Function::New(env, DirectIoAlignment, "directIoAlignment"));
  exports.Set("alignedForDirectIo", Napi::Function::New(env, AlignedForDirectIo, "alignedForDirectIo"));
  exports.Set("alignedBuffer", Napi::Function::New(env, AlignedBuffer, "alignedBuffer"));
}

}  // namespace vfio
