// Space management: hole punching, zeroing and the SEEK_DATA/SEEK_HOLE allocation map.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>

#include "common.h"

namespace snapblock {

namespace {

SysStatus Fallocate(int fd, int mode, int64_t off, int64_t len) {
  if (len == 0) return {};  // fallocate(len=0) is EINVAL; an empty range is simply done
  while (fallocate(fd, mode, off, len) < 0) {
    if (errno != EINTR) return {errno, "fallocate"};
  }
  return {};
}

Napi::Value StartFallocate(const Napi::CallbackInfo& info, int mode) {
  int fd = ArgFd(info, 0);
  int64_t off = ArgUint(info, 1, "offset");
  int64_t len = ArgUint(info, 2, "length");
  return Job::Start(info.Env(), "fallocate", {}, [=] { return Fallocate(fd, mode, off, len); });
}

Napi::Value PunchHole(const Napi::CallbackInfo& info) {
  return StartFallocate(info, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
}

Napi::Value ZeroRange(const Napi::CallbackInfo& info) {
  return StartFallocate(info, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE);
}

// Appends [off, off+len) to the flat triple list, merging with a preceding extent of the same kind.
void Push(std::vector<double>& out, int64_t off, int64_t len, bool data) {
  if (len <= 0) return;
  size_t n = out.size();
  if (n >= 3 && out[n - 1] == (data ? 1 : 0) && out[n - 3] + out[n - 2] == static_cast<double>(off)) {
    out[n - 2] += static_cast<double>(len);
    return;
  }
  out.insert(out.end(), {static_cast<double>(off), static_cast<double>(len), data ? 1.0 : 0.0});
}

// Maps [off, min(off+len, size)) into contiguous data/hole extents.
SysStatus MapExtents(int fd, int64_t off, int64_t len, std::vector<double>& out) {
  struct stat st;
  if (fstat(fd, &st) < 0) return {errno, "fstat"};
  const int64_t end = std::min<int64_t>(off + len, st.st_size);
  int64_t pos = off;
  while (pos < end) {
    off_t data = lseek(fd, pos, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;  // no data past pos: the rest is a hole
      if (errno == EINVAL) {      // filesystem without SEEK_DATA: call it all data
        Push(out, pos, end - pos, true);
        return {};
      }
      return {errno, "lseek"};
    }
    if (data >= end) break;
    Push(out, pos, data - pos, false);
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) {
      if (errno != ENXIO) return {errno, "lseek"};
      hole = end;  // file shrank under us; the clipped range ends here
    }
    hole = std::min<int64_t>(hole, end);
    Push(out, data, hole - data, true);
    pos = hole;
  }
  Push(out, pos, end - pos, false);
  return {};
}

Napi::Value ToArray(Napi::Env env, const std::vector<double>& out) {
  auto arr = Napi::Float64Array::New(env, out.size());
  std::copy(out.begin(), out.end(), arr.Data());
  return arr;
}

// The same map computed on the calling thread: lseek answers from the filesystem's cached
// extent tree, so this is for ranges about to be read from the page cache anyway.
Napi::Value ExtentsNow(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int64_t off = ArgUint(info, 1, "offset");
  int64_t len = ArgUint(info, 2, "length");
  std::vector<double> out;
  SysStatus st = MapExtents(fd, off, len, out);
  if (st.err != 0) throw ErrnoError(info.Env(), st.err, st.syscall);
  return ToArray(info.Env(), out);
}

// dataEnd(fd, offset): where the run of data from offset ends (SEEK_HOLE), on the calling
// thread: offset itself when offset is in a hole or past the end. One lseek where extentsNow
// takes an fstat and two, for the one question a placed receive asks (file-map.ts place).
Napi::Value DataEnd(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int64_t off = ArgUint(info, 1, "offset");
  off_t hole = lseek(fd, off, SEEK_HOLE);
  if (hole < 0) {
    if (errno == ENXIO) return Napi::Number::New(info.Env(), static_cast<double>(off));
    throw ErrnoError(info.Env(), errno, "lseek");
  }
  return Napi::Number::New(info.Env(), static_cast<double>(hole));
}

Napi::Value Extents(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int64_t off = ArgUint(info, 1, "offset");
  int64_t len = ArgUint(info, 2, "length");
  auto out = std::make_shared<std::vector<double>>();
  return Job::Start(
      info.Env(), "extents", {}, [=] { return MapExtents(fd, off, len, *out); },
      [out](Napi::Env env) { return ToArray(env, *out); });
}

}  // namespace

void InitSpace(Napi::Env env, Napi::Object exports) {
  exports.Set("punchHole", Napi::Function::New(env, PunchHole, "punchHole"));
  exports.Set("zeroRange", Napi::Function::New(env, ZeroRange, "zeroRange"));
  exports.Set("extents", Napi::Function::New(env, Extents, "extents"));
  exports.Set("extentsNow", Napi::Function::New(env, ExtentsNow, "extentsNow"));
  exports.Set("dataEnd", Napi::Function::New(env, DataEnd, "dataEnd"));
}

}  // namespace snapblock
