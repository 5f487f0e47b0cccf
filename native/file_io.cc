// open/close and positional reads/writes. Everything that may block on the disk runs in a Job
// (thread pool); only preadNowait touches file data on the JS thread, and it never blocks.
#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <memory>
#include <string>

#include "common.h"

namespace snapblock {

namespace {

// Reads until every buffer is full or EOF; *total = bytes read. flags != 0 uses preadv2.
SysStatus ReadAll(int fd, IoVec iov, int64_t off, int flags, const char* syscall, int64_t* total) {
  *total = 0;
  size_t first = 0;
  while (first < iov.size()) {
    ssize_t n = flags != 0 ? preadv2(fd, &iov[first], Chunk(iov, first), off, flags)
                           : preadv(fd, &iov[first], Chunk(iov, first), off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return {errno, syscall};
    }
    if (n == 0) break;  // EOF
    *total += n;
    off += n;
    Advance(iov, first, static_cast<size_t>(n));
  }
  return {};
}

SysStatus DataSync(int fd) {
  while (fdatasync(fd) < 0) {
    if (errno != EINTR) return {errno, "fdatasync"};
  }
  return {};
}

// Writes every byte. dsync: pwritev2(RWF_DSYNC), or plain writes + fdatasync where unsupported.
SysStatus WriteAll(int fd, IoVec iov, int64_t off, bool dsync, const char* syscall) {
  bool useFlag = dsync;
  size_t first = 0;
  while (first < iov.size()) {
    ssize_t n = useFlag ? pwritev2(fd, &iov[first], Chunk(iov, first), off, RWF_DSYNC)
                        : pwritev(fd, &iov[first], Chunk(iov, first), off);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (useFlag && (errno == ENOSYS || errno == EOPNOTSUPP)) {
        useFlag = false;
        continue;
      }
      return {errno, syscall};
    }
    if (n == 0) return {EIO, syscall};  // no progress on a non-empty write: never spin
    off += n;
    Advance(iov, first, static_cast<size_t>(n));
  }
  if (dsync && !useFlag) return DataSync(fd);
  return {};
}

Napi::Value Open(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "path (argument 0) must be a string");
  std::string path = info[0].As<Napi::String>().Utf8Value();
  bool wantDirect = ArgBool(info, 1, "direct");
  bool readOnly = ArgBool(info, 2, "readOnly");
  bool create = ArgBool(info, 3, "create");

  int flags = (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC | (create ? O_CREAT : 0);
  auto tryOpen = [&](int f) {
    int fd;
    do fd = ::open(path.c_str(), f, 0600);
    while (fd < 0 && errno == EINTR);
    return fd;
  };
  int fd = -1;
  bool direct = false;
  if (wantDirect) {
    fd = tryOpen(flags | O_DIRECT);
    direct = fd >= 0;
    if (fd < 0 && errno != EINVAL) throw ErrnoError(env, errno, "open", path.c_str());
  }
  if (fd < 0) fd = tryOpen(flags);  // no O_DIRECT wanted, or the filesystem refused it
  if (fd < 0) throw ErrnoError(env, errno, "open", path.c_str());

  Napi::Object result = Napi::Object::New(env);
  result.Set("fd", Napi::Number::New(env, fd));
  result.Set("direct", Napi::Boolean::New(env, direct));
  return result;
}

Napi::Value Close(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  // On Linux the fd is released even when close() reports EINTR, so never retry.
  if (::close(fd) < 0 && errno != EINTR) throw ErrnoError(info.Env(), errno, "close");
  return info.Env().Undefined();
}

// dup(2) with close-on-exec: lets Node adopt an accepted socket as a second handle.
Napi::Value DupFd(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) throw ErrnoError(info.Env(), errno, "fcntl");
  return Napi::Number::New(info.Env(), copy);
}

// Shared by pread/preadv: resolves with the number of bytes read.
Napi::Value StartRead(const Napi::CallbackInfo& info, IoVec iov, std::vector<Napi::Object> keep, const char* syscall) {
  int fd = ArgFd(info, 0);
  int64_t off = ArgUint(info, 2, "offset");
  auto total = std::make_shared<int64_t>(0);
  return Job::Start(
      info.Env(), syscall, keep, [=] { return ReadAll(fd, iov, off, 0, syscall, total.get()); },
      [total](Napi::Env env) { return Napi::Number::New(env, static_cast<double>(*total)); });
}

Napi::Value StartWrite(const Napi::CallbackInfo& info, IoVec iov, std::vector<Napi::Object> keep,
                       const char* syscall) {
  int fd = ArgFd(info, 0);
  int64_t off = ArgUint(info, 2, "offset");
  bool dsync = ArgBool(info, 3, "dsync");
  return Job::Start(info.Env(), syscall, keep, [=] { return WriteAll(fd, iov, off, dsync, syscall); });
}

Napi::Value Pread(const Napi::CallbackInfo& info) {
  auto buf = ArgBuffer(info, 1, "buf");
  IoVec iov;
  AddBuffer(iov, buf);
  return StartRead(info, iov, {buf}, "pread");
}

Napi::Value Pwrite(const Napi::CallbackInfo& info) {
  auto buf = ArgBuffer(info, 1, "buf");
  IoVec iov;
  AddBuffer(iov, buf);
  return StartWrite(info, iov, {buf}, "pwrite");
}

Napi::Value Preadv(const Napi::CallbackInfo& info) {
  std::vector<Napi::Object> keep;
  IoVec iov = BufferList(info, keep);
  return StartRead(info, iov, keep, "preadv");
}

Napi::Value Pwritev(const Napi::CallbackInfo& info) {
  std::vector<Napi::Object> keep;
  IoVec iov = BufferList(info, keep);
  return StartWrite(info, iov, keep, "pwritev");
}

// Synchronous page-cache read: bytes read (short only at EOF), or -1 if the read would block.
Napi::Value PreadNowait(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  auto buf = ArgBuffer(info, 1, "buf");
  int64_t off = ArgUint(info, 2, "offset");
  IoVec iov;
  AddBuffer(iov, buf);
  int64_t total = 0;
  SysStatus st = ReadAll(fd, iov, off, RWF_NOWAIT, "preadv2", &total);
  if (st.err == EAGAIN || st.err == EOPNOTSUPP || st.err == ENOSYS) return Napi::Number::New(info.Env(), -1);
  if (st.err != 0) throw ErrnoError(info.Env(), st.err, st.syscall);
  return Napi::Number::New(info.Env(), static_cast<double>(total));
}

Napi::Value Fdatasync(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  return Job::Start(info.Env(), "fdatasync", {}, [fd] { return DataSync(fd); });
}

}  // namespace

void InitFileIo(Napi::Env env, Napi::Object exports) {
  exports.Set("open", Napi::Function::New(env, Open, "open"));
  exports.Set("close", Napi::Function::New(env, Close, "close"));
  exports.Set("dupFd", Napi::Function::New(env, DupFd, "dupFd"));
  exports.Set("pread", Napi::Function::New(env, Pread, "pread"));
  exports.Set("pwrite", Napi::Function::New(env, Pwrite, "pwrite"));
  exports.Set("preadv", Napi::Function::New(env, Preadv, "preadv"));
  exports.Set("pwritev", Napi::Function::New(env, Pwritev, "pwritev"));
  exports.Set("preadNowait", Napi::Function::New(env, PreadNowait, "preadNowait"));
  exports.Set("fdatasync", Napi::Function::New(env, Fdatasync, "fdatasync"));
}

}  // namespace snapblock
