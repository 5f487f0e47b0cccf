// Writing a reply to a connected socket from the thread pool: the kernel's TCP send path
// costs ~0.2 ms per MiB here, which on the JS thread serialises every connection's large
// replies behind one core. The caller (src/nbd/reply-writer.ts) owns ordering: while a
// write runs here, nothing else writes to the socket.
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <limits.h>
#include <memory>

#include "common.h"

namespace snapblock {

namespace {

// Sends iov in order; waits for room (poll) up to timeoutMs in all. *sent = bytes sent, short
// only when the timeout passed first. MSG_NOSIGNAL: a closed peer is EPIPE, never SIGPIPE.
SysStatus SendAll(int fd, IoVec iov, int timeoutMs, int64_t* sent) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeoutMs);
  *sent = 0;
  size_t first = 0;
  while (first < iov.size()) {
    msghdr msg{};
    msg.msg_iov = &iov[first];
    msg.msg_iovlen = static_cast<size_t>(Chunk(iov, first));
    ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) return {errno, "sendmsg"};
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return {};
      pollfd p{fd, POLLOUT, 0};
      if (poll(&p, 1, static_cast<int>(left)) < 0 && errno != EINTR) return {errno, "poll"};
      continue;
    }
    *sent += n;
    Advance(iov, first, static_cast<size_t>(n));
  }
  return {};
}

// sendBuffers(fd, bufs, timeoutMs): resolves with the bytes sent (short only on timeout).
Napi::Value SendBuffers(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0);
  std::vector<Napi::Object> keep;
  IoVec iov = BufferList(info, keep);
  int64_t timeoutMs = ArgUint(info, 2, "timeoutMs");
  auto sent = std::make_shared<int64_t>(0);
  int timeout = static_cast<int>(std::min<int64_t>(timeoutMs, INT_MAX));
  return Job::Start(
      env, "sendmsg", keep, [=] { return SendAll(fd, iov, timeout, sent.get()); },
      [sent](Napi::Env e) { return Napi::Number::New(e, static_cast<double>(*sent)); });
}

}  // namespace

void InitSocketIo(Napi::Env env, Napi::Object exports) {
  exports.Set("sendBuffers", Napi::Function::New(env, SendBuffers, "sendBuffers"));
}

}  // namespace snapblock
