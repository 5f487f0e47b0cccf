#include "common.h"

#include <limits.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <string>

namespace snapblock {

namespace {

struct ErrnoName {
  int err;
  const char* code;
  const char* desc;  // libuv-style wording, as in Node's fs errors
};

// ENOTSUP == EOPNOTSUPP on Linux; it is reported as EOPNOTSUPP.
const ErrnoName kErrnoNames[] = {
    {EPERM, "EPERM", "operation not permitted"},
    {ENOENT, "ENOENT", "no such file or directory"},
    {EINTR, "EINTR", "interrupted system call"},
    {EIO, "EIO", "i/o error"},
    {ENXIO, "ENXIO", "no such device or address"},
    {EBADF, "EBADF", "bad file descriptor"},
    {EAGAIN, "EAGAIN", "resource temporarily unavailable"},
    {ENOMEM, "ENOMEM", "not enough memory"},
    {EACCES, "EACCES", "permission denied"},
    {EBUSY, "EBUSY", "resource busy or locked"},
    {EEXIST, "EEXIST", "file already exists"},
    {ENODEV, "ENODEV", "no such device"},
    {ENOTDIR, "ENOTDIR", "not a directory"},
    {EISDIR, "EISDIR", "illegal operation on a directory"},
    {EINVAL, "EINVAL", "invalid argument"},
    {EMFILE, "EMFILE", "too many open files"},
    {ETXTBSY, "ETXTBSY", "text file is busy"},
    {EFBIG, "EFBIG", "file too large"},
    {ENOSPC, "ENOSPC", "no space left on device"},
    {ESPIPE, "ESPIPE", "invalid seek"},
    {EROFS, "EROFS", "read-only file system"},
    {ENOSYS, "ENOSYS", "function not implemented"},
    {EOVERFLOW, "EOVERFLOW", "value too large for defined data type"},
    {EOPNOTSUPP, "EOPNOTSUPP", "operation not supported"},
    {EDQUOT, "EDQUOT", "disk quota exceeded"},
};

constexpr double kMaxSafeInteger = 9007199254740991.0;  // Number.MAX_SAFE_INTEGER

std::string Describe(const char* name, size_t i) { return std::string(name) + " (argument " + std::to_string(i) + ")"; }

}  // namespace

Napi::Error ErrnoError(Napi::Env env, int err, const char* syscall, const char* path) {
  const char* code = nullptr;
  const char* desc = nullptr;
  for (const auto& e : kErrnoNames) {
    if (e.err == err) {
      code = e.code;
      desc = e.desc;
      break;
    }
  }
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  if (code == nullptr) code = strerrorname_np(err);
#endif
  if (code == nullptr) code = "UNKNOWN";
  if (desc == nullptr) desc = strerror(err);  // JS thread only, so not racing other callers

  std::string msg = std::string(code) + ": " + desc + ", " + syscall;
  if (path != nullptr) msg += std::string(" '") + path + "'";
  Napi::Error error = Napi::Error::New(env, msg);
  error.Set("errno", Napi::Number::New(env, -err));
  error.Set("code", Napi::String::New(env, code));
  error.Set("syscall", Napi::String::New(env, syscall));
  if (path != nullptr) error.Set("path", Napi::String::New(env, path));
  return error;
}

int ArgFd(const Napi::CallbackInfo& info, size_t i) {
  Napi::Value v = info[i];
  if (v.IsNumber()) {
    double d = v.As<Napi::Number>().DoubleValue();
    if (d >= 0 && d <= 2147483647.0 && std::floor(d) == d) return static_cast<int>(d);
  }
  throw Napi::TypeError::New(info.Env(), Describe("fd", i) + " must be a non-negative int32");
}

int64_t ArgUint(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Value v = info[i];
  if (v.IsNumber()) {
    double d = v.As<Napi::Number>().DoubleValue();
    if (d >= 0 && d <= kMaxSafeInteger && std::floor(d) == d) return static_cast<int64_t>(d);
  }
  throw Napi::TypeError::New(info.Env(), Describe(name, i) + " must be a non-negative safe integer");
}

bool ArgBool(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Value v = info[i];
  if (!v.IsBoolean()) throw Napi::TypeError::New(info.Env(), Describe(name, i) + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

Napi::Buffer<uint8_t> ArgBuffer(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Value v = info[i];
  if (!v.IsBuffer()) throw Napi::TypeError::New(info.Env(), Describe(name, i) + " must be a Buffer");
  return v.As<Napi::Buffer<uint8_t>>();
}

Job::Job(Napi::Env env, const char* name, Exec exec, Done done)
    : Napi::AsyncWorker(env, name),
      deferred_(Napi::Promise::Deferred::New(env)),
      exec_(std::move(exec)),
      done_(std::move(done)) {}

Napi::Promise Job::Start(Napi::Env env, const char* name, const std::vector<Napi::Object>& keep, Exec exec,
                         Done done) {
  auto* job = new Job(env, name, std::move(exec), std::move(done));  // deletes itself after OnOK/OnError
  for (const auto& obj : keep) job->keep_.push_back(Napi::Persistent(obj));
  Napi::Promise promise = job->deferred_.Promise();
  job->Queue();
  return promise;
}

void Job::Execute() { status_ = exec_(); }

void Job::OnOK() {
  Napi::Env env = Env();
  if (status_.err != 0) {
    deferred_.Reject(ErrnoError(env, status_.err, status_.syscall).Value());
  } else {
    deferred_.Resolve(done_ ? done_(env) : env.Undefined());
  }
}

void Job::OnError(const Napi::Error& e) { deferred_.Reject(e.Value()); }

void AddBuffer(IoVec& iov, const Napi::Buffer<uint8_t>& buf) {
  if (buf.Length() > 0) iov.push_back({buf.Data(), buf.Length()});
}

void Advance(IoVec& iov, size_t& first, size_t n) {
  while (first < iov.size() && n >= iov[first].iov_len) n -= iov[first++].iov_len;
  if (n > 0) {
    iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + n;
    iov[first].iov_len -= n;
  }
}

int Chunk(const IoVec& iov, size_t first) { return static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX)); }

IoVec BufferList(const Napi::CallbackInfo& info, std::vector<Napi::Object>& keep) {
  if (!info[1].IsArray()) throw Napi::TypeError::New(info.Env(), "bufs (argument 1) must be an array of Buffers");
  Napi::Array arr = info[1].As<Napi::Array>();
  IoVec iov;
  for (uint32_t i = 0; i < arr.Length(); i++) {
    Napi::Value v = arr[i];
    if (!v.IsBuffer()) throw Napi::TypeError::New(info.Env(), "bufs (argument 1) must be an array of Buffers");
    auto buf = v.As<Napi::Buffer<uint8_t>>();
    AddBuffer(iov, buf);
    keep.push_back(buf);
  }
  return iov;
}

}  // namespace snapblock
