// Shared helpers for the vfio_native addon.
#pragma once

#include <napi.h>
#include <uv.h>

#include <string>

namespace vfio {

// Per-environment state (one per main thread / worker), so the addon is
// safe to load in worker_threads.
struct AddonData {
  Napi::FunctionReference connectionCtor;
  Napi::FunctionReference watcherCtor;
  Napi::Reference<Napi::External<int>> token;  // created once: each External costs a finalizer record
};

// Passed as the first constructor argument by C++ so JS cannot construct
// Connection / FdWatcher objects directly.
extern int kInternalToken;
bool IsInternalCall(const Napi::CallbackInfo& info);

// Node-style error: message "<syscall> <CODE> <path>: <strerror>", with
// .code, .errno (negative, like node), .syscall and .path.
Napi::Error ErrnoError(Napi::Env env, int err, const char* syscall, const std::string& path = "");
const char* ErrnoName(int err);

// Argument validation; throws TypeError / RangeError on bad input.
int ArgFd(const Napi::CallbackInfo& info, size_t i, const char* name);
std::string ArgString(const Napi::CallbackInfo& info, size_t i, const char* name);
Napi::Function ArgFunction(const Napi::CallbackInfo& info, size_t i, const char* name);

// Invoke a JS callback from a libuv callback. A throwing callback is
// reported as an uncaught exception (standard Node behaviour for async
// callbacks) instead of unwinding through libuv.
void InvokeCallback(Napi::Env env, Napi::Object recv, Napi::Function fn, Napi::AsyncContext& ctx,
                    const std::initializer_list<napi_value>& args);

uv_loop_t* GetLoop(Napi::Env env);

// uv_poll handles must be freed only from their close callback.
void ClosePoll(uv_poll_t* poll);

// fcntl(F_GET_SEALS) says the file can no longer shrink (QEMU seals its memory-backend-memfd so).
bool FdSealedAgainstShrink(int fd);

void InitSocket(Napi::Env env, Napi::Object exports, AddonData* data);
void InitMemory(Napi::Env env, Napi::Object exports, AddonData* data);
void InitFile(Napi::Env env, Napi::Object exports);
void InitUring(Napi::Env env, Napi::Object exports);

}  // namespace vfio
