// An io_uring of our own for file I/O that may wait for a disk, instead of libuv's threadpool: the
// event loop queues readv/writev/fdatasync entries, submits them with one io_uring_enter per batch,
// and learns of completions through an eventfd it polls like any other fd. No SQPOLL thread (it
// would spin a core per ring); what the kernel cannot do without blocking it finishes on its own
// io-wq workers. Raw syscalls, no liburing: a fresh machine has the kernel headers, not liburing.
//
// The ring never touches JS objects outside a call: each entry's iovec array is copied into storage
// kept per tag until that tag completes, and the JS side keeps the views (and so their memory)
// alive until it reaps the tag.
#include <linux/io_uring.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace vfio {
namespace {

int SysSetup(unsigned entries, io_uring_params* p) { return static_cast<int>(syscall(__NR_io_uring_setup, entries, p)); }
int SysEnter(int fd, unsigned toSubmit, unsigned minComplete, unsigned flags) {
  return static_cast<int>(syscall(__NR_io_uring_enter, fd, toSubmit, minComplete, flags, nullptr, 0));
}
int SysRegister(int fd, unsigned opcode, const void* arg, unsigned count) {
  return static_cast<int>(syscall(__NR_io_uring_register, fd, opcode, arg, count));
}

// What JS asks for; the io_uring opcodes themselves stay in this file.
enum class RingOp : uint32_t { kReadv = 0, kWritev = 1, kDatasync = 2 };

// At most this many buffers per entry (Linux's UIO_MAXIOV); JS continues after a short count.
constexpr size_t kMaxIov = 1024;
constexpr unsigned kMaxEntries = 4096;

template <typename T>
T* At(void* base, uint32_t offset) {
  return reinterpret_cast<T*>(static_cast<uint8_t*>(base) + offset);
}

class IoRing : public Napi::ObjectWrap<IoRing> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "IoRing",
                       {InstanceMethod<&IoRing::Queue>("queue"), InstanceMethod<&IoRing::Submit>("submit"),
                        InstanceMethod<&IoRing::Reap>("reap"), InstanceMethod<&IoRing::Close>("close"),
                        InstanceAccessor<&IoRing::EventFd>("eventFd")});
  }

  // new IoRing(sqEntries): the CQ holds 8 times as many, and the kernel keeps what overflows it.
  explicit IoRing(const Napi::CallbackInfo& info) : Napi::ObjectWrap<IoRing>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "entries must be a number");
    unsigned entries = info[0].As<Napi::Number>().Uint32Value();
    if (entries == 0 || entries > kMaxEntries || (entries & (entries - 1)) != 0)
      throw Napi::RangeError::New(env, "entries must be a power of two up to 4096");
    io_uring_params p;
    std::memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = entries * 8;
    ringFd_ = SysSetup(entries, &p);
    if (ringFd_ < 0) throw ErrnoError(env, errno, "io_uring_setup");
    if ((p.features & IORING_FEAT_NODROP) == 0) {
      Teardown();
      throw ErrnoError(env, ENOTSUP, "io_uring_setup");
    }
    sqSize_ = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
    cqSize_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) sqSize_ = cqSize_ = std::max(sqSize_, cqSize_);
    sqMap_ = mmap(nullptr, sqSize_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ringFd_, IORING_OFF_SQ_RING);
    if (sqMap_ == MAP_FAILED) Fail(env, "mmap");
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
      cqMap_ = sqMap_;
    } else {
      cqMap_ = mmap(nullptr, cqSize_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ringFd_, IORING_OFF_CQ_RING);
      if (cqMap_ == MAP_FAILED) Fail(env, "mmap");
    }
    sqesSize_ = p.sq_entries * sizeof(io_uring_sqe);
    sqes_ = static_cast<io_uring_sqe*>(mmap(nullptr, sqesSize_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ringFd_, IORING_OFF_SQES));
    if (sqes_ == MAP_FAILED) Fail(env, "mmap");
    sqHead_ = At<std::atomic<uint32_t>>(sqMap_, p.sq_off.head);
    sqTail_ = At<std::atomic<uint32_t>>(sqMap_, p.sq_off.tail);
    sqFlags_ = At<std::atomic<uint32_t>>(sqMap_, p.sq_off.flags);
    sqMask_ = *At<uint32_t>(sqMap_, p.sq_off.ring_mask);
    sqEntries_ = p.sq_entries;
    sqArray_ = At<uint32_t>(sqMap_, p.sq_off.array);
    cqHead_ = At<std::atomic<uint32_t>>(cqMap_, p.cq_off.head);
    cqTail_ = At<std::atomic<uint32_t>>(cqMap_, p.cq_off.tail);
    cqMask_ = *At<uint32_t>(cqMap_, p.cq_off.ring_mask);
    cqes_ = At<io_uring_cqe>(cqMap_, p.cq_off.cqes);
    localTail_ = sqTail_->load(std::memory_order_relaxed);
    eventFd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (eventFd_ < 0) Fail(env, "eventfd");
    if (SysRegister(ringFd_, IORING_REGISTER_EVENTFD, &eventFd_, 1) < 0) Fail(env, "io_uring_register");
  }

  ~IoRing() override { Teardown(); }

 private:
  void Fail(Napi::Env env, const char* syscall) {
    int err = errno;
    Teardown();
    throw ErrnoError(env, err, syscall);
  }

  void Teardown() {
    if (sqes_ && sqes_ != MAP_FAILED) munmap(sqes_, sqesSize_);
    if (cqMap_ && cqMap_ != MAP_FAILED && cqMap_ != sqMap_) munmap(cqMap_, cqSize_);
    if (sqMap_ && sqMap_ != MAP_FAILED) munmap(sqMap_, sqSize_);
    sqes_ = nullptr;
    cqMap_ = sqMap_ = nullptr;
    // Closing the ring lets the kernel finish or cancel what is in flight on its own.
    if (ringFd_ >= 0) close(ringFd_);
    if (eventFd_ >= 0) close(eventFd_);
    ringFd_ = eventFd_ = -1;
  }

  void CheckOpen(Napi::Env env) {
    if (ringFd_ < 0) throw Napi::Error::New(env, "the ring is closed");
  }

  // queue(op, fd, views, offset, tag): true once the entry is in the SQ (submitted by submit()),
  // false when the SQ is full (submit, then queue again). EFAULT for a detached view.
  Napi::Value Queue(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    if (info.Length() < 5 || !info[0].IsNumber() || !info[4].IsNumber()) throw Napi::TypeError::New(env, "queue(op, fd, views, offset, tag)");
    auto op = static_cast<RingOp>(info[0].As<Napi::Number>().Uint32Value());
    int fd = ArgFd(info, 1, "fd");
    double offsetValue = info[3].IsNumber() ? info[3].As<Napi::Number>().DoubleValue() : -1;
    if (!(offsetValue >= 0) || offsetValue > 9007199254740991.0) throw Napi::RangeError::New(env, "offset must be a non-negative safe integer");
    uint32_t tag = info[4].As<Napi::Number>().Uint32Value();
    if (tag >= kMaxEntries * 8) throw Napi::RangeError::New(env, "tag out of range");
    if (localTail_ - sqHead_->load(std::memory_order_acquire) >= sqEntries_) return Napi::Boolean::New(env, false);

    io_uring_sqe* sqe = &sqes_[localTail_ & sqMask_];
    std::memset(sqe, 0, sizeof *sqe);
    sqe->fd = fd;
    sqe->user_data = tag;
    if (op == RingOp::kDatasync) {
      sqe->opcode = IORING_OP_FSYNC;
      sqe->fsync_flags = IORING_FSYNC_DATASYNC;
    } else if (op == RingOp::kReadv || op == RingOp::kWritev) {
      if (!info[2].IsArray()) throw Napi::TypeError::New(env, "views must be an array");
      Napi::Array views = info[2].As<Napi::Array>();
      size_t count = std::min<size_t>(views.Length(), kMaxIov);
      if (iovecs_.size() <= tag) iovecs_.resize(tag + 1);
      std::vector<iovec>& iov = iovecs_[tag];
      iov.resize(count);
      for (size_t i = 0; i < count; i++) {
        Napi::Value v = views.Get(static_cast<uint32_t>(i));
        if (!v.IsTypedArray()) throw Napi::TypeError::New(env, "views must be Uint8Arrays");
        Napi::TypedArray t = v.As<Napi::TypedArray>();
        uint8_t* base = static_cast<uint8_t*>(t.ArrayBuffer().Data());
        if (base == nullptr && t.ByteLength() > 0) throw ErrnoError(env, EFAULT, op == RingOp::kWritev ? "pwritev2" : "preadv2");
        iov[i].iov_base = base + t.ByteOffset();
        iov[i].iov_len = t.ByteLength();
      }
      sqe->opcode = op == RingOp::kWritev ? IORING_OP_WRITEV : IORING_OP_READV;
      sqe->addr = reinterpret_cast<uint64_t>(iov.data());
      sqe->len = static_cast<uint32_t>(count);
      sqe->off = static_cast<uint64_t>(offsetValue);
    } else {
      throw Napi::RangeError::New(env, "op must be 0 (readv), 1 (writev) or 2 (fdatasync)");
    }
    sqArray_[localTail_ & sqMask_] = localTail_ & sqMask_;
    localTail_++;
    sqTail_->store(localTail_, std::memory_order_release);
    return Napi::Boolean::New(env, true);
  }

  // submit(): hands every queued entry to the kernel; the number it took.
  Napi::Value Submit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    unsigned pending = localTail_ - sqHead_->load(std::memory_order_acquire);
    if (pending == 0) return Napi::Number::New(env, 0);
    int n;
    do n = SysEnter(ringFd_, pending, 0, 0);
    while (n < 0 && errno == EINTR);
    // EAGAIN/EBUSY: the kernel is short of memory or its overflow list is full; the entries stay
    // queued and the next submit (after a reap) retries them.
    if (n < 0 && (errno == EAGAIN || errno == EBUSY)) return Napi::Number::New(env, 0);
    if (n < 0) throw ErrnoError(env, errno, "io_uring_enter");
    return Napi::Number::New(env, n);
  }

  // reap(out: Float64Array): drains the eventfd, then writes (tag, result) pairs of completed
  // entries into `out` (a negative result is -errno); the number of pairs. Call again while it
  // fills `out`.
  Napi::Value Reap(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    if (info.Length() < 1 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
      throw Napi::TypeError::New(env, "out must be a Float64Array");
    Napi::Float64Array out = info[0].As<Napi::Float64Array>();
    size_t room = out.ElementLength() / 2;
    uint64_t ignored;
    while (read(eventFd_, &ignored, sizeof ignored) < 0 && errno == EINTR) {
    }
    size_t n = 0;
    for (int pass = 0; pass < 2 && n < room; pass++) {
      uint32_t head = cqHead_->load(std::memory_order_relaxed);
      uint32_t tail = cqTail_->load(std::memory_order_acquire);
      while (head != tail && n < room) {
        const io_uring_cqe& cqe = cqes_[head & cqMask_];
        out[2 * n] = static_cast<double>(cqe.user_data);
        out[2 * n + 1] = static_cast<double>(cqe.res);
        n++;
        head++;
      }
      cqHead_->store(head, std::memory_order_release);
      // Completions the full CQ could not take wait on the kernel's overflow list; entering the
      // kernel moves them into the room just made.
      if (n < room && (sqFlags_->load(std::memory_order_acquire) & IORING_SQ_CQ_OVERFLOW)) {
        SysEnter(ringFd_, 0, 0, IORING_ENTER_GETEVENTS);
      } else {
        break;
      }
    }
    return Napi::Number::New(env, static_cast<double>(n));
  }

  Napi::Value EventFd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), eventFd_); }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    Teardown();
    return info.Env().Undefined();
  }

  int ringFd_ = -1;
  int eventFd_ = -1;
  void* sqMap_ = nullptr;
  void* cqMap_ = nullptr;
  size_t sqSize_ = 0;
  size_t cqSize_ = 0;
  size_t sqesSize_ = 0;
  io_uring_sqe* sqes_ = nullptr;
  std::atomic<uint32_t>* sqHead_ = nullptr;
  std::atomic<uint32_t>* sqTail_ = nullptr;
  std::atomic<uint32_t>* sqFlags_ = nullptr;
  uint32_t sqMask_ = 0;
  uint32_t sqEntries_ = 0;
  uint32_t* sqArray_ = nullptr;
  uint32_t localTail_ = 0;
  std::atomic<uint32_t>* cqHead_ = nullptr;
  std::atomic<uint32_t>* cqTail_ = nullptr;
  uint32_t cqMask_ = 0;
  io_uring_cqe* cqes_ = nullptr;
  // Per tag, the iovec array of its entry, kept until it completes.
  std::vector<std::vector<iovec>> iovecs_;
};

}  // namespace

void InitUring(Napi::Env env, Napi::Object exports) { exports.Set("IoRing", IoRing::Define(env)); }

}  // namespace vfio
