// Module entry point, shared helpers, and small fd utilities.
#include "common.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>

namespace vfio {

int kInternalToken = 0;

bool IsInternalCall(const Napi::CallbackInfo& info) {
  return info.Length() > 0 && info[0].IsExternal() &&
         info[0].As<Napi::External<int>>().Data() == &kInternalToken;
}

const char* ErrnoName(int err) {
  const char* name = strerrorname_np(err);
  return name ? name : "EUNKNOWN";
}

Napi::Error ErrnoError(Napi::Env env, int err, const char* syscall, const std::string& path) {
  std::string msg = std::string(syscall) + " " + ErrnoName(err);
  if (!path.empty()) msg += " " + path;
  msg += std::string(": ") + strerror(err);
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, ErrnoName(err)));
  e.Set("errno", Napi::Number::New(env, -err));
  e.Set("syscall", Napi::String::New(env, syscall));
  if (!path.empty()) e.Set("path", Napi::String::New(env, path));
  return e;
}

int ArgFd(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Value v = info[i];
  if (!v.IsNumber()) throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 0x7fffffff) || std::floor(d) != d)
    throw Napi::RangeError::New(info.Env(), std::string(name) + " must be a non-negative integer fd");
  return static_cast<int>(d);
}

std::string ArgString(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsString()) throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a string");
  return info[i].As<Napi::String>().Utf8Value();
}

Napi::Function ArgFunction(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsFunction()) throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a function");
  return info[i].As<Napi::Function>();
}

void InvokeCallback(Napi::Env env, Napi::Object recv, Napi::Function fn, Napi::AsyncContext& ctx,
                    const std::initializer_list<napi_value>& args) {
  try {
    fn.MakeCallback(recv, args, ctx);
  } catch (const Napi::Error& e) {
    napi_fatal_exception(env, e.Value());
  }
}

uv_loop_t* GetLoop(Napi::Env env) {
  uv_loop_t* loop = nullptr;
  NAPI_THROW_IF_FAILED(env, napi_get_uv_event_loop(env, &loop), nullptr);
  return loop;
}

void ClosePoll(uv_poll_t* poll) {
  poll->data = nullptr;
  uv_close(reinterpret_cast<uv_handle_t*>(poll), [](uv_handle_t* h) { delete reinterpret_cast<uv_poll_t*>(h); });
}

namespace {

Napi::Value Eventfd(const Napi::CallbackInfo& info) {
  unsigned initial = 0;
  if (info.Length() > 0 && !info[0].IsUndefined()) {
    if (!info[0].IsNumber()) throw Napi::TypeError::New(info.Env(), "initial must be a number");
    double d = info[0].As<Napi::Number>().DoubleValue();
    if (!(d >= 0 && d <= 0xffffffffu) || std::floor(d) != d)
      throw Napi::RangeError::New(info.Env(), "initial must be an integer in [0, 2^32)");
    initial = static_cast<unsigned>(d);
  }
  int fd = eventfd(initial, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) throw ErrnoError(info.Env(), errno, "eventfd");
  return Napi::Number::New(info.Env(), fd);
}

Napi::Value EventfdWrite(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0, "fd");
  uint64_t value = 1;
  if (info.Length() > 1 && !info[1].IsUndefined()) {
    if (!info[1].IsBigInt()) throw Napi::TypeError::New(info.Env(), "value must be a bigint");
    bool lossless = false;
    value = info[1].As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) throw Napi::RangeError::New(info.Env(), "value must fit in 64 unsigned bits");
  }
  ssize_t n;
  do n = write(fd, &value, sizeof value); while (n < 0 && errno == EINTR);
  if (n < 0) throw ErrnoError(info.Env(), errno, "write");
  return info.Env().Undefined();
}

Napi::Value EventfdRead(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0, "fd");
  uint64_t value = 0;
  ssize_t n;
  do n = read(fd, &value, sizeof value); while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return Napi::BigInt::New(info.Env(), static_cast<uint64_t>(0));
    throw ErrnoError(info.Env(), errno, "read");
  }
  if (n != sizeof value) throw ErrnoError(info.Env(), EINVAL, "read");
  return Napi::BigInt::New(info.Env(), value);
}

// CLOCK_MONOTONIC, non-blocking: Node's timers count whole milliseconds, NVMe's Aggregation Time
// counts 100 µs. Read it (eventfdRead reads the same 8 bytes) to clear it once it fires.
Napi::Value TimerfdCreate(const Napi::CallbackInfo& info) {
  int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (fd < 0) throw ErrnoError(info.Env(), errno, "timerfd_create");
  return Napi::Number::New(info.Env(), fd);
}

// timerfdArm(fd, us): fires once, `us` microseconds from now; 0 disarms.
Napi::Value TimerfdArm(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0, "fd");
  if (info.Length() < 2 || !info[1].IsNumber()) throw Napi::TypeError::New(info.Env(), "us must be a number");
  double us = info[1].As<Napi::Number>().DoubleValue();
  if (!(us >= 0) || us > 3600e6) throw Napi::RangeError::New(info.Env(), "us must be from 0 to an hour");
  itimerspec spec{};
  auto ns = static_cast<int64_t>(us * 1000);
  spec.it_value.tv_sec = ns / 1000000000;
  spec.it_value.tv_nsec = ns % 1000000000;
  // A positive time below 1 ns would read as "disarm".
  if (us > 0 && ns == 0) spec.it_value.tv_nsec = 1;
  if (timerfd_settime(fd, 0, &spec, nullptr) != 0) throw ErrnoError(info.Env(), errno, "timerfd_settime");
  return info.Env().Undefined();
}

Napi::Value MemfdCreate(const Napi::CallbackInfo& info) {
  std::string name = ArgString(info, 0, "name");
  if (!info[1].IsNumber()) throw Napi::TypeError::New(info.Env(), "size must be a number");
  double size = info[1].As<Napi::Number>().DoubleValue();
  if (!(size >= 0 && size <= 9007199254740991.0) || std::floor(size) != size)
    throw Napi::RangeError::New(info.Env(), "size must be a non-negative integer");
  bool sealed = info.Length() > 2 && info[2].IsBoolean() && info[2].As<Napi::Boolean>().Value();
  int fd = memfd_create(name.c_str(), MFD_CLOEXEC | (sealed ? MFD_ALLOW_SEALING : 0));
  if (fd < 0) throw ErrnoError(info.Env(), errno, "memfd_create", name);
  if (ftruncate(fd, static_cast<off_t>(size)) < 0) {
    int err = errno;
    close(fd);
    throw ErrnoError(info.Env(), err, "ftruncate", name);
  }
  // What QEMU's memory-backend-memfd does by default: the size is final.
  if (sealed && fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
    int err = errno;
    close(fd);
    throw ErrnoError(info.Env(), err, "fcntl", name);
  }
  return Napi::Number::New(info.Env(), fd);
}

Napi::Value CloseFd(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0, "fd");
  // Linux always releases the fd, even on EINTR, so never retry.
  if (close(fd) < 0 && errno != EINTR) throw ErrnoError(info.Env(), errno, "close");
  return info.Env().Undefined();
}

// Size and the block size mappings must align to (2 MiB on hugetlbfs, the page size elsewhere).
Napi::Value FdStat(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0, "fd");
  struct stat st;
  if (fstat(fd, &st) < 0) throw ErrnoError(info.Env(), errno, "fstat");
  Napi::Object out = Napi::Object::New(info.Env());
  out.Set("size", Napi::Number::New(info.Env(), static_cast<double>(st.st_size)));
  out.Set("blockSize", Napi::Number::New(info.Env(), static_cast<double>(st.st_blksize)));
  out.Set("shrinkSealed", Napi::Boolean::New(info.Env(), FdSealedAgainstShrink(fd)));
  return out;
}

Napi::Value PageSize(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(sysconf(_SC_PAGESIZE)));
}

// A poller gives way to whatever else is runnable on its CPU (a guest's vCPU threads on a small
// host), and carries on at once when nothing is.
Napi::Value YieldCpu(const Napi::CallbackInfo& info) {
  sched_yield();
  return info.Env().Undefined();
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  env.SetInstanceData(data);
  exports.Set("eventfd", Napi::Function::New(env, Eventfd, "eventfd"));
  exports.Set("eventfdWrite", Napi::Function::New(env, EventfdWrite, "eventfdWrite"));
  exports.Set("eventfdRead", Napi::Function::New(env, EventfdRead, "eventfdRead"));
  exports.Set("timerfdCreate", Napi::Function::New(env, TimerfdCreate, "timerfdCreate"));
  exports.Set("timerfdArm", Napi::Function::New(env, TimerfdArm, "timerfdArm"));
  exports.Set("memfdCreate", Napi::Function::New(env, MemfdCreate, "memfdCreate"));
  exports.Set("closeFd", Napi::Function::New(env, CloseFd, "closeFd"));
  exports.Set("fdStat", Napi::Function::New(env, FdStat, "fdStat"));
  exports.Set("pageSize", Napi::Function::New(env, PageSize, "pageSize"));
  exports.Set("yieldCpu", Napi::Function::New(env, YieldCpu, "yieldCpu"));
  InitSocket(env, exports, data);
  InitMemory(env, exports, data);
  InitFile(env, exports);
  InitUring(env, exports);
  return exports;
}

}  // namespace vfio

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return vfio::Init(env, exports); }
NODE_API_MODULE(vfio_native, InitModule)
