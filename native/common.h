// Shared helpers for the snapblock native addon: argument checking, errno -> JS
// Error conversion, and a Promise-returning worker that runs a syscall off the JS thread.
#pragma once

#include <napi.h>
#include <sys/uio.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace snapblock {

// Result of a blocking operation: err == 0 on success, else errno and the syscall name.
struct SysStatus {
  int err = 0;
  const char* syscall = nullptr;
};

// A JS Error shaped like Node's: "EIO: i/o error, pwrite" with code, errno (negative), syscall.
Napi::Error ErrnoError(Napi::Env env, int err, const char* syscall, const char* path = nullptr);

// Argument readers; all throw TypeError on bad input.
int ArgFd(const Napi::CallbackInfo& info, size_t i);
int64_t ArgUint(const Napi::CallbackInfo& info, size_t i, const char* name);  // safe non-negative integer
bool ArgBool(const Napi::CallbackInfo& info, size_t i, const char* name);
Napi::Buffer<uint8_t> ArgBuffer(const Napi::CallbackInfo& info, size_t i, const char* name);

// Scatter/gather lists over JS Buffers, for the vectored syscalls (file_io.cc, socket_io.cc).
using IoVec = std::vector<iovec>;
// Skips zero-length buffers so a syscall that returns 0 always means EOF (reads).
void AddBuffer(IoVec& iov, const Napi::Buffer<uint8_t>& buf);
// Drops `n` transferred bytes from the front of iov[first..].
void Advance(IoVec& iov, size_t& first, size_t n);
// How many iovecs from `first` one syscall may take (at most IOV_MAX).
int Chunk(const IoVec& iov, size_t first);
// Argument 1 (a JS array of Buffers) as iovecs, each Buffer kept alive for the Job in `keep`.
IoVec BufferList(const Napi::CallbackInfo& info, std::vector<Napi::Object>& keep);

// Runs `exec` on the libuv thread pool and returns a Promise. On success the promise resolves
// with `done(env)` (or undefined when done is empty); on failure it rejects with ErrnoError.
// `keep` holds references to JS objects (Buffers) whose memory `exec` touches.
class Job : public Napi::AsyncWorker {
 public:
  using Exec = std::function<SysStatus()>;
  using Done = std::function<Napi::Value(Napi::Env)>;

  static Napi::Promise Start(Napi::Env env, const char* name, const std::vector<Napi::Object>& keep,
                             Exec exec, Done done = nullptr);

 private:
  Job(Napi::Env env, const char* name, Exec exec, Done done);
  void Execute() override;
  void OnOK() override;
  void OnError(const Napi::Error& e) override;

  Napi::Promise::Deferred deferred_;
  std::vector<Napi::ObjectReference> keep_;
  Exec exec_;
  Done done_;
  SysStatus status_;
};

// Module pieces, registered by module.cc.
void InitFileIo(Napi::Env env, Napi::Object exports);
void InitSpace(Napi::Env env, Napi::Object exports);
void InitMemory(Napi::Env env, Napi::Object exports);
void InitSocketIo(Napi::Env env, Napi::Object exports);

}  // namespace snapblock
