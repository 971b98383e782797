// Block-file operations Node's fs module lacks. Anything that may wait for a disk runs on the libuv
// threadpool (AsyncWorker) so a slow filesystem never stalls the event loop that serves the guest;
// the inline calls run on the event loop's thread only where they cannot wait for a disk: with
// RWF_NOWAIT (the kernel refuses rather than wait) or on a file that lives in memory.
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/magic.h>
#include <sys/statfs.h>
#include <sys/uio.h>

#include <cerrno>
#include <algorithm>
#include <cstdint>

#include "common.h"

namespace vfio {
namespace {

class PunchHoleWorker : public Napi::AsyncWorker {
 public:
  PunchHoleWorker(Napi::Env env, int fd, int64_t offset, int64_t length)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), fd_(fd), offset_(offset), length_(length) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    // KEEP_SIZE: discarding blocks must never change the namespace's size.
    if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset_, length_) != 0) errno_ = errno;
  }

  void OnOK() override {
    if (errno_ != 0) {
      deferred_.Reject(ErrnoError(Env(), errno_, "fallocate").Value());
    } else {
      deferred_.Resolve(Env().Undefined());
    }
  }

  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  int fd_;
  int64_t offset_;
  int64_t length_;
  int errno_ = 0;
};

int64_t ArgNonNegative(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (info.Length() <= i || !info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a number");
  double value = info[i].As<Napi::Number>().DoubleValue();
  if (!(value >= 0) || value > 9007199254740991.0 || value != static_cast<double>(static_cast<int64_t>(value))) {
    throw Napi::RangeError::New(info.Env(), std::string(name) + " must be a non-negative safe integer");
  }
  return static_cast<int64_t>(value);
}

Napi::Value PunchHole(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0, "fd");
  int64_t offset = ArgNonNegative(info, 1, "offset");
  int64_t length = ArgNonNegative(info, 2, "length");
  if (length == 0) throw Napi::RangeError::New(info.Env(), "length must be positive");
  auto* worker = new PunchHoleWorker(info.Env(), fd, offset, length);
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
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

}  // namespace

void InitFile(Napi::Env env, Napi::Object exports) {
  exports.Set("punchHole", Napi::Function::New(env, PunchHole, "punchHole"));
  exports.Set("preadvInline", Napi::Function::New(env, PreadvInline, "preadvInline"));
  exports.Set("pwritevInline", Napi::Function::New(env, PwritevInline, "pwritevInline"));
  exports.Set("memoryBackedFile", Napi::Function::New(env, MemoryBackedFile, "memoryBackedFile"));
}

}  // namespace vfio
