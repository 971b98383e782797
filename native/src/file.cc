// Block-file operations Node's fs module lacks. They run on the libuv threadpool (AsyncWorker) so a
// slow filesystem never stalls the event loop that serves the guest.
#include <fcntl.h>
#include <linux/falloc.h>

#include <cerrno>
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

}  // namespace

void InitFile(Napi::Env env, Napi::Object exports) {
  exports.Set("punchHole", Napi::Function::New(env, PunchHole, "punchHole"));
}

}  // namespace vfio
