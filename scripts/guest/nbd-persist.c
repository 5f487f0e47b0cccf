// nbd-persist: the netlink "persist mode" that nbd-client 3.24 (Debian 12) lacks.
//
// nbd-client 3.24 attaches a device over netlink and exits; its -persist flag
// only works on the old ioctl path, where Linux 6.1's NBD_DO_IT returns 0 when
// the connection dies and nbd-client takes that as "quit" (and the kernel has
// already failed the queued IO, since the ioctl path has no dead-connection
// timeout). Netlink persist mode arrived upstream in nbd 3.27 (2026). This
// helper does what that version does, for a device nbd-client already attached:
//
//   1. NBD_CMD_RECONFIGURE with NBD_ATTR_DEAD_CONN_TIMEOUT: while no connection
//      is alive, the kernel holds IO for that long instead of failing it;
//   2. listen on the nbd netlink multicast group for NBD_CMD_LINK_DEAD;
//   3. on it: connect, negotiate (fixed newstyle, NBD_OPT_EXPORT_NAME), check
//      the size is unchanged, and hand the socket over with NBD_CMD_RECONFIGURE
//      + NBD_ATTR_SOCKETS; the kernel resends what the dead connection had not
//      completed. Retries every 500 ms until it succeeds.
//
// Usage: nbd-persist INDEX HOST PORT EXPORT DEAD_CONN_TIMEOUT_S
// Built statically by build.sh for the test guest. Logs to stderr.
#include <arpa/inet.h>
#include <errno.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/netlink.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static unsigned idx;
static const char *host, *port_s, *export_name;

static void logf_(const char *fmt, ...) {
  struct timespec ts;
  clock_gettime(CLOCK_BOOTTIME, &ts);
  fprintf(stderr, "nbd-persist [%ld.%02ld]: ", (long)ts.tv_sec, ts.tv_nsec / 10000000);
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
}
#define die(...) (logf_(__VA_ARGS__), exit(1))

// ---- a tiny generic netlink message builder ---------------------------------
struct msg {
  char buf[1024] __attribute__((aligned(NLMSG_ALIGNTO)));
  size_t len;
};

static void msg_init(struct msg *m, uint16_t family, uint8_t cmd, uint16_t flags) {
  memset(m, 0, sizeof *m);
  struct nlmsghdr *h = (struct nlmsghdr *)m->buf;
  h->nlmsg_type = family;
  h->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | flags;
  struct genlmsghdr *g = NLMSG_DATA(h);
  g->cmd = cmd;
  g->version = 1;
  m->len = NLMSG_LENGTH(GENL_HDRLEN);
}

static struct nlattr *attr_put(struct msg *m, uint16_t type, const void *data, size_t n) {
  struct nlattr *a = (struct nlattr *)(m->buf + m->len);
  a->nla_type = type;
  a->nla_len = NLA_HDRLEN + n;
  if (n) memcpy((char *)a + NLA_HDRLEN, data, n);
  m->len += NLA_ALIGN(a->nla_len);
  return a;
}
static void attr_end(struct msg *m, struct nlattr *nest) { nest->nla_len = (char *)(m->buf + m->len) - (char *)nest; }

// Send and wait for the ack (or the first reply, copied into reply if given).
static int nl_call(int fd, struct msg *m, char *reply, size_t reply_len) {
  struct nlmsghdr *h = (struct nlmsghdr *)m->buf;
  static uint32_t seq = 1;
  h->nlmsg_len = m->len;
  h->nlmsg_seq = ++seq;
  struct sockaddr_nl to = {.nl_family = AF_NETLINK};
  if (sendto(fd, m->buf, m->len, 0, (struct sockaddr *)&to, sizeof to) < 0) return -errno;
  char buf[8192] __attribute__((aligned(NLMSG_ALIGNTO)));
  for (;;) {
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n < 0) return -errno;
    for (struct nlmsghdr *r = (struct nlmsghdr *)buf; NLMSG_OK(r, n); r = NLMSG_NEXT(r, n)) {
      if (r->nlmsg_seq != h->nlmsg_seq) continue;
      if (r->nlmsg_type == NLMSG_ERROR) return ((struct nlmsgerr *)NLMSG_DATA(r))->error;
      if (reply) memcpy(reply, r, r->nlmsg_len < reply_len ? r->nlmsg_len : reply_len);
    }
  }
}

// Resolve the "nbd" family id and its multicast group id.
static void resolve(int fd, uint16_t *family, uint32_t *group) {
  struct msg m;
  msg_init(&m, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 0);
  attr_put(&m, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME, sizeof NBD_GENL_FAMILY_NAME);
  char reply[4096] __attribute__((aligned(NLMSG_ALIGNTO)));
  memset(reply, 0, sizeof reply);
  int r = nl_call(fd, &m, reply, sizeof reply);
  if (r < 0) die("resolving the nbd netlink family: %s (nbd module loaded?)", strerror(-r));
  struct nlmsghdr *h = (struct nlmsghdr *)reply;
  *family = 0, *group = 0;
  int rem = h->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN);
  for (struct nlattr *a = (struct nlattr *)((char *)NLMSG_DATA(h) + GENL_HDRLEN); rem >= NLA_HDRLEN && a->nla_len >= NLA_HDRLEN && a->nla_len <= rem;
       rem -= NLA_ALIGN(a->nla_len), a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len))) {
    int type = a->nla_type & NLA_TYPE_MASK;
    if (type == CTRL_ATTR_FAMILY_ID) *family = *(uint16_t *)((char *)a + NLA_HDRLEN);
    if (type != CTRL_ATTR_MCAST_GROUPS) continue;
    // nested: [index] { NAME, ID }
    int rem2 = a->nla_len - NLA_HDRLEN;
    for (struct nlattr *g = (struct nlattr *)((char *)a + NLA_HDRLEN); rem2 >= NLA_HDRLEN && g->nla_len >= NLA_HDRLEN && g->nla_len <= rem2;
         rem2 -= NLA_ALIGN(g->nla_len), g = (struct nlattr *)((char *)g + NLA_ALIGN(g->nla_len))) {
      int rem3 = g->nla_len - NLA_HDRLEN;
      const char *name = NULL;
      uint32_t id = 0;
      for (struct nlattr *x = (struct nlattr *)((char *)g + NLA_HDRLEN); rem3 >= NLA_HDRLEN && x->nla_len >= NLA_HDRLEN && x->nla_len <= rem3;
           rem3 -= NLA_ALIGN(x->nla_len), x = (struct nlattr *)((char *)x + NLA_ALIGN(x->nla_len))) {
        if ((x->nla_type & NLA_TYPE_MASK) == CTRL_ATTR_MCAST_GRP_NAME) name = (char *)x + NLA_HDRLEN;
        if ((x->nla_type & NLA_TYPE_MASK) == CTRL_ATTR_MCAST_GRP_ID) id = *(uint32_t *)((char *)x + NLA_HDRLEN);
      }
      if (name && strcmp(name, NBD_GENL_MCAST_GROUP_NAME) == 0) *group = id;
    }
  }
  if (!*family || !*group) die("nbd netlink family or its multicast group not found");
}

// ---- NBD handshake ----------------------------------------------------------
static int read_full(int fd, void *p, size_t n) {
  for (size_t got = 0; got < n;) {
    ssize_t r = read(fd, (char *)p + got, n - got);
    if (r <= 0) return -1;
    got += r;
  }
  return 0;
}
static int write_full(int fd, const void *p, size_t n) {
  for (size_t done = 0; done < n;) {
    ssize_t r = write(fd, (const char *)p + done, n - done);
    if (r <= 0) return -1;
    done += r;
  }
  return 0;
}
static uint64_t be64(const unsigned char *b) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = v << 8 | b[i];
  return v;
}

// Connect and negotiate; returns the socket, or -1 (with a reason logged).
static int connect_export(uint64_t want_size) {
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(port_s))};
  if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) die("HOST must be an IPv4 address");
  int s = socket(AF_INET, SOCK_STREAM, 0);
  if (s < 0) die("socket: %s", strerror(errno));
  struct timeval tv = {.tv_sec = 10};
  setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  int one = 1;
  setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  const char *why = NULL;
  unsigned char hello[18], srv[10 + 124];
  if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
    why = strerror(errno);
    goto fail;
  }
  if (read_full(s, hello, 18) < 0) {
    why = "closed during the greeting (server down?)";
    goto fail;
  }
  if (memcmp(hello, "NBDMAGIC", 8) != 0 || be64(hello + 8) != 0x49484156454F5054ULL) {
    why = "not a newstyle NBD server";
    goto fail;
  }
  uint16_t hflags = hello[16] << 8 | hello[17];
  if (!(hflags & 1)) {
    why = "server is not fixed newstyle";
    goto fail;
  }
  uint32_t cflags = htonl(1 | (hflags & 2)); // FIXED_NEWSTYLE, NO_ZEROES if offered
  size_t nlen = strlen(export_name);
  unsigned char opt[16 + 256];
  if (nlen > 256) die("export name too long");
  memcpy(opt, "IHAVEOPT", 8);
  uint32_t o = htonl(1 /* NBD_OPT_EXPORT_NAME */), l = htonl(nlen);
  memcpy(opt + 8, &o, 4);
  memcpy(opt + 12, &l, 4);
  memcpy(opt + 16, export_name, nlen);
  if (write_full(s, &cflags, 4) < 0 || write_full(s, opt, 16 + nlen) < 0) {
    why = "write failed during negotiation";
    goto fail;
  }
  if (read_full(s, srv, (hflags & 2) ? 10 : 134) < 0) {
    why = "closed during negotiation (unknown export?)";
    goto fail;
  }
  if (be64(srv) != want_size) {
    logf_("export size changed: %llu, was %llu", (unsigned long long)be64(srv), (unsigned long long)want_size);
    why = "size changed";
    goto fail;
  }
  tv.tv_sec = 0;
  setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return s;
fail:
  logf_("connect %s:%s export '%s': %s", host, port_s, export_name, why);
  close(s);
  return -1;
}

static uint64_t device_size(void) {
  char path[64];
  snprintf(path, sizeof path, "/sys/block/nbd%u/size", idx);
  FILE *f = fopen(path, "r");
  unsigned long long sectors = 0;
  if (!f || fscanf(f, "%llu", &sectors) != 1) die("cannot read %s", path);
  fclose(f);
  return sectors * 512;
}

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: nbd-persist INDEX HOST PORT EXPORT DEAD_CONN_TIMEOUT_S\n");
    return 2;
  }
  idx = atoi(argv[1]), host = argv[2], port_s = argv[3], export_name = argv[4];
  uint64_t dead_timeout = strtoull(argv[5], NULL, 10);
  uint64_t size = device_size();
  if (!size) die("nbd%u is not attached", idx);

  int ctl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
  int mon = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
  if (ctl < 0 || mon < 0) die("netlink socket: %s", strerror(errno));
  uint16_t family;
  uint32_t group;
  resolve(ctl, &family, &group);
  // Bind first: an unbound netlink socket has port id 0, which is the kernel's
  // own, and multicasts from the kernel skip it. Join the group before
  // changing anything, so no LINK_DEAD is missed.
  struct sockaddr_nl self = {.nl_family = AF_NETLINK};
  if (bind(mon, (struct sockaddr *)&self, sizeof self) < 0) die("bind: %s", strerror(errno));
  if (setsockopt(mon, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof group) < 0) die("join nbd_mc_group: %s", strerror(errno));

  struct msg m;
  msg_init(&m, family, NBD_CMD_RECONFIGURE, 0);
  attr_put(&m, NBD_ATTR_INDEX, &idx, 4);
  attr_put(&m, NBD_ATTR_DEAD_CONN_TIMEOUT, &dead_timeout, 8);
  int r = nl_call(ctl, &m, NULL, 0);
  if (r < 0) die("NBD_CMD_RECONFIGURE dead_conn_timeout=%llu: %s", (unsigned long long)dead_timeout, strerror(-r));
  logf_("watching nbd%u (%llu bytes), dead connection timeout %llu s", idx, (unsigned long long)size, (unsigned long long)dead_timeout);

  char buf[8192] __attribute__((aligned(NLMSG_ALIGNTO)));
  for (;;) {
    ssize_t n = recv(mon, buf, sizeof buf, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == ENOBUFS) { // overrun: events lost; treat as a possible dead link
        logf_("multicast overrun, checking the link");
      } else {
        die("recv: %s", strerror(errno));
      }
    }
    int dead = n < 0;
    for (struct nlmsghdr *h = (struct nlmsghdr *)buf; n > 0 && NLMSG_OK(h, n); h = NLMSG_NEXT(h, n)) {
      if (h->nlmsg_type != family) continue;
      struct genlmsghdr *g = NLMSG_DATA(h);
      if (g->cmd != NBD_CMD_LINK_DEAD) continue;
      int rem = h->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN);
      for (struct nlattr *a = (struct nlattr *)((char *)g + GENL_HDRLEN); rem >= NLA_HDRLEN && a->nla_len >= NLA_HDRLEN && a->nla_len <= rem;
           rem -= NLA_ALIGN(a->nla_len), a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len)))
        if ((a->nla_type & NLA_TYPE_MASK) == NBD_ATTR_INDEX && *(uint32_t *)((char *)a + NLA_HDRLEN) == idx) dead = 1;
    }
    if (!dead) continue;
    logf_("nbd%u: connection dead, reconnecting", idx);
    for (int attempt = 1;; attempt++) {
      int s = connect_export(size);
      if (s >= 0) {
        msg_init(&m, family, NBD_CMD_RECONFIGURE, 0);
        attr_put(&m, NBD_ATTR_INDEX, &idx, 4);
        struct nlattr *socks = attr_put(&m, NBD_ATTR_SOCKETS | NLA_F_NESTED, NULL, 0);
        struct nlattr *item = attr_put(&m, NBD_SOCK_ITEM | NLA_F_NESTED, NULL, 0);
        uint32_t fd = s;
        attr_put(&m, NBD_SOCK_FD, &fd, 4);
        attr_end(&m, item);
        attr_end(&m, socks);
        r = nl_call(ctl, &m, NULL, 0);
        close(s); // the kernel holds its own reference on success
        if (r == 0) {
          logf_("nbd%u: reconnected (attempt %d)", idx, attempt);
          break;
        }
        logf_("NBD_CMD_RECONFIGURE with the new socket: %s", strerror(-r));
        if (r == -ENOSPC) break; // no dead connection (anymore): nothing to replace
      }
      usleep(500000);
    }
  }
}
