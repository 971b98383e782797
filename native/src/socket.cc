// AF_UNIX stream sockets with SCM_RIGHTS, plus a generic fd readiness
// watcher, all driven by uv_poll on the Node event loop.
#include "common.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <memory>
#include <vector>

namespace vfio {
namespace {

constexpr size_t kReadBufferSize = 256 * 1024;
constexpr int kMaxFds = 253;  // SCM_MAX_FD
constexpr int kMaxReadsPerEvent = 64;

void CloseFds(std::vector<int>& fds) {
  for (int fd : fds) close(fd);
  fds.clear();
}

sockaddr_un MakeAddress(Napi::Env env, const std::string& path, const char* syscall) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path) throw ErrnoError(env, ENAMETOOLONG, syscall, path);
  memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return addr;
}

// One sendmsg; fds (if any) ride on the first byte.
ssize_t SendMsg(int sock, const uint8_t* data, size_t len, const std::vector<int>& fds) {
  iovec iov{const_cast<uint8_t*>(data), len};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control;
  if (!fds.empty()) {
    control.resize(CMSG_SPACE(fds.size() * sizeof(int)));
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
    memcpy(CMSG_DATA(c), fds.data(), fds.size() * sizeof(int));
  }
  ssize_t n;
  do n = sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT); while (n < 0 && errno == EINTR);
  return n;
}

// Errors that mean "the peer is gone": reported through onClose, not thrown.
bool IsConnectionError(int err) {
  return err == EPIPE || err == ECONNRESET || err == ENOTCONN || err == ETIMEDOUT;
}

class Connection : public Napi::ObjectWrap<Connection> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Connection",
                       {
                           InstanceMethod<&Connection::Start>("start"),
                           InstanceMethod<&Connection::Send>("send"),
                           InstanceMethod<&Connection::Close>("close"),
                           InstanceMethod<&Connection::PendingWriteBytes>("pendingWriteBytes"),
                           InstanceAccessor<&Connection::GetFd>("fd"),
                       });
  }

  // Called only from C++ with (token, fd); takes ownership of fd.
  explicit Connection(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Connection>(info) {
    if (!IsInternalCall(info)) throw Napi::TypeError::New(info.Env(), "Connection cannot be constructed directly");
    int fd = info[1].As<Napi::Number>().Int32Value();
    poll_ = new uv_poll_t;
    int r = uv_poll_init(GetLoop(info.Env()), poll_, fd);
    if (r < 0) {
      delete poll_;
      poll_ = nullptr;
      close(fd);
      throw ErrnoError(info.Env(), -r, "uv_poll_init");
    }
    poll_->data = this;
    fd_ = fd;
  }

  ~Connection() override { ReleaseResources(); }

 private:
  struct Pending {
    std::vector<uint8_t> data;
    size_t offset;
    std::vector<int> fds;  // our dups, owned until sent
  };

  Napi::Value Start(const Napi::CallbackInfo& info) {
    Napi::Function onData = ArgFunction(info, 0, "onData");
    Napi::Function onClose = ArgFunction(info, 1, "onClose");
    if (fd_ < 0) throw ErrnoError(info.Env(), EBADF, "start");
    if (reading_) throw Napi::Error::New(info.Env(), "Connection already started");
    onData_ = Napi::Persistent(onData);
    onClose_ = Napi::Persistent(onClose);
    ctx_ = std::make_shared<Napi::AsyncContext>(info.Env(), "VfioConnection", Value());
    reading_ = true;
    UpdatePoll();
    return info.Env().Undefined();
  }

  Napi::Value Send(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    // Any ArrayBufferView works (including views of SharedArrayBuffers and mmap()ed memory).
    void* raw = nullptr;
    size_t len = 0;
    if (info[0].IsTypedArray()) {
      Napi::TypedArray ta = info[0].As<Napi::TypedArray>();
      NAPI_THROW_IF_FAILED(env, napi_get_typedarray_info(env, ta, nullptr, nullptr, &raw, nullptr, nullptr), {});
      len = ta.ByteLength();
    } else if (info[0].IsDataView()) {
      NAPI_THROW_IF_FAILED(env, napi_get_dataview_info(env, info[0], &len, &raw, nullptr, nullptr), {});
    } else {
      throw Napi::TypeError::New(env, "data must be a Buffer or Uint8Array");
    }
    const uint8_t* data = static_cast<const uint8_t*>(raw);
    std::vector<int> fds;
    if (info.Length() > 1 && !info[1].IsUndefined()) {
      if (!info[1].IsArray()) throw Napi::TypeError::New(env, "fds must be an array of numbers");
      Napi::Array arr = info[1].As<Napi::Array>();
      if (arr.Length() > kMaxFds) throw Napi::RangeError::New(env, "too many fds (max 253)");
      for (uint32_t i = 0; i < arr.Length(); i++) {
        Napi::Value v = arr[i];
        double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
        if (!(d >= 0 && d <= 0x7fffffff) || static_cast<int>(d) != d)
          throw Napi::TypeError::New(env, "fds must contain non-negative integer fds");
        fds.push_back(static_cast<int>(d));
      }
    }
    if (len == 0 && !fds.empty()) throw Napi::RangeError::New(env, "cannot send fds without data");
    if (fd_ < 0) throw ErrnoError(env, EBADF, "send");
    if (len == 0 || deferredError_) return env.Undefined();  // failing connections drop data

    size_t sent = 0;
    if (queue_.empty()) {
      ssize_t n = SendMsg(fd_, data, len, fds);
      if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        int err = errno;
        if (!IsConnectionError(err)) throw ErrnoError(env, err, "sendmsg");
        FailLater(err);
        return env.Undefined();
      }
      if (n >= 0) {
        sent = static_cast<size_t>(n);
        fds.clear();  // they went out with the first byte
      }
      if (sent == len) return env.Undefined();
    }
    // The caller keeps ownership of its fds, so queue our own duplicates.
    Pending p{std::vector<uint8_t>(data + sent, data + len), 0, {}};
    for (int fd : fds) {
      int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
      if (dup < 0) {
        int err = errno;
        CloseFds(p.fds);
        throw ErrnoError(env, err, "dup");
      }
      p.fds.push_back(dup);
    }
    pendingBytes_ += p.data.size();
    queue_.push_back(std::move(p));
    UpdatePoll();
    return env.Undefined();
  }

  // Closing from JS is silent: onClose is only for closes JS did not ask for.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }

  Napi::Value GetFd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), fd_); }

  Napi::Value PendingWriteBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(pendingBytes_));
  }

  // Keep the JS object (and thus this) alive exactly while libuv may call us.
  void UpdatePoll() {
    if (fd_ < 0) return;
    // A deferred error waits for start() so that onClose can report it.
    bool failing = deferredError_ && reading_;
    int want = (reading_ ? UV_READABLE : 0) | (!queue_.empty() || failing ? UV_WRITABLE : 0);
    if (want == pollEvents_) return;
    pollEvents_ = want;
    if (want) {
      uv_poll_start(poll_, want, OnPoll);
      if (!strong_) Ref();
      strong_ = true;
    } else {
      uv_poll_stop(poll_);
      if (strong_) Unref();
      strong_ = false;
    }
  }

  void DropQueue() {
    for (auto& p : queue_) CloseFds(p.fds);
    queue_.clear();
    pendingBytes_ = 0;
  }

  void ReleaseResources() {
    if (fd_ < 0) return;
    ClosePoll(poll_);  // stops polling before the fd number can be reused
    poll_ = nullptr;
    close(fd_);
    fd_ = -1;
    pollEvents_ = 0;
    reading_ = false;
    DropQueue();
  }

  void Shutdown() {
    ReleaseResources();
    onData_.Reset();
    onClose_.Reset();
    ctx_.reset();
    if (strong_) Unref();
    strong_ = false;
  }

  // Peer errors found synchronously (in send) are reported from the next
  // poll callback, since calling onClose from inside send() would surprise
  // the caller. A broken socket always polls writable.
  void FailLater(int err) {
    deferredError_ = err;
    DropQueue();
    UpdatePoll();
  }

  // err == 0 means EOF.
  void Fail(int err) {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    Napi::Function onClose = onClose_.IsEmpty() ? Napi::Function() : onClose_.Value();
    std::shared_ptr<Napi::AsyncContext> ctx = ctx_;
    Shutdown();
    if (!onClose.IsEmpty() && ctx)
      InvokeCallback(env, Value(), onClose, *ctx, {err ? Napi::String::New(env, ErrnoName(err)) : env.Null()});
  }

  void Flush() {
    while (!queue_.empty()) {
      Pending& p = queue_.front();
      ssize_t n = SendMsg(fd_, p.data.data() + p.offset, p.data.size() - p.offset, p.fds);
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        FailLater(errno);
        return;
      }
      CloseFds(p.fds);
      p.offset += n;
      pendingBytes_ -= n;
      if (p.offset == p.data.size()) queue_.pop_front();
    }
    UpdatePoll();
  }

  void ReadSome() {
    thread_local std::vector<uint8_t> buf(kReadBufferSize);
    alignas(cmsghdr) static thread_local char control[CMSG_SPACE(kMaxFds * sizeof(int))];
    Napi::Env env = Env();
    for (int i = 0; i < kMaxReadsPerEvent && fd_ >= 0 && reading_; i++) {
      iovec iov{buf.data(), buf.size()};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      ssize_t n = recvmsg(fd_, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) Fail(errno);
        return;
      }
      std::vector<int> fds;
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const int* p = reinterpret_cast<const int*>(CMSG_DATA(c));
        fds.insert(fds.end(), p, p + count);
      }
      if (msg.msg_flags & MSG_CTRUNC) {
        CloseFds(fds);
        Fail(EMSGSIZE);
        return;
      }
      if (n == 0) {
        CloseFds(fds);
        Fail(0);
        return;
      }
      Napi::HandleScope scope(env);
      Napi::Array jsFds = Napi::Array::New(env, fds.size());
      for (size_t k = 0; k < fds.size(); k++) jsFds.Set(static_cast<uint32_t>(k), Napi::Number::New(env, fds[k]));
      Napi::Buffer<uint8_t> chunk = Napi::Buffer<uint8_t>::Copy(env, buf.data(), n);
      std::shared_ptr<Napi::AsyncContext> ctx = ctx_;  // close() inside the callback resets ctx_
      InvokeCallback(env, Value(), onData_.Value(), *ctx, {chunk, jsFds});
    }
  }

  static void OnPoll(uv_poll_t* handle, int status, int events) {
    auto* self = static_cast<Connection*>(handle->data);
    if (!self) return;
    Napi::HandleScope scope(self->Env());
    [[maybe_unused]] Napi::Object keep = self->Value();  // a callback may close() and drop the last reference
    if (status < 0) return self->Fail(-status);
    if (self->deferredError_ && self->reading_) return self->Fail(self->deferredError_);
    if (events & UV_WRITABLE) self->Flush();
    if (self->deferredError_ && self->reading_) return self->Fail(self->deferredError_);
    if (events & UV_READABLE) self->ReadSome();
  }

  int fd_ = -1;
  uv_poll_t* poll_ = nullptr;
  int pollEvents_ = 0;
  bool reading_ = false;
  bool strong_ = false;
  int deferredError_ = 0;
  std::deque<Pending> queue_;
  size_t pendingBytes_ = 0;
  Napi::FunctionReference onData_;
  Napi::FunctionReference onClose_;
  std::shared_ptr<Napi::AsyncContext> ctx_;
};

Napi::Object NewConnection(Napi::Env env, int fd) {
  auto* data = env.GetInstanceData<AddonData>();
  return data->connectionCtor.New({data->token.Value(), Napi::Number::New(env, fd)});
}

class Listener : public Napi::ObjectWrap<Listener> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Listener", {InstanceMethod<&Listener::Close>("close")});
  }

  explicit Listener(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Listener>(info) {
    Napi::Env env = info.Env();
    std::string path = ArgString(info, 0, "path");
    Napi::Function onConnection = ArgFunction(info, 1, "onConnection");
    sockaddr_un addr = MakeAddress(env, path, "bind");
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) throw ErrnoError(env, errno, "socket");
    const char* failed = nullptr;
    int r = 0;
    if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) {
      failed = "bind";
      r = errno;
    } else if (listen(fd, 4) < 0) {
      failed = "listen";
      r = errno;
    }
    if (failed) {
      close(fd);
      throw ErrnoError(env, r, failed, path);
    }
    poll_ = new uv_poll_t;
    if ((r = uv_poll_init(GetLoop(env), poll_, fd)) < 0 || (r = uv_poll_start(poll_, UV_READABLE, OnPoll)) < 0) {
      delete poll_;  // uv_poll_init does not register the handle when it fails
      close(fd);
      throw ErrnoError(env, -r, "uv_poll_init", path);
    }
    poll_->data = this;
    fd_ = fd;
    spareFd_ = open("/dev/null", O_RDONLY | O_CLOEXEC);
    onConnection_ = Napi::Persistent(onConnection);
    ctx_ = std::make_unique<Napi::AsyncContext>(env, "VfioListener", Value());
    Ref();  // a listening socket keeps itself (and the process) alive
  }

  ~Listener() override { Release(); }

 private:
  void Release() {
    if (fd_ < 0) return;
    ClosePoll(poll_);
    poll_ = nullptr;
    close(fd_);
    fd_ = -1;
    if (spareFd_ >= 0) close(spareFd_);
    spareFd_ = -1;
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (fd_ >= 0) {
      Release();
      onConnection_.Reset();
      Unref();
    }
    return info.Env().Undefined();
  }

  static void OnPoll(uv_poll_t* handle, int status, int) {
    auto* self = static_cast<Listener*>(handle->data);
    if (!self || status < 0) return;
    Napi::Env env = self->Env();
    Napi::HandleScope outer(env);
    [[maybe_unused]] Napi::Object keep = self->Value();  // a callback may close() and drop the last reference
    for (int i = 0; i < kMaxReadsPerEvent && self->fd_ >= 0; i++) {
      int fd = accept4(self->fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        // Out of fds, the pending connection keeps the socket readable and the loop would spin:
        // spend the reserved fd to accept it and hang up at once, then reserve one again.
        if ((errno == EMFILE || errno == ENFILE) && self->spareFd_ >= 0) {
          close(self->spareFd_);
          int dropped = accept4(self->fd_, nullptr, nullptr, SOCK_CLOEXEC);
          if (dropped >= 0) close(dropped);
          self->spareFd_ = open("/dev/null", O_RDONLY | O_CLOEXEC);
          continue;
        }
        return;  // EAGAIN (or no spare fd left: retried on the next event)
      }
      Napi::HandleScope scope(env);
      Napi::Object conn;
      try {
        conn = NewConnection(env, fd);  // owns fd from here, even on failure
      } catch (const Napi::Error& e) {
        napi_fatal_exception(env, e.Value());
        continue;
      }
      InvokeCallback(env, self->Value(), self->onConnection_.Value(), *self->ctx_, {conn});
    }
  }

  int fd_ = -1;
  /** Held in reserve for the EMFILE case in OnPoll. */
  int spareFd_ = -1;
  uv_poll_t* poll_ = nullptr;
  Napi::FunctionReference onConnection_;
  std::unique_ptr<Napi::AsyncContext> ctx_;
};

// Readiness watcher for an fd the caller owns (e.g. an eventfd).
class FdWatcher : public Napi::ObjectWrap<FdWatcher> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FdWatcher", {InstanceMethod<&FdWatcher::Close>("close"), InstanceMethod<&FdWatcher::UnrefLoop>("unref")});
  }

  explicit FdWatcher(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FdWatcher>(info) {
    Napi::Env env = info.Env();
    if (!IsInternalCall(info)) throw Napi::TypeError::New(env, "use watchFd()");
    int fd = info[1].As<Napi::Number>().Int32Value();
    Napi::Function cb = info[2].As<Napi::Function>();
    poll_ = new uv_poll_t;
    int r;
    if ((r = uv_poll_init(GetLoop(env), poll_, fd)) < 0 || (r = uv_poll_start(poll_, UV_READABLE, OnPoll)) < 0) {
      delete poll_;
      poll_ = nullptr;
      throw ErrnoError(env, -r, "uv_poll_init");
    }
    poll_->data = this;
    onReadable_ = Napi::Persistent(cb);
    ctx_ = std::make_unique<Napi::AsyncContext>(env, "VfioFdWatcher", Value());
    Ref();
  }

  ~FdWatcher() override {
    if (poll_) ClosePoll(poll_);
  }

 private:
  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (poll_) {
      ClosePoll(poll_);
      poll_ = nullptr;
      onReadable_.Reset();
      Unref();
    }
    return info.Env().Undefined();
  }

  // The watcher no longer keeps the process alive on its own.
  Napi::Value UnrefLoop(const Napi::CallbackInfo& info) {
    if (poll_) uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
    return info.Env().Undefined();
  }

  static void OnPoll(uv_poll_t* handle, int, int) {
    auto* self = static_cast<FdWatcher*>(handle->data);
    if (!self) return;
    Napi::Env env = self->Env();
    Napi::HandleScope scope(env);
    InvokeCallback(env, self->Value(), self->onReadable_.Value(), *self->ctx_, {});
  }

  uv_poll_t* poll_ = nullptr;
  Napi::FunctionReference onReadable_;
  std::unique_ptr<Napi::AsyncContext> ctx_;
};

Napi::Value Connect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = ArgString(info, 0, "path");
  sockaddr_un addr = MakeAddress(env, path, "connect");
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw ErrnoError(env, errno, "socket");
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) {
    int err = errno;
    close(fd);
    throw ErrnoError(env, err, "connect", path);
  }
  // Blocking connect is fine for AF_UNIX; all later I/O is non-blocking.
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  return NewConnection(env, fd);
}

Napi::Value WatchFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0, "fd");
  Napi::Function cb = ArgFunction(info, 1, "onReadable");
  auto* data = env.GetInstanceData<AddonData>();
  return data->watcherCtor.New({data->token.Value(), Napi::Number::New(env, fd), cb});
}

}  // namespace

void InitSocket(Napi::Env env, Napi::Object exports, AddonData* data) {
  Napi::Function connection = Connection::Define(env);
  data->connectionCtor = Napi::Persistent(connection);
  data->watcherCtor = Napi::Persistent(FdWatcher::Define(env));
  data->token = Napi::Persistent(Napi::External<int>::New(env, &kInternalToken));
  exports.Set("Connection", connection);
  exports.Set("Listener", Listener::Define(env));
  exports.Set("connect", Napi::Function::New(env, Connect, "connect"));
  exports.Set("watchFd", Napi::Function::New(env, WatchFd, "watchFd"));
}

}  // namespace vfio
