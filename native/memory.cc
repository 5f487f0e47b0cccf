// Aligned buffers for O_DIRECT, the alignment an fd needs, and shared file mappings.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"

namespace snapblock {

namespace {

constexpr uint32_t kDefaultAlignment = 4096;
constexpr uint32_t kMinAlignment = 512;

// Zero-filled memory from posix_memalign, owned (and freed) by the returned Buffer.
Napi::Value AllocAligned(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t size = ArgUint(info, 0, "size");
  int64_t alignment = ArgUint(info, 1, "alignment");
  if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment > (1 << 30)) {
    throw Napi::TypeError::New(env, "alignment (argument 1) must be a power of two <= 1 GiB");
  }
  if (size == 0) return Napi::Buffer<uint8_t>::New(env, 0);

  void* mem = nullptr;
  size_t align = std::max<size_t>(static_cast<size_t>(alignment), sizeof(void*));
  int err = posix_memalign(&mem, align, static_cast<size_t>(size));
  if (err != 0) throw ErrnoError(env, err, "posix_memalign");
  std::memset(mem, 0, static_cast<size_t>(size));
  // Tell V8 about the off-heap memory so GC pressure reflects it.
  Napi::MemoryManagement::AdjustExternalMemory(env, size);
  return Napi::Buffer<uint8_t>::New(env, static_cast<uint8_t*>(mem), static_cast<size_t>(size),
                                    [size](Napi::Env env, uint8_t* data) {
                                      free(data);
                                      Napi::MemoryManagement::AdjustExternalMemory(env, -size);
                                    });
}

// Logical block size for block devices; STATX_DIOALIGN for files; 4096 when unknown.
Napi::Value Alignment(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0);
  struct stat st;
  if (fstat(fd, &st) < 0) throw ErrnoError(env, errno, "fstat");

  uint32_t align = 0;
  if (S_ISBLK(st.st_mode)) {
    int lbs = 0;
    if (ioctl(fd, BLKSSZGET, &lbs) < 0) throw ErrnoError(env, errno, "ioctl");
    align = static_cast<uint32_t>(lbs);
  }
#ifdef STATX_DIOALIGN
  else {
    struct statx stx;
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN) != 0) {
      align = std::max(stx.stx_dio_mem_align, stx.stx_dio_offset_align);
    }
  }
#endif
  if (align == 0 || (align & (align - 1)) != 0) align = kDefaultAlignment;
  return Napi::Number::New(env, std::max(align, kMinAlignment));
}

// mapFile(fd, offset, length, writable): a shared mapping of the file as a Buffer, unmapped when
// the Buffer is collected; writable adds PROT_WRITE, for copyIntoMapping (JS never stores into
// it). Touching a byte past the file's end raises SIGBUS: callers keep
// every access below the size they checked (src/storage/file-map.ts).
Napi::Value MapFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0);
  int64_t offset = ArgUint(info, 1, "offset");
  int64_t length = ArgUint(info, 2, "length");
  if (length == 0 || offset % sysconf(_SC_PAGESIZE) != 0) {
    throw Napi::TypeError::New(env, "mapFile: offset must be page-aligned and length positive");
  }
  bool writable = info.Length() > 3 && ArgBool(info, 3, "writable");
  void* mem = mmap(nullptr, static_cast<size_t>(length), writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd,
                   static_cast<off_t>(offset));
  if (mem == MAP_FAILED) throw ErrnoError(env, errno, "mmap");
  size_t len = static_cast<size_t>(length);
  return Napi::Buffer<uint8_t>::New(env, static_cast<uint8_t*>(mem), len,
                                    [len](Napi::Env, uint8_t* data) { munmap(data, len); });
}

// The [at, at+length) range of a mapping Buffer, checked (throws RangeError past its end).
uint8_t* MappingSpan(const Napi::CallbackInfo& info, const char* what, int64_t at, size_t length) {
  if (!info[0].IsBuffer()) throw Napi::TypeError::New(info.Env(), std::string(what) + ": mapping Buffer expected");
  auto mapping = info[0].As<Napi::Buffer<uint8_t>>();
  if (static_cast<uint64_t>(at) + length > mapping.Length()) throw Napi::RangeError::New(info.Env(), std::string(what) + ": past the mapping");
  return mapping.Data() + at;
}

// copyIntoMapping(mapping, at, src): copy src into mapping[at..] with process_vm_writev on our
// own process, so the kernel does the stores: a page it cannot provide (no space for it, a read
// error, past the end of the file) ends the copy with EFAULT, where a store of ours would raise
// SIGBUS. Returns the bytes copied (short after such a failure), or -errno if none were.
Napi::Value CopyIntoMapping(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t at = ArgUint(info, 1, "at");
  if (!info[2].IsBuffer()) throw Napi::TypeError::New(env, "copyIntoMapping: source Buffer expected");
  auto src = info[2].As<Napi::Buffer<uint8_t>>();
  struct iovec local = {src.Data(), src.Length()};
  struct iovec remote = {MappingSpan(info, "copyIntoMapping", at, src.Length()), src.Length()};
  ssize_t n = process_vm_writev(getpid(), &local, 1, &remote, 1, 0);
  return Napi::Number::New(env, n < 0 ? -errno : static_cast<double>(n));
}

// residentNow(mapping, at, length): whether every page of the range is in the page cache
// (mincore), so that touching it needs no read from disk.
Napi::Value ResidentNow(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t at = ArgUint(info, 1, "at");
  int64_t length = ArgUint(info, 2, "length");
  uint8_t* start = MappingSpan(info, "residentNow", at, static_cast<size_t>(length));
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  uintptr_t first = reinterpret_cast<uintptr_t>(start) & ~(page - 1);
  uintptr_t end = reinterpret_cast<uintptr_t>(start) + static_cast<uintptr_t>(length);
  size_t pages = (end - first + page - 1) / page;
  std::vector<unsigned char> vec(pages);
  if (mincore(reinterpret_cast<void*>(first), end - first, vec.data()) < 0) return Napi::Boolean::New(env, false);
  return Napi::Boolean::New(env, std::all_of(vec.begin(), vec.end(), [](unsigned char v) { return (v & 1) != 0; }));
}

// unmapPages(mapping, at, length): drop this process's page table entries for the pages of
// the range (MADV_DONTNEED; the page cache keeps the data, dirty or not). A page that
// writeback cleaned is left mapped read-only, and each of its 4 KiB pages then takes its own
// write fault, each running ext4's page_mkwrite over the whole folio; a page not mapped at
// all takes one fault per folio, which maps the whole folio writable.
Napi::Value UnmapPages(const Napi::CallbackInfo& info) {
  int64_t at = ArgUint(info, 1, "at");
  int64_t length = ArgUint(info, 2, "length");
  uint8_t* start = MappingSpan(info, "unmapPages", at, static_cast<size_t>(length));
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  uintptr_t first = reinterpret_cast<uintptr_t>(start) & ~(page - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(start) + static_cast<uintptr_t>(length) + page - 1) & ~(page - 1);
  if (end > first && madvise(reinterpret_cast<void*>(first), end - first, MADV_DONTNEED) < 0) {
    throw ErrnoError(info.Env(), errno, "madvise");
  }
  return info.Env().Undefined();
}

// threadMinorFaults(): minor page faults of the calling thread so far (getrusage RUSAGE_THREAD).
Napi::Value ThreadMinorFaults(const Napi::CallbackInfo& info) {
  rusage ru{};
  if (getrusage(RUSAGE_THREAD, &ru) < 0) throw ErrnoError(info.Env(), errno, "getrusage");
  return Napi::Number::New(info.Env(), static_cast<double>(ru.ru_minflt));
}

}  // namespace

void InitMemory(Napi::Env env, Napi::Object exports) {
  exports.Set("mapFile", Napi::Function::New(env, MapFile, "mapFile"));
  exports.Set("copyIntoMapping", Napi::Function::New(env, CopyIntoMapping, "copyIntoMapping"));
  exports.Set("residentNow", Napi::Function::New(env, ResidentNow, "residentNow"));
  exports.Set("unmapPages", Napi::Function::New(env, UnmapPages, "unmapPages"));
  exports.Set("threadMinorFaults", Napi::Function::New(env, ThreadMinorFaults, "threadMinorFaults"));
  exports.Set("allocAligned", Napi::Function::New(env, AllocAligned, "allocAligned"));
  exports.Set("alignment", Napi::Function::New(env, Alignment, "alignment"));
}

}  // namespace snapblock
