/*
 * tartarus-agent - the guest agent of Tartarus sandboxes.
 *
 * One static binary with two jobs:
 *  - as PID 1 it assembles the root filesystem (read-only base image plus the
 *    per-sandbox writable layer, joined by overlayfs), switches into it, reaps
 *    every orphan and keeps the serving agent alive;
 *  - the serving agent speaks the frame protocol of docs/protocol.md over the
 *    virtio-serial port "org.tartarus.agent.0", or, for host-side tests, over
 *    an inherited file descriptor (--serve-fd N).
 *
 * The serving agent is single-threaded: one poll() loop multiplexes the port,
 * the pipes of running commands, file reads in progress and a signalfd for
 * SIGCHLD.  Everything the host sends is treated as hostile input.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/random.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION "0.1.0"
#define PROTO_VERSION 3
#define PORT_NAME "org.tartarus.agent.0"

#define HDR_LEN 12
#define MAX_PAYLOAD (1u << 20)
#define MAX_REQS 256              /* execs + reads + writes in flight */
#define MAX_LIST 4096             /* ARGV / ENV entries */
#define MAX_LIST_LEN (128 * 1024) /* one ARGV / ENV entry */
#define PIPE_CHUNK (64 * 1024)
#define DATA_CHUNK (256 * 1024)
#define STDIN_MAX (16u << 20)
#define DRAIN_MS 100
#define FRAME_COST 256           /* window bytes a data frame costs beyond its payload */
#define FINISH_MAX (1 << 20)      /* output still forwarded from a pipe after the drain time */
#define HOST_POLL_MS 20           /* how often a closed port is checked for a returning host */              /* pipe draining after the command was reaped */
#define RM_MAX_DEPTH 256          /* recursive REMOVE holds one fd per level */
#define PTY_MAX_SIZE 1000         /* rows and columns of a terminal */
#define DEFAULT_TERM "TERM=xterm-256color"
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* Frame types. */
enum {
	T_PING = 0x01, T_EXEC, T_STDIN, T_SIGNAL, T_READ, T_WRITE, T_WRITE_DATA,
	T_WRITE_END, T_LIST, T_STAT, T_MKDIR, T_REMOVE, T_RENAME, T_CONFIGURE,
	T_RESIZE, T_CREDIT, T_DETACH,
	T_HELLO = 0x80, T_OK, T_STARTED, T_STDOUT, T_STDERR, T_EXIT, T_DATA,
	T_END, T_ENTRY, T_ERROR = 0x8F,
};

/* Field tags. */
enum {
	F_ARGV = 1, F_ENV, F_CWD, F_UID, F_GID, F_TIMEOUT_MS, F_STDIN, F_PATH,
	F_NEWPATH, F_MODE, F_FLAGS, F_PID, F_EXIT_CODE, F_SIGNAL, F_TIMED_OUT,
	F_ERRNO, F_MESSAGE, F_SIZE, F_NAME, F_TYPE, F_MTIME_NS, F_LINK,
	F_VERSION, F_TIME_NS, F_ENTROPY, F_HOSTNAME, F_USER, F_MACHINE_ID,
	F_ROWS, F_COLS, F_WINDOW, F_MAX
};

/* Field kinds: K_BYTES is like a string but may hold NUL (ENTROPY). */
enum { K_UNKNOWN, K_INT, K_STR, K_BYTES, K_LIST };

static const struct { unsigned char kind; const char *name; } fields[F_MAX] = {
	[F_ARGV] = { K_LIST, "ARGV" }, [F_ENV] = { K_LIST, "ENV" }, [F_CWD] = { K_STR, "CWD" },
	[F_UID] = { K_INT, "UID" }, [F_GID] = { K_INT, "GID" },
	[F_TIMEOUT_MS] = { K_INT, "TIMEOUT_MS" }, [F_STDIN] = { K_INT, "STDIN" },
	[F_PATH] = { K_STR, "PATH" }, [F_NEWPATH] = { K_STR, "NEWPATH" },
	[F_MODE] = { K_INT, "MODE" }, [F_FLAGS] = { K_INT, "FLAGS" }, [F_PID] = { K_INT, "PID" },
	[F_EXIT_CODE] = { K_INT, "EXIT_CODE" }, [F_SIGNAL] = { K_INT, "SIGNAL" },
	[F_TIMED_OUT] = { K_INT, "TIMED_OUT" }, [F_ERRNO] = { K_INT, "ERRNO" },
	[F_MESSAGE] = { K_STR, "MESSAGE" }, [F_SIZE] = { K_INT, "SIZE" },
	[F_NAME] = { K_STR, "NAME" }, [F_TYPE] = { K_INT, "TYPE" },
	[F_MTIME_NS] = { K_INT, "MTIME_NS" }, [F_LINK] = { K_STR, "LINK" },
	[F_VERSION] = { K_INT, "VERSION" }, [F_TIME_NS] = { K_INT, "TIME_NS" },
	[F_ENTROPY] = { K_BYTES, "ENTROPY" }, [F_HOSTNAME] = { K_STR, "HOSTNAME" },
	[F_USER] = { K_STR, "USER" }, [F_MACHINE_ID] = { K_STR, "MACHINE_ID" },
	[F_ROWS] = { K_INT, "ROWS" }, [F_COLS] = { K_INT, "COLS" },
	[F_WINDOW] = { K_INT, "WINDOW" },
};

#define FLAG_RECURSIVE 1 /* also "parents" for MKDIR */
#define FLAG_APPEND 2

/* ------------------------------------------------------------------ */
/* Small helpers                                                       */

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	/* One write per line, so init and agent messages never interleave mid-line. */
	dprintf(STDERR_FILENO, "tartarus-agent: %s\n", buf);
}

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static uint32_t get_be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t get_be64(const uint8_t *p)
{
	return (uint64_t)get_be32(p) << 32 | get_be32(p + 4);
}

static void put_be32(uint8_t *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

static void put_be64(uint8_t *p, uint64_t v)
{
	put_be32(p, v >> 32);
	put_be32(p + 4, (uint32_t)v);
}

static void xclose(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void set_nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* Writes all of buf to fd; returns 0 or an errno value. */
static int write_all(int fd, const void *buf, size_t n)
{
	const uint8_t *p = buf;

	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return errno;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n);
	if (!p) {
		logmsg("out of memory");
		exit(1);
	}
	return p;
}

static char *xstrdup(const char *s)
{
	return strcpy(xrealloc(NULL, strlen(s) + 1), s);
}

/* ------------------------------------------------------------------ */
/* Requests in flight                                                  */

enum { R_FREE, R_EXEC, R_READ, R_WRITE };

struct req {
	int kind;
	uint32_t id;
	/* R_EXEC */
	pid_t pid;
	int out_fd, err_fd, in_fd;   /* -1 once closed; a PTY exec: out_fd is the master, in_fd a dup */
	bool pty;
	uint8_t *in_buf;             /* pending stdin is in_buf[in_off, in_len) */
	size_t in_off, in_len, in_cap;
	bool in_eof;                 /* host asked to close stdin once drained */
	bool reaped, timed_out;
	int status;
	int64_t deadline;            /* timeout (monotonic ms), 0 = none */
	int64_t drain_until;         /* after reaping, give up on pipe EOF then */
	int64_t out_left, err_left;  /* after the drain time: bytes still forwarded before closing, -1 = not yet */
	bool detached;               /* the host stopped listening: output is discarded, no EXIT */
	/* R_EXEC, R_READ: window bytes the host still grants for output (CREDIT), -1 = no flow control */
	int64_t credit;
	/* R_READ, R_WRITE */
	int fd;
	uint64_t size;
	char *path;                  /* READ: for messages; WRITE: final name */
	char *tmp;                   /* WRITE: temporary file (NULL when appending) */
};

static struct req reqs[MAX_REQS];
static int port_fd = -1;
/*
 * Serving the virtio port, a closed host side is a daemon restarting: the
 * agent waits for the next host instead of exiting (see host_left()).
 */
static bool reconnectable;
static bool host_present = true;
/* Requests with ids from here up are the sandbox's own processes (interpreter, start command). */
#define RESERVED_IDS 0xFFFF0000u
static struct rlimit orig_nofile;

static struct req *find_req(uint32_t id, int kind)
{
	for (int i = 0; i < MAX_REQS; i++)
		if (reqs[i].kind == kind && reqs[i].id == id)
			return &reqs[i];
	return NULL;
}

static void free_req(struct req *r)
{
	xclose(&r->out_fd);
	xclose(&r->err_fd);
	xclose(&r->in_fd);
	xclose(&r->fd);
	if (r->tmp)
		unlink(r->tmp);
	free(r->in_buf);
	free(r->path);
	free(r->tmp);
	memset(r, 0, sizeof *r);
	r->out_fd = r->err_fd = r->in_fd = r->fd = -1;
	r->out_left = r->err_left = r->credit = -1;
	r->kind = R_FREE;
}

/* How many output bytes r may send in one frame now (at most max): its credit less the frame's cost. */
static size_t sendable(const struct req *r, size_t max)
{
	if (r->credit < 0 || r->detached)
		return max;
	if (r->credit <= FRAME_COST)
		return 0;
	return (uint64_t)(r->credit - FRAME_COST) < max ? (size_t)(r->credit - FRAME_COST) : max;
}

static void charge(struct req *r, size_t n)
{
	if (r->credit >= 0)
		r->credit -= (int64_t)n + FRAME_COST;
}

static void kill_session(pid_t sid, int sig);

/* Kills what we started and leaves; init restarts us. */
static void __attribute__((noreturn)) shutdown_agent(int code)
{
	for (int i = 0; i < MAX_REQS; i++) {
		if (reqs[i].kind == R_EXEC && !reqs[i].reaped) {
			if (reqs[i].pty)
				kill_session(reqs[i].pid, SIGKILL);
			else
				kill(-reqs[i].pid, SIGKILL);
		}
		free_req(&reqs[i]);
	}
	exit(code);
}

/* ------------------------------------------------------------------ */
/* Sending frames                                                      */

/* Data frames are read straight behind their header, so they are never copied. */
static uint8_t iobuf[HDR_LEN + DATA_CHUNK];
/* Field frames are assembled here, header first. */
static struct { uint8_t *p; size_t len, cap; } ob;

/* Blocking write: the host reads the port promptly (protocol contract). */
static void write_port(const void *buf, size_t n)
{
	int e = write_all(port_fd, buf, n);
	if (e) {
		logmsg("writing to the port: %s", strerror(e));
		shutdown_agent(1);
	}
}

static void fill_header(uint8_t *h, uint32_t len, uint32_t id, uint8_t type)
{
	put_be32(h, len);
	put_be32(h + 4, id);
	h[8] = type;
	h[9] = h[10] = h[11] = 0;
}

static void send_iobuf(uint32_t id, uint8_t type, size_t n)
{
	fill_header(iobuf, (uint32_t)n, id, type);
	write_port(iobuf, HDR_LEN + n);
}

static void ob_reserve(size_t n)
{
	if (ob.len + n <= ob.cap)
		return;
	size_t cap = ob.cap ? ob.cap : 4096;
	while (cap < ob.len + n)
		cap *= 2;
	ob.p = xrealloc(ob.p, cap);
	ob.cap = cap;
}

static void ob_begin(void)
{
	ob.len = 0;
	ob_reserve(HDR_LEN);
	ob.len = HDR_LEN;
}

static void put_field(uint8_t tag, const void *v, size_t n)
{
	ob_reserve(5 + n);
	ob.p[ob.len] = tag;
	put_be32(ob.p + ob.len + 1, (uint32_t)n);
	if (n)
		memcpy(ob.p + ob.len + 5, v, n);
	ob.len += 5 + n;
}

static void put_int(uint8_t tag, int64_t v)
{
	uint8_t b[8];

	put_be64(b, (uint64_t)v);
	put_field(tag, b, 8);
}

static void put_str(uint8_t tag, const char *s)
{
	put_field(tag, s, strlen(s));
}

static void ob_send(uint32_t id, uint8_t type)
{
	fill_header(ob.p, (uint32_t)(ob.len - HDR_LEN), id, type);
	write_port(ob.p, ob.len);
}

static void send_ok(uint32_t id)
{
	ob_begin();
	ob_send(id, T_OK);
}

static void send_error(uint32_t id, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void send_error(uint32_t id, int err, const char *fmt, ...)
{
	char msg[PATH_MAX + 256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	ob_begin();
	put_int(F_ERRNO, err);
	put_str(F_MESSAGE, msg);
	ob_send(id, T_ERROR);
}

/* ERROR for a failed call on a path, errno given: "<what> <path>: <reason>". */
static void send_syserr(uint32_t id, int err, const char *what, const char *path)
{
	send_error(id, err, "%s %s: %s", what, path, strerror(err));
}

/* Takes a free slot for a new request, or answers ERROR and returns NULL. */
static struct req *new_req(uint32_t id, int kind)
{
	struct req *slot = NULL;

	for (int i = 0; i < MAX_REQS; i++) {
		if (reqs[i].kind == R_FREE) {
			if (!slot)
				slot = &reqs[i];
		} else if (reqs[i].id == id) {
			send_error(id, EBUSY, "request id %u is already in flight", id);
			return NULL;
		}
	}
	if (!slot) {
		send_error(id, EAGAIN, "too many requests in flight (max %d)", MAX_REQS);
		return NULL;
	}
	free_req(slot);
	slot->kind = kind;
	slot->id = id;
	return slot;
}

/* ------------------------------------------------------------------ */
/* Parsing fields                                                      */

struct msg {
	bool has[F_MAX];
	int64_t num[F_MAX];
	char *str[F_MAX];       /* NUL-terminated copies */
	size_t slen[F_MAX];
	char *argv[MAX_LIST + 1];
	size_t argc;
	char *env[MAX_LIST + 1];
	size_t envc;
	char *arena;            /* holds the string copies */
	int err;                /* first validation error, 0 if none */
	char errmsg[128];
};

static struct msg M;

static void field_error(struct msg *m, int err, unsigned tag, const char *what)
{
	if (!m->err) {
		m->err = err;
		snprintf(m->errmsg, sizeof m->errmsg, "field %s %s", fields[tag].name, what);
	}
}

/*
 * Parses a field payload into m.  Returns -1 on a structural error (a field
 * running past the payload: a protocol violation).  Validation problems are
 * recorded in m->err, but the scan goes on so that a later overrun is still
 * seen as the protocol error it is.
 */
static int parse_fields(const uint8_t *p, uint32_t len, struct msg *m)
{
	size_t off = 0, ap = 0;

	free(m->arena);
	memset(m->has, 0, sizeof m->has);
	m->argc = m->envc = 0;
	m->argv[0] = m->env[0] = NULL;
	m->err = 0;
	/* Every string needs n+1 bytes and its field header is 5: len+1 always suffices. */
	m->arena = xrealloc(NULL, (size_t)len + 1);

	while (off < len) {
		if (len - off < 5)
			return -1;
		unsigned tag = p[off];
		uint32_t n = get_be32(p + off + 1);
		off += 5;
		if (n > len - off)
			return -1;
		const uint8_t *v = p + off;
		off += n;

		int kind = tag < F_MAX ? fields[tag].kind : K_UNKNOWN;
		if (kind == K_UNKNOWN)
			continue; /* forward compatibility */
		if (kind != K_LIST && m->has[tag]) {
			field_error(m, EINVAL, tag, "must not repeat");
			continue;
		}
		if (kind == K_INT) {
			if (n != 8) {
				field_error(m, EINVAL, tag, "must be an 8-byte integer");
				continue;
			}
			m->num[tag] = (int64_t)get_be64(v);
			m->has[tag] = true;
			continue;
		}
		if (n > (kind == K_LIST ? MAX_LIST_LEN : PATH_MAX - 1)) {
			field_error(m, kind == K_LIST ? E2BIG : ENAMETOOLONG, tag, "is too long");
			continue;
		}
		if (kind != K_BYTES && memchr(v, 0, n)) {
			field_error(m, EINVAL, tag, "contains a NUL byte");
			continue;
		}
		char *s = m->arena + ap;
		if (n)
			memcpy(s, v, n);
		s[n] = 0;
		ap += (size_t)n + 1;
		if (kind == K_LIST) {
			char **vec = tag == F_ARGV ? m->argv : m->env;
			size_t *cnt = tag == F_ARGV ? &m->argc : &m->envc;
			if (*cnt >= MAX_LIST) {
				field_error(m, E2BIG, tag, "has too many entries");
				continue;
			}
			vec[(*cnt)++] = s;
			vec[*cnt] = NULL;
		} else {
			m->str[tag] = s;
			m->slen[tag] = n;
			m->has[tag] = true;
		}
	}
	return 0;
}

/* Returns the absolute path in field tag, or answers ERROR and returns NULL. */
static const char *need_path(uint32_t id, struct msg *m, int tag)
{
	const char *name = tag == F_PATH ? "PATH" : "NEWPATH";

	if (!m->has[tag]) {
		send_error(id, EINVAL, "%s is required", name);
		return NULL;
	}
	if (m->str[tag][0] != '/') {
		send_error(id, EINVAL, "%s must be absolute: %s", name, m->str[tag]);
		return NULL;
	}
	return m->str[tag];
}

static bool get_mode(uint32_t id, struct msg *m, mode_t def, mode_t *mode)
{
	*mode = def;
	if (!m->has[F_MODE])
		return true;
	if (m->num[F_MODE] < 0 || m->num[F_MODE] > 07777) {
		send_error(id, EINVAL, "MODE out of range");
		return false;
	}
	*mode = (mode_t)m->num[F_MODE];
	return true;
}

static int64_t get_flags(struct msg *m)
{
	return m->has[F_FLAGS] ? m->num[F_FLAGS] : 0;
}

/* ------------------------------------------------------------------ */
/* EXEC                                                                */

/* What the exec child tells the parent through the CLOEXEC error pipe. */
enum { ST_DEVNULL, ST_DUP, ST_TTY, ST_SETGROUPS, ST_SETGID, ST_SETUID, ST_CHDIR, ST_EXEC };
struct child_err { int stage, err; };

struct spec {
	bool set_cred;
	uid_t uid;
	gid_t gid;
	char home[PATH_MAX];
	char home_env[PATH_MAX + 8];
	char **envp;
	const char *path;       /* PATH used for the executable search */
	const char *cwd;
	bool pty;
	struct winsize ws;      /* initial terminal size of a PTY exec */
};

static struct spec S;
static char default_path_env[] = "PATH=" DEFAULT_PATH;
static char default_term_env[] = DEFAULT_TERM;

/*
 * Looks up a user by name (name != NULL) or by uid in /etc/passwd.  Parsed by
 * hand because getpwnam() would drag NSS into a static binary.
 */
static bool passwd_lookup(const char *name, uid_t uid, uid_t *pu, gid_t *pg, char *home, size_t homesz)
{
	FILE *f = fopen("/etc/passwd", "re");
	char *line = NULL;
	size_t cap = 0;
	bool found = false;

	if (!f)
		return false;
	while (!found && getline(&line, &cap, f) > 0) {
		char *fld[7], *rest = line;
		int n = 0;
		line[strcspn(line, "\n")] = 0;
		while (n < 7 && rest)
			fld[n++] = strsep(&rest, ":");
		if (n < 7)
			continue;
		char *e1, *e2;
		errno = 0;
		unsigned long u = strtoul(fld[2], &e1, 10), g = strtoul(fld[3], &e2, 10);
		if (errno || !*fld[2] || *e1 || !*fld[3] || *e2 || u >= UINT32_MAX || g >= UINT32_MAX)
			continue;
		if (name ? strcmp(fld[0], name) == 0 : u == uid) {
			*pu = (uid_t)u;
			*pg = (gid_t)g;
			snprintf(home, homesz, "%s", *fld[5] ? fld[5] : "/");
			found = true;
		}
	}
	free(line);
	fclose(f);
	return found;
}

/* USER supplies uid, gid and HOME; explicit UID/GID override the first two. */
static bool resolve_cred(uint32_t id, struct msg *m, struct spec *s)
{
	uid_t pu;
	gid_t pg;

	s->uid = geteuid();
	s->gid = getegid();
	s->set_cred = false;
	strcpy(s->home, "/");
	if (m->has[F_UID] != m->has[F_GID]) {
		send_error(id, EINVAL, "UID and GID must be given together");
		return false;
	}
	if (m->has[F_UID]) {
		if (m->num[F_UID] < 0 || m->num[F_UID] >= UINT32_MAX ||
		    m->num[F_GID] < 0 || m->num[F_GID] >= UINT32_MAX) {
			send_error(id, EINVAL, "UID/GID out of range");
			return false;
		}
	}
	if (m->has[F_USER]) {
		if (!passwd_lookup(m->str[F_USER], 0, &s->uid, &s->gid, s->home, sizeof s->home)) {
			send_error(id, EINVAL, "unknown user %s", m->str[F_USER]);
			return false;
		}
		s->set_cred = true;
	} else {
		uid_t want = m->has[F_UID] ? (uid_t)m->num[F_UID] : s->uid;
		passwd_lookup(NULL, want, &pu, &pg, s->home, sizeof s->home);
	}
	if (m->has[F_UID]) {
		s->uid = (uid_t)m->num[F_UID];
		s->gid = (gid_t)m->num[F_GID];
		s->set_cred = true;
	}
	return true;
}

/* The environment is exactly ENV, plus PATH and HOME when ENV lacks them. */
static bool build_env(uint32_t id, struct msg *m, struct spec *s)
{
	bool have_home = false, have_term = false;
	size_t n = 0;

	s->path = NULL;
	s->envp = xrealloc(NULL, (m->envc + 4) * sizeof *s->envp);
	for (size_t i = 0; i < m->envc; i++) {
		char *e = m->env[i], *eq = strchr(e, '=');
		if (!eq || eq == e) {
			send_error(id, EINVAL, "ENV entry is not KEY=VALUE: %.64s", e);
			free(s->envp);
			s->envp = NULL;
			return false;
		}
		if (!s->path && strncmp(e, "PATH=", 5) == 0)
			s->path = e + 5;
		if (strncmp(e, "HOME=", 5) == 0)
			have_home = true;
		if (strncmp(e, "TERM=", 5) == 0)
			have_term = true;
		s->envp[n++] = e;
	}
	if (!s->path) {
		s->envp[n++] = default_path_env;
		s->path = DEFAULT_PATH;
	}
	if (!have_home) {
		snprintf(s->home_env, sizeof s->home_env, "HOME=%s", s->home);
		s->envp[n++] = s->home_env;
	}
	if (s->pty && !have_term)
		s->envp[n++] = default_term_env;
	s->envp[n] = NULL;
	return true;
}

/* execvp() with an explicit environment and PATH; returns with errno on failure. */
static void exec_search(char *const argv[], char *const envp[], const char *path)
{
	const char *file = argv[0];
	size_t flen = strlen(file);
	bool eacces = false;
	char buf[PATH_MAX];

	if (strchr(file, '/')) {
		execve(file, argv, envp);
		return;
	}
	for (const char *p = path;; ) {
		const char *e = strchrnul(p, ':');
		size_t dlen = (size_t)(e - p);
		if (dlen + 1 + flen < sizeof buf) {
			/* An empty PATH element means the current directory. */
			if (dlen == 0)
				buf[dlen++] = '.';
			else
				memcpy(buf, p, dlen);
			buf[dlen] = '/';
			memcpy(buf + dlen + 1, file, flen + 1);
			execve(buf, argv, envp);
			if (errno == EACCES)
				eacces = true;
			else if (errno != ENOENT && errno != ENOTDIR && errno != ELOOP && errno != ENAMETOOLONG)
				return;
		}
		if (!*e)
			break;
		p = e + 1;
	}
	errno = eacces ? EACCES : ENOENT;
}

/*
 * Runs in the forked child; never returns.  fd[] = stdin (-1: /dev/null),
 * stdout, stderr, controlling terminal (-1: none), error pipe.  A PTY exec
 * passes the terminal's slave as all of the first four.
 */
static void __attribute__((noreturn)) exec_child(struct msg *m, struct spec *s, const int fd[5])
{
	sigset_t none;
	struct child_err ce;
	int in = fd[0];

	/* Ignored dispositions and the blocked mask survive exec: reset them. */
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	setrlimit(RLIMIT_NOFILE, &orig_nofile);
	setsid(); /* own session and process group: pgid == pid */
	umask(022);

	ce.stage = ST_DEVNULL;
	if (in < 0 && (in = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0)
		goto fail;
	ce.stage = ST_DUP;
	/* fds 0-2 of the agent are always open, so none of these is already 0-2. */
	if (dup2(in, 0) < 0 || dup2(fd[1], 1) < 0 || dup2(fd[2], 2) < 0)
		goto fail;
	if (fd[3] >= 0) {
		/* The session leader takes the terminal: ^C, ^Z and job control work, and /dev/tty opens. */
		ce.stage = ST_TTY;
		if (ioctl(fd[3], TIOCSCTTY, 0) != 0)
			goto fail;
		/* Like login: the user owns its terminal (programs reopen it by name). */
		if (s->set_cred && fchown(fd[3], s->uid, (gid_t)-1) != 0)
			goto fail;
	}
	if (s->set_cred) {
		ce.stage = ST_SETGROUPS;
		if (geteuid() == 0 && setgroups(0, NULL) != 0)
			goto fail;
		ce.stage = ST_SETGID;
		if (setgid(s->gid) != 0)
			goto fail;
		ce.stage = ST_SETUID;
		if (setuid(s->uid) != 0)
			goto fail;
	}
	/* After dropping privileges, so the user needs access to the directory. */
	ce.stage = ST_CHDIR;
	if (chdir(s->cwd) != 0)
		goto fail;
	ce.stage = ST_EXEC;
	exec_search(m->argv, s->envp, s->path);
fail:
	ce.err = errno;
	if (write(fd[4], &ce, sizeof ce) < 0)
		_exit(126);
	_exit(127);
}

/* ROWS and COLS of an EXEC or RESIZE: both present, each 1..PTY_MAX_SIZE. */
static bool get_winsize(struct msg *m, struct winsize *ws)
{
	if (!m->has[F_ROWS] || !m->has[F_COLS] || m->num[F_ROWS] < 1 || m->num[F_ROWS] > PTY_MAX_SIZE ||
	    m->num[F_COLS] < 1 || m->num[F_COLS] > PTY_MAX_SIZE)
		return false;
	memset(ws, 0, sizeof *ws);
	ws->ws_row = (unsigned short)m->num[F_ROWS];
	ws->ws_col = (unsigned short)m->num[F_COLS];
	return true;
}

/* A pseudo-terminal of the given size: the master (non-blocking) and its slave, or errno. */
static int open_pty(const struct winsize *ws, int *master, int *slave)
{
	*slave = -1;
	*master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (*master < 0)
		return errno;
	/* TIOCGPTPEER opens this master's own slave: no path lookup another process could race. */
	if (unlockpt(*master) != 0 || ioctl(*master, TIOCSWINSZ, ws) != 0 ||
	    (*slave = ioctl(*master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0) {
		int e = errno;
		xclose(master);
		return e;
	}
	set_nonblock(*master);
	return 0;
}

/* The initial window of an EXEC or READ (WINDOW field), or answers ERROR and returns false. */
static bool get_window(uint32_t id, struct msg *m, int64_t *window)
{
	*window = -1; /* no WINDOW: no flow control (a host of protocol 2) */
	if (!m->has[F_WINDOW])
		return true;
	if (m->num[F_WINDOW] <= FRAME_COST) {
		send_error(id, EINVAL, "WINDOW must exceed %d bytes", FRAME_COST);
		return false;
	}
	*window = m->num[F_WINDOW];
	return true;
}

static void h_exec(uint32_t id, struct msg *m)
{
	struct spec *s = &S;
	/* stdin r/w, stdout r/w, stderr r/w, errpipe r/w; a PTY exec uses only the error pipe. */
	int p[8] = { -1, -1, -1, -1, -1, -1, -1, -1 };
	int master = -1, slave = -1;

	if (m->argc == 0 || !m->argv[0][0]) {
		send_error(id, EINVAL, "EXEC needs a non-empty ARGV");
		return;
	}
	int64_t timeout = m->has[F_TIMEOUT_MS] ? m->num[F_TIMEOUT_MS] : 0;
	int64_t want_stdin = m->has[F_STDIN] ? m->num[F_STDIN] : 0;
	if (timeout < 0 || (want_stdin != 0 && want_stdin != 1)) {
		send_error(id, EINVAL, "bad TIMEOUT_MS or STDIN value");
		return;
	}
	s->pty = m->has[F_ROWS] || m->has[F_COLS];
	if (s->pty && !get_winsize(m, &s->ws)) {
		send_error(id, EINVAL, "ROWS and COLS must be given together, each 1-%d", PTY_MAX_SIZE);
		return;
	}
	int64_t window;
	if (!get_window(id, m, &window))
		return;
	s->cwd = m->has[F_CWD] ? m->str[F_CWD] : "/";
	if (!resolve_cred(id, m, s) || !build_env(id, m, s))
		return;
	struct req *r = new_req(id, R_EXEC);
	if (!r)
		goto out;
	r->credit = window;

	pid_t pid = -1;
	int e = 0;
	if (s->pty) {
		e = open_pty(&s->ws, &master, &slave);
		if (!e && pipe2(p + 6, O_CLOEXEC) == 0)
			pid = fork();
	} else if ((!want_stdin || pipe2(p, O_CLOEXEC) == 0) && pipe2(p + 2, O_CLOEXEC) == 0 &&
		   pipe2(p + 4, O_CLOEXEC) == 0 && pipe2(p + 6, O_CLOEXEC) == 0) {
		pid = fork();
	}
	if (pid == 0) {
		const int fd[5] = { s->pty ? slave : p[0], s->pty ? slave : p[3], s->pty ? slave : p[5],
				    slave, p[7] };
		exec_child(m, s, fd);
	}
	e = e ? e : errno;
	xclose(&p[0]);
	xclose(&p[3]);
	xclose(&p[5]);
	xclose(&p[7]);
	xclose(&slave); /* the child holds it now: the master sees EIO once the last holder is gone */
	if (pid < 0) {
		xclose(&p[1]);
		xclose(&p[2]);
		xclose(&p[4]);
		xclose(&p[6]);
		xclose(&master);
		free_req(r);
		send_error(id, e, "cannot start %s: %s", m->argv[0], strerror(e));
		goto out;
	}

	/* Blocks only until the child execs (pipe closed by CLOEXEC) or fails. */
	struct child_err ce;
	ssize_t n;
	do
		n = read(p[6], &ce, sizeof ce);
	while (n < 0 && errno == EINTR);
	xclose(&p[6]);
	if (n == (ssize_t)sizeof ce) {
		waitpid(pid, NULL, 0);
		xclose(&p[1]);
		xclose(&p[2]);
		xclose(&p[4]);
		xclose(&master);
		free_req(r);
		const char *err = strerror(ce.err);
		switch (ce.stage) {
		case ST_DEVNULL: send_syserr(id, ce.err, "open", "/dev/null"); break;
		case ST_DUP: send_error(id, ce.err, "dup2: %s", err); break;
		case ST_TTY: send_error(id, ce.err, "taking the terminal: %s", err); break;
		case ST_SETGROUPS: send_error(id, ce.err, "setgroups: %s", err); break;
		case ST_SETGID: send_error(id, ce.err, "setgid %u: %s", (unsigned)s->gid, err); break;
		case ST_SETUID: send_error(id, ce.err, "setuid %u: %s", (unsigned)s->uid, err); break;
		case ST_CHDIR: send_syserr(id, ce.err, "chdir", s->cwd); break;
		default: send_syserr(id, ce.err, "exec", m->argv[0]); break;
		}
		goto out;
	}

	r->pid = pid;
	if (s->pty) {
		/* Output and input share the master; separate fds so either can be closed alone. */
		r->pty = true;
		r->out_fd = master;
		r->in_fd = fcntl(master, F_DUPFD_CLOEXEC, 3);
		if (r->in_fd < 0)
			logmsg("request %u: dup of the terminal: %s (no input)", id, strerror(errno));
	} else {
		r->in_fd = p[1];
		r->out_fd = p[2];
		r->err_fd = p[4];
		if (r->in_fd >= 0)
			set_nonblock(r->in_fd);
		set_nonblock(r->out_fd);
		set_nonblock(r->err_fd);
	}
	if (timeout > 0)
		r->deadline = now_ms() + (timeout > INT64_MAX / 4 ? INT64_MAX / 4 : timeout);
	ob_begin();
	put_int(F_PID, pid);
	ob_send(id, T_STARTED);
out:
	free(s->envp);
	s->envp = NULL;
}

static void close_stdin(struct req *r)
{
	xclose(&r->in_fd);
	free(r->in_buf);
	r->in_buf = NULL;
	r->in_off = r->in_len = r->in_cap = 0;
}

static void h_stdin(uint32_t id, const uint8_t *d, uint32_t n)
{
	struct req *r = find_req(id, R_EXEC);
	struct termios tio;
	uint8_t veof;

	if (!r || r->in_fd < 0 || r->in_eof)
		return;
	size_t pending = r->in_len - r->in_off;
	if (n == 0 && r->pty) {
		/* A terminal has no end of input to close: type its EOF character (^D) instead. */
		veof = tcgetattr(r->in_fd, &tio) == 0 && tio.c_cc[VEOF] != _POSIX_VDISABLE ? tio.c_cc[VEOF] : 4;
		d = &veof;
		n = 1;
	}
	if (n == 0) {
		r->in_eof = true;
		if (pending == 0)
			close_stdin(r);
		return;
	}
	if (pending + n > STDIN_MAX) {
		/* Per protocol: overflowing stdin is closed, no ERROR. */
		logmsg("request %u: stdin buffer over %u bytes, closing stdin", id, STDIN_MAX);
		close_stdin(r);
		return;
	}
	if (r->in_len + n > r->in_cap && r->in_off > 0) {
		memmove(r->in_buf, r->in_buf + r->in_off, pending);
		r->in_off = 0;
		r->in_len = pending;
	}
	if (r->in_len + n > r->in_cap) {
		size_t cap = r->in_cap ? r->in_cap : 65536;
		while (cap < r->in_len + n)
			cap *= 2;
		r->in_buf = xrealloc(r->in_buf, cap);
		r->in_cap = cap;
	}
	memcpy(r->in_buf + r->in_len, d, n);
	r->in_len += n;
}

/* Called when the stdin pipe is writable (or broken). */
static void pump_stdin(struct req *r)
{
	while (r->in_off < r->in_len) {
		ssize_t w = write(r->in_fd, r->in_buf + r->in_off, r->in_len - r->in_off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN)
			return;
		if (w < 0) { /* EPIPE: the command does not read any more */
			close_stdin(r);
			return;
		}
		r->in_off += (size_t)w;
	}
	r->in_off = r->in_len = 0;
	if (r->in_eof)
		close_stdin(r);
}

/*
 * Forwards one chunk of command output, as far as the host's credit allows (a
 * detached command's is read and dropped); returns false when nothing was sent.
 * *left >= 0: the pipe is being finished (finish_pipe) and closes after that many bytes.
 */
static bool pump_pipe(struct req *r, int *fd, int64_t *left, uint8_t type)
{
	size_t max = sendable(r, PIPE_CHUNK);

	if (*left >= 0 && (uint64_t)*left < max)
		max = (size_t)*left;
	if (max == 0) {
		if (*left == 0)
			xclose(fd);
		return false;
	}
	ssize_t n = read(*fd, iobuf + HDR_LEN, max);
	if (n > 0) {
		if (!r->detached) {
			charge(r, (size_t)n);
			send_iobuf(r->id, type, (size_t)n);
		}
		if (*left >= 0 && (*left -= n) == 0)
			xclose(fd);
		return true;
	}
	if (n == 0 || (errno != EAGAIN && errno != EINTR) || *left >= 0)
		xclose(fd);
	return false;
}

/*
 * Once the drain time is over, output already sitting in the pipe still goes
 * out (a slow loop turn must not cut it), at most 1 MiB - the default maximum
 * pipe size - and as the host's credit allows; then the pipe is closed, so a
 * grandchild that keeps writing cannot hold up EXIT.  A command whose host
 * reads slowly thus loses nothing: once it is reaped, what is in its pipe is
 * all it wrote.
 */
static void finish_pipe(struct req *r, int *fd, int64_t *left, uint8_t type)
{
	int avail = 0;

	if (*fd < 0)
		return;
	if (*left < 0) {
		if (ioctl(*fd, FIONREAD, &avail) != 0 || avail < 0)
			avail = 0;
		*left = avail > FINISH_MAX ? FINISH_MAX : avail;
	}
	for (int i = 0; i < 16 && *fd >= 0 && pump_pipe(r, fd, left, type); i++)
		;
	if (*left == 0)
		xclose(fd);
}

/*
 * Signals a PTY exec's whole session: the shell and every job it started, in the foreground or not,
 * as a terminal hangup would reach them (a shell killed outright cannot pass the hangup on).  Only
 * processes that left the session (setsid) escape, as they do on any terminal.
 */
static void kill_session(pid_t sid, int sig)
{
	DIR *d = opendir("/proc");
	struct dirent *de;

	kill(-sid, sig); /* the leader's group first: it stops forking new jobs */
	while (d && (de = readdir(d))) {
		char *end;
		long pid = strtol(de->d_name, &end, 10);
		if (*end || pid <= 1 || pid == sid)
			continue;
		if (getsid((pid_t)pid) == sid)
			kill((pid_t)pid, sig);
	}
	if (d)
		closedir(d);
}

static void h_signal(uint32_t id, struct msg *m)
{
	struct req *r = find_req(id, R_EXEC);

	/* After the reap the pgid may be recycled: signal only live commands. */
	if (!r || r->reaped || !m->has[F_SIGNAL] || m->num[F_SIGNAL] < 1 || m->num[F_SIGNAL] >= NSIG)
		return;
	if (r->pty)
		kill_session(r->pid, (int)m->num[F_SIGNAL]);
	else
		kill(-r->pid, (int)m->num[F_SIGNAL]);
}

/* Sets a PTY exec's terminal size; the kernel sends SIGWINCH to its foreground job. */
static void h_resize(uint32_t id, struct msg *m)
{
	struct req *r = find_req(id, R_EXEC);
	struct winsize ws;

	if (!r || !r->pty || r->out_fd < 0)
		return;
	if (!get_winsize(m, &ws)) {
		logmsg("request %u: ignoring RESIZE: ROWS and COLS must be given, each 1-%d", id, PTY_MAX_SIZE);
		return;
	}
	if (ioctl(r->out_fd, TIOCSWINSZ, &ws) != 0)
		logmsg("request %u: TIOCSWINSZ: %s", id, strerror(errno));
}

static void reap_children(void)
{
	int st;
	pid_t pid;

	while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
		for (int i = 0; i < MAX_REQS; i++) {
			struct req *r = &reqs[i];
			if (r->kind == R_EXEC && r->pid == pid && !r->reaped) {
				r->reaped = true;
				r->status = st;
				r->drain_until = now_ms() + DRAIN_MS;
			}
		}
	}
}

/* Enforces the timeout and the drain limit; sends EXIT when all is over. */
static void check_exec(struct req *r, int64_t now)
{
	if (!r->reaped && r->deadline && !r->timed_out && now >= r->deadline) {
		if (r->pty)
			kill_session(r->pid, SIGKILL);
		else
			kill(-r->pid, SIGKILL);
		r->timed_out = true;
	}
	/* A background grandchild may hold the pipes open forever: stop waiting. */
	if (r->reaped && now >= r->drain_until) {
		finish_pipe(r, &r->out_fd, &r->out_left, T_STDOUT);
		finish_pipe(r, &r->err_fd, &r->err_left, T_STDERR);
	}
	if (!r->reaped || r->out_fd >= 0 || r->err_fd >= 0)
		return;
	if (!r->detached) {
		ob_begin();
		if (WIFSIGNALED(r->status))
			put_int(F_SIGNAL, WTERMSIG(r->status));
		else
			put_int(F_EXIT_CODE, WEXITSTATUS(r->status));
		put_int(F_TIMED_OUT, r->timed_out);
		ob_send(r->id, T_EXIT);
	}
	free_req(r);
}

/* ------------------------------------------------------------------ */
/* Files                                                               */

static void h_read(uint32_t id, struct msg *m)
{
	const char *path = need_path(id, m, F_PATH);
	struct stat st;
	int64_t window;

	if (!path || !get_window(id, m, &window))
		return;
	/* O_NONBLOCK: opening a FIFO must not hang the agent. */
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0) {
		send_syserr(id, errno, "open", path);
		return;
	}
	if (fstat(fd, &st) != 0) {
		send_syserr(id, errno, "stat", path);
		close(fd);
		return;
	}
	if (!S_ISREG(st.st_mode)) {
		close(fd);
		send_syserr(id, S_ISDIR(st.st_mode) ? EISDIR : EINVAL, "read", path);
		return;
	}
	struct req *r = new_req(id, R_READ);
	if (!r) {
		close(fd);
		return;
	}
	r->fd = fd;
	r->path = xstrdup(path);
	r->credit = window;
}

/* Sends one chunk per loop turn, so a big read never starves command output; waits for credit. */
static void pump_read(struct req *r)
{
	size_t max = sendable(r, DATA_CHUNK);

	if (max == 0)
		return;
	ssize_t n = read(r->fd, iobuf + HDR_LEN, max);

	if (n < 0 && errno == EINTR)
		return;
	if (n > 0) {
		r->size += (uint64_t)n;
		charge(r, (size_t)n);
		send_iobuf(r->id, T_DATA, (size_t)n);
		return;
	}
	if (n < 0) {
		send_syserr(r->id, errno, "read", r->path);
	} else {
		ob_begin();
		put_int(F_SIZE, (int64_t)r->size);
		ob_send(r->id, T_END);
	}
	free_req(r);
}

static void h_write(uint32_t id, struct msg *m)
{
	const char *path = need_path(id, m, F_PATH);
	mode_t mode;
	struct stat st;
	int fd;

	if (!path || !get_mode(id, m, 0644, &mode))
		return;
	const char *slash = strrchr(path, '/');
	if (slash[1] == 0) {
		send_syserr(id, EISDIR, "write", path);
		return;
	}
	struct req *r = new_req(id, R_WRITE);
	if (!r)
		return;
	r->path = xstrdup(path);
	if (get_flags(m) & FLAG_APPEND) {
		/* O_NONBLOCK: a FIFO must not hang the agent; only regular files are accepted. */
		fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY | O_NONBLOCK, mode);
		if (fd >= 0 && (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))) {
			close(fd);
			fd = -1;
			errno = EINVAL;
		}
	} else if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
		fd = -1;
		errno = EISDIR;
	} else {
		/* The temporary file sits beside the target so rename() is atomic. */
		size_t dlen = (size_t)(slash - path) + 1;
		r->tmp = xrealloc(NULL, dlen + sizeof ".tartarus-write-XXXXXX");
		memcpy(r->tmp, path, dlen);
		strcpy(r->tmp + dlen, ".tartarus-write-XXXXXX");
		fd = mkostemp(r->tmp, O_CLOEXEC);
		if (fd < 0) {
			free(r->tmp);
			r->tmp = NULL;
		} else if (fchmod(fd, mode) != 0) {
			int e = errno;
			close(fd);
			fd = -1;
			errno = e;
		}
	}
	if (fd < 0) {
		send_syserr(id, errno, "write", path);
		free_req(r);
		return;
	}
	r->fd = fd;
}

static void h_write_data(uint32_t id, const uint8_t *d, uint32_t n)
{
	/* Unknown ids include writes that already failed: their data is discarded. */
	struct req *r = find_req(id, R_WRITE);

	if (!r)
		return;
	int e = write_all(r->fd, d, n);
	if (e) {
		send_syserr(id, e, "write", r->path);
		free_req(r); /* unlinks the temporary file */
		return;
	}
	r->size += n;
}

static void h_write_end(uint32_t id)
{
	struct req *r = find_req(id, R_WRITE);

	if (!r)
		return;
	int e = close(r->fd) != 0 ? errno : 0;
	r->fd = -1;
	if (!e && r->tmp && rename(r->tmp, r->path) != 0)
		e = errno;
	if (e) {
		send_syserr(id, e, "write", r->path);
	} else {
		free(r->tmp); /* renamed: nothing to unlink any more */
		r->tmp = NULL;
		ob_begin();
		put_int(F_SIZE, (int64_t)r->size);
		ob_send(id, T_OK);
	}
	free_req(r);
}

/* The ENTRY fields, for LIST and STAT; rel is name relative to dfd, for readlink. */
static void put_stat(const char *name, const struct stat *st, int dfd, const char *rel)
{
	put_str(F_NAME, name);
	put_int(F_TYPE, st->st_mode & S_IFMT);
	put_int(F_MODE, st->st_mode);
	put_int(F_SIZE, st->st_size);
	put_int(F_MTIME_NS, (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec);
	put_int(F_UID, st->st_uid);
	put_int(F_GID, st->st_gid);
	if (S_ISLNK(st->st_mode)) {
		char buf[PATH_MAX];
		ssize_t n = readlinkat(dfd, rel, buf, sizeof buf);
		if (n >= 0)
			put_field(F_LINK, buf, (size_t)n);
	}
}

static void h_list(uint32_t id, struct msg *m)
{
	const char *path = need_path(id, m, F_PATH);
	struct dirent *de;
	struct stat st;

	if (!path)
		return;
	int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
	if (!d) {
		send_syserr(id, errno, "list", path);
		if (dfd >= 0)
			close(dfd);
		return;
	}
	for (;;) {
		errno = 0;
		if (!(de = readdir(d)))
			break;
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		if (fstatat(dfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0)
			continue; /* vanished meanwhile */
		ob_begin();
		put_stat(de->d_name, &st, dfd, de->d_name);
		ob_send(id, T_ENTRY);
	}
	int e = errno;
	closedir(d);
	if (e)
		send_syserr(id, e, "list", path);
	else {
		ob_begin();
		ob_send(id, T_END);
	}
}

static void h_stat(uint32_t id, struct msg *m)
{
	const char *path = need_path(id, m, F_PATH);
	struct stat st;
	char name[PATH_MAX];

	if (!path)
		return;
	if (lstat(path, &st) != 0) {
		send_syserr(id, errno, "stat", path);
		return;
	}
	/* NAME is the last component; "/" for the root. */
	size_t n = strlen(path);
	while (n > 1 && path[n - 1] == '/')
		n--;
	size_t b = n;
	while (b > 0 && path[b - 1] != '/')
		b--;
	if (b == n)
		strcpy(name, "/");
	else
		snprintf(name, sizeof name, "%.*s", (int)(n - b), path + b);
	ob_begin();
	put_stat(name, &st, AT_FDCWD, path);
	ob_send(id, T_OK);
}

/* mkdir -p: intermediate directories get 0755, the last one mode. Returns errno or 0. */
static int mkdir_p(const char *path, mode_t mode)
{
	char buf[PATH_MAX];
	size_t n = strlen(path);
	struct stat st;

	memcpy(buf, path, n + 1);
	while (n > 1 && buf[n - 1] == '/')
		buf[--n] = 0;
	for (char *p = buf + 1;; p++) {
		if (*p != '/' && *p != 0)
			continue;
		char c = *p;
		*p = 0;
		if (mkdir(buf, c ? 0755 : mode) != 0) {
			if (errno != EEXIST)
				return errno;
			if (stat(buf, &st) != 0)
				return errno;
			if (!S_ISDIR(st.st_mode))
				return ENOTDIR;
		}
		if (!c)
			return 0;
		*p = c;
	}
}

static void h_mkdir(uint32_t id, struct msg *m)
{
	const char *path = need_path(id, m, F_PATH);
	mode_t mode;

	if (!path || !get_mode(id, m, 0755, &mode))
		return;
	int e = (get_flags(m) & FLAG_RECURSIVE) ? mkdir_p(path, mode) : (mkdir(path, mode) ? errno : 0);
	if (e)
		send_syserr(id, e, "mkdir", path);
	else
		send_ok(id);
}

/*
 * Empties the directory open at dfd (consumed).  Never follows symlinks: every
 * step is relative to an fd opened with O_NOFOLLOW, so a racing symlink swap
 * cannot redirect us.  Does not cross into other filesystems.  Returns errno or 0.
 */
static int rm_tree(int dfd, dev_t dev, int depth)
{
	DIR *d = fdopendir(dfd);
	struct dirent *de;
	struct stat st;
	int err = 0;

	if (!d) {
		err = errno;
		close(dfd);
		return err;
	}
	if (depth > RM_MAX_DEPTH) {
		closedir(d);
		return ELOOP;
	}
	for (;;) {
		errno = 0;
		if (!(de = readdir(d))) {
			err = errno;
			break;
		}
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		/* Linux unlink() says EISDIR for directories; anything else goes at once. */
		if (unlinkat(dfd, de->d_name, 0) == 0 || errno == ENOENT)
			continue;
		if (errno != EISDIR) {
			err = errno;
			break;
		}
		int sub = openat(dfd, de->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (sub < 0) {
			err = errno;
			break;
		}
		errno = EXDEV; /* stays if fstat() succeeds but finds another filesystem */
		if (fstat(sub, &st) != 0 || st.st_dev != dev) {
			err = errno;
			close(sub);
			break;
		}
		if ((err = rm_tree(sub, dev, depth + 1)) != 0)
			break;
		if (unlinkat(dfd, de->d_name, AT_REMOVEDIR) != 0 && errno != ENOENT) {
			err = errno;
			break;
		}
	}
	closedir(d);
	return err;
}

static void h_remove(uint32_t id, struct msg *m)
{
	const char *path = need_path(id, m, F_PATH);
	struct stat st;
	int e = 0;

	if (!path)
		return;
	if (lstat(path, &st) != 0)
		e = errno;
	else if (!S_ISDIR(st.st_mode))
		e = unlink(path) ? errno : 0;
	else {
		if (get_flags(m) & FLAG_RECURSIVE) {
			int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
			e = fd < 0 ? errno : rm_tree(fd, st.st_dev, 0);
		}
		if (!e && rmdir(path) != 0)
			e = errno;
	}
	if (e)
		send_syserr(id, e, "remove", path);
	else
		send_ok(id);
}

static void h_rename(uint32_t id, struct msg *m)
{
	const char *from = need_path(id, m, F_PATH), *to = from ? need_path(id, m, F_NEWPATH) : NULL;

	if (!to)
		return;
	if (rename(from, to) != 0)
		send_syserr(id, errno, "rename", from);
	else
		send_ok(id);
}

/* ------------------------------------------------------------------ */
/* CONFIGURE and PING                                                  */

/* Replaces a small file atomically (temp file + rename). Returns errno or 0. */
static int replace_file(const char *path, const char *tmpl, const void *data, size_t n, mode_t mode)
{
	char tmp[PATH_MAX];
	int e = 0;

	snprintf(tmp, sizeof tmp, "%s", tmpl);
	int fd = mkostemp(tmp, O_CLOEXEC);
	if (fd < 0)
		return errno;
	if (fchmod(fd, mode) != 0 || (e = write_all(fd, data, n)) != 0)
		e = e ? e : errno;
	if (close(fd) != 0 && !e)
		e = errno;
	if (!e && rename(tmp, path) != 0)
		e = errno;
	if (e)
		unlink(tmp);
	return e;
}

/* /etc/machine-id is a bind mount of a tmpfs file (set up by init), so a restored clone gets its own id
 * with one tmpfs write instead of an overlayfs copy-up and an ext4 allocation: on a freshly restored
 * guest every kernel path runs for the first time, and under TCG that is what costs. */
#define MACHINE_ID_RUN "/run/tartarus-machine-id"

static void bind_machine_id(void);

static int machine_id_bound(void)
{
	struct stat a, b;

	return stat(MACHINE_ID_RUN, &a) == 0 && stat("/etc/machine-id", &b) == 0 && a.st_dev == b.st_dev &&
	       a.st_ino == b.st_ino;
}

static int rewrite_file(const char *path, const void *data, size_t n)
{
	int fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC | O_NOFOLLOW);
	int e;

	if (fd < 0)
		return errno;
	e = write_all(fd, data, n);
	if (close(fd) != 0 && !e)
		e = errno;
	return e;
}

static int add_entropy(const uint8_t *d, size_t n)
{
	int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	int e = 0;

	if (fd < 0)
		return errno;
	/* Writing mixes the bytes in; the ioctl also credits them. */
	e = write_all(fd, d, n);
	struct rand_pool_info *rpi = xrealloc(NULL, sizeof *rpi + n);
	rpi->entropy_count = (int)(8 * n);
	rpi->buf_size = (int)n;
	memcpy(rpi->buf, d, n);
	if (!e && ioctl(fd, RNDADDENTROPY, rpi) != 0)
		e = errno;
	/* Adding entropy only feeds the input pool; the CRNG that getrandom() reads keeps its cloned
	 * state until its next scheduled reseed. Force one now so clones diverge at once. */
	if (!e && ioctl(fd, RNDRESEEDCRNG) != 0)
		e = errno;
	free(rpi);
	close(fd);
	return e;
}

/* The writable layer's filesystem, held from before switch_root (after it no path reaches the mount),
 * and its device: CONFIGURE SIZE grows the filesystem online once the host has grown the disk. */
static int rw_fd = -1;
static char rw_dev[256];

#define EXT4_IOC_RESIZE_FS _IOW('f', 16, uint64_t) /* fs/ext4/ext4.h; not in the uapi headers */
#define GROW_WAIT_MS 5000

/* The host resized the disk just before asking; the guest learns of it from a config interrupt,
 * handled asynchronously, so wait (briefly) for the kernel to see the new size first. */
static int grow_rw(uint64_t bytes, const char **what)
{
	uint64_t size = 0;
	struct statfs sf;

	*what = "the writable layer";
	if (rw_fd < 0)
		return ENODEV;
	int dev = open(rw_dev, O_RDONLY | O_CLOEXEC);
	if (dev < 0)
		return errno;
	int64_t deadline = now_ms() + GROW_WAIT_MS;
	for (;;) {
		if (ioctl(dev, BLKGETSIZE64, &size) != 0) {
			int e = errno;
			close(dev);
			return e;
		}
		if (size >= bytes || now_ms() >= deadline)
			break;
		struct timespec ts = { 0, 2 * 1000000 };
		nanosleep(&ts, NULL);
	}
	close(dev);
	if (size < bytes) {
		*what = "the writable layer's disk (it did not grow)";
		return EAGAIN;
	}
	if (fstatfs(rw_fd, &sf) != 0)
		return errno;
	uint64_t blocks = bytes / (uint64_t)sf.f_bsize;
	if (ioctl(rw_fd, EXT4_IOC_RESIZE_FS, &blocks) != 0)
		return errno;
	return 0;
}

static void h_configure(uint32_t id, struct msg *m)
{
	/* Validate everything first, so a bad request changes nothing. */
	if (m->has[F_TIME_NS] && m->num[F_TIME_NS] < 0) {
		send_error(id, EINVAL, "TIME_NS must not be negative");
		return;
	}
	if (m->has[F_SIZE] && m->num[F_SIZE] <= 0) {
		send_error(id, EINVAL, "SIZE must be positive");
		return;
	}
	if (m->has[F_HOSTNAME] && (m->slen[F_HOSTNAME] == 0 || m->slen[F_HOSTNAME] > HOST_NAME_MAX)) {
		send_error(id, EINVAL, "HOSTNAME must be 1-%d bytes", HOST_NAME_MAX);
		return;
	}
	if (m->has[F_MACHINE_ID]) {
		const char *s = m->str[F_MACHINE_ID];
		if (m->slen[F_MACHINE_ID] != 32 || strspn(s, "0123456789abcdef") != 32) {
			send_error(id, EINVAL, "MACHINE_ID must be 32 lowercase hex digits");
			return;
		}
	}
	if (m->has[F_TIME_NS]) {
		struct timespec ts = { m->num[F_TIME_NS] / 1000000000, m->num[F_TIME_NS] % 1000000000 };
		if (clock_settime(CLOCK_REALTIME, &ts) != 0) {
			send_error(id, errno, "clock_settime: %s", strerror(errno));
			return;
		}
	}
	if (m->has[F_ENTROPY]) {
		int e = add_entropy((const uint8_t *)m->str[F_ENTROPY], m->slen[F_ENTROPY]);
		if (e) {
			send_error(id, e, "adding entropy: %s", strerror(e));
			return;
		}
	}
	if (m->has[F_HOSTNAME] && sethostname(m->str[F_HOSTNAME], m->slen[F_HOSTNAME]) != 0) {
		send_error(id, errno, "sethostname: %s", strerror(errno));
		return;
	}
	if (m->has[F_MACHINE_ID]) {
		char line[33];
		memcpy(line, m->str[F_MACHINE_ID], 32);
		line[32] = '\n';
		int e = machine_id_bound()
				? rewrite_file(MACHINE_ID_RUN, line, sizeof line)
				: replace_file("/etc/machine-id", "/etc/.tartarus-machine-id-XXXXXX", line, sizeof line, 0444);
		if (e) {
			send_syserr(id, e, "write", "/etc/machine-id");
			return;
		}
	}
	if (m->has[F_SIZE]) {
		const char *what;
		int e = grow_rw((uint64_t)m->num[F_SIZE], &what);
		if (e) {
			send_error(id, e, "growing %s to %lld bytes: %s", what, (long long)m->num[F_SIZE], strerror(e));
			return;
		}
	}
	/* A restored clone's host learns the protocol here, without a PING of its own. */
	ob_begin();
	put_int(F_VERSION, PROTO_VERSION);
	ob_send(id, T_OK);
}

/* CREDIT: the host drained output of an EXEC or READ and lets it send SIZE bytes more. */
static void h_credit(uint32_t id, struct msg *m)
{
	struct req *r = find_req(id, R_EXEC);

	if (!r)
		r = find_req(id, R_READ);
	if (!r || r->credit < 0 || !m->has[F_SIZE] || m->num[F_SIZE] <= 0)
		return;
	r->credit = m->num[F_SIZE] > INT64_MAX / 2 - r->credit ? INT64_MAX / 2 : r->credit + m->num[F_SIZE];
}

/*
 * DETACH: the host stopped listening.  A read or write ends here (its file
 * closed, a write's temporary file removed); a command runs on, its output
 * read and dropped, and is reaped without EXIT.
 */
static void h_detach(uint32_t id)
{
	struct req *r = find_req(id, R_EXEC);

	if (r) {
		r->detached = true;
		return;
	}
	if ((r = find_req(id, R_READ)) || (r = find_req(id, R_WRITE)))
		free_req(r);
}

static void h_ping(uint32_t id)
{
	ob_begin();
	put_int(F_VERSION, PROTO_VERSION);
	ob_send(id, T_OK);
}

/* ------------------------------------------------------------------ */
/* Frame dispatch and the serving loop                                 */

static void __attribute__((noreturn)) protocol_error(const char *what)
{
	logmsg("protocol error: %s", what);
	shutdown_agent(2);
}

static void dispatch(uint32_t id, uint8_t type, const uint8_t *p, uint32_t len)
{
	/* Frames that need no field parsing, and never get a reply. */
	switch (type) {
	case T_STDIN: h_stdin(id, p, len); return;
	case T_WRITE_DATA: h_write_data(id, p, len); return;
	case T_WRITE_END: h_write_end(id); return;
	case T_DETACH: h_detach(id); return;
	}
	if (type < T_PING || type > T_CREDIT) {
		send_error(id, ENOSYS, "unknown frame type 0x%02x", type);
		return;
	}
	if (parse_fields(p, len, &M) != 0)
		protocol_error("field runs past the end of the payload");
	if (type == T_SIGNAL || type == T_RESIZE || type == T_CREDIT) { /* no reply: a bad one is dropped */
		if (M.err)
			logmsg("request %u: ignoring frame type 0x%02x: %s", id, type, M.errmsg);
		else if (type == T_SIGNAL)
			h_signal(id, &M);
		else if (type == T_RESIZE)
			h_resize(id, &M);
		else
			h_credit(id, &M);
		return;
	}
	if (M.err) {
		send_error(id, M.err, "%s", M.errmsg);
		return;
	}
	if (id == 0) {
		send_error(0, EINVAL, "request id 0 is reserved");
		return;
	}
	switch (type) {
	case T_PING: h_ping(id); break;
	case T_EXEC: h_exec(id, &M); break;
	case T_READ: h_read(id, &M); break;
	case T_WRITE: h_write(id, &M); break;
	case T_LIST: h_list(id, &M); break;
	case T_STAT: h_stat(id, &M); break;
	case T_MKDIR: h_mkdir(id, &M); break;
	case T_REMOVE: h_remove(id, &M); break;
	case T_RENAME: h_rename(id, &M); break;
	case T_CONFIGURE: h_configure(id, &M); break;
	}
}

static uint8_t inbuf[HDR_LEN + MAX_PAYLOAD];
static size_t inlen;

/*
 * The host closed its side (its daemon stopped or died).  What it asked for
 * dies with it, as when an API client goes away: commands are killed and
 * forgotten (no frame about them reaches the next host, whose request ids
 * start afresh), reads and writes are dropped, a half-received frame is
 * discarded.  The sandbox's own
 * processes (reserved ids: the warm interpreter, the start command) keep
 * running for the next host to adopt.  Until it connects, frames we write
 * block in the port, and the port is polled for its return (serve()).
 */
static void read_port(void);

static void host_left(void)
{
	logmsg("host closed the port; waiting for it to reconnect");
	host_present = false;
	inlen = 0;
	for (int i = 0; i < MAX_REQS; i++) {
		struct req *r = &reqs[i];
		if (r->kind == R_FREE || (r->kind == R_EXEC && r->id >= RESERVED_IDS))
			continue;
		/* Reaped unseen: reap_children() finds no request. */
		if (r->kind == R_EXEC && !r->reaped) {
			if (r->pty)
				kill_session(r->pid, SIGKILL); /* a terminal's jobs are other groups */
			else
				kill(-r->pid, SIGKILL);
		}
		free_req(r);
	}
}

/* While the host is away the port polls as POLLHUP; it is back once it does not. */
static void check_host_back(void)
{
	struct pollfd p = { .fd = port_fd, .events = POLLIN };

	if (poll(&p, 1, 0) < 0 || (p.revents & POLLHUP))
		return;
	logmsg("host reconnected");
	host_present = true;
	if (p.revents & POLLIN)
		read_port();
}

/* Reads what the port has and handles every complete frame in it. */
static void read_port(void)
{
	ssize_t n = read(port_fd, inbuf + inlen, sizeof inbuf - inlen);

	if (n == 0) {
		if (reconnectable) {
			host_left();
			return;
		}
		logmsg("port closed by the host");
		shutdown_agent(0);
	}
	if (n < 0) {
		if (errno == EINTR || errno == EAGAIN)
			return;
		logmsg("reading the port: %s", strerror(errno));
		shutdown_agent(1);
	}
	inlen += (size_t)n;

	size_t off = 0;
	while (inlen - off >= HDR_LEN) {
		const uint8_t *h = inbuf + off;
		uint32_t len = get_be32(h);
		/* Checked before the payload arrives: never wait for an impossible frame. */
		if (len > MAX_PAYLOAD)
			protocol_error("frame longer than 1 MiB");
		if (h[9] || h[10] || h[11])
			protocol_error("non-zero flags or reserved bytes");
		if (inlen - off - HDR_LEN < len)
			break;
		dispatch(get_be32(h + 4), h[8], h + HDR_LEN, len);
		off += HDR_LEN + len;
	}
	memmove(inbuf, inbuf + off, inlen - off);
	inlen -= off;
}

enum { W_OUT, W_ERR, W_IN };
static struct pollfd pfds[2 + 3 * MAX_REQS];
static struct { struct req *r; int which; } pmap[2 + 3 * MAX_REQS];

static void add_pollfd(nfds_t *n, struct req *r, int which, int fd, short events)
{
	pmap[*n].r = r;
	pmap[*n].which = which;
	pfds[(*n)++] = (struct pollfd){ .fd = fd, .events = events };
}

/* Adds a command's pipes to the poll set; returns when it next needs attention (-1: never). */
static int64_t poll_exec(struct req *r, nfds_t *n)
{
	bool can_send = sendable(r, 1) > 0; /* else the command blocks on a full pipe: back-pressure */

	if (r->out_fd >= 0 && can_send)
		add_pollfd(n, r, W_OUT, r->out_fd, POLLIN);
	if (r->err_fd >= 0 && can_send)
		add_pollfd(n, r, W_ERR, r->err_fd, POLLIN);
	if (r->in_fd >= 0 && r->in_off < r->in_len)
		add_pollfd(n, r, W_IN, r->in_fd, POLLOUT);
	if (r->reaped) /* finishing pipes wait for POLLIN or for CREDIT on the port, not for a clock */
		return r->out_left >= 0 || r->err_left >= 0 ? -1 : r->drain_until;
	return r->deadline && !r->timed_out ? r->deadline : -1;
}

static void __attribute__((noreturn)) serve(int fd)
{
	sigset_t mask;
	struct rlimit rl;

	port_fd = fd;
	for (int i = 0; i < MAX_REQS; i++) /* static zero would mean fd 0 */
		reqs[i].out_fd = reqs[i].err_fd = reqs[i].in_fd = reqs[i].fd = -1;
	/* Our own umask would alter the MODE the host asks for. */
	umask(0);
	if (chdir("/") != 0)
		logmsg("chdir /: %s", strerror(errno));
	signal(SIGPIPE, SIG_IGN); /* a dead reader gives EPIPE instead */
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	sigprocmask(SIG_SETMASK, &mask, NULL);
	int sig_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sig_fd < 0) {
		logmsg("signalfd: %s", strerror(errno));
		exit(1);
	}
	/* Up to 3 fds per command; commands get the original limit back. */
	getrlimit(RLIMIT_NOFILE, &orig_nofile);
	rl = orig_nofile;
	rl.rlim_cur = rl.rlim_max > 65536 ? 65536 : rl.rlim_max;
	setrlimit(RLIMIT_NOFILE, &rl);

	ob_begin();
	put_int(F_VERSION, PROTO_VERSION);
	ob_send(0, T_HELLO);

	for (;;) {
		nfds_t n = 0;
		int64_t now = now_ms(), wake = -1;

		/* A negative fd is skipped by poll(): a closed host side would report POLLHUP in a loop. */
		pfds[n++] = (struct pollfd){ .fd = host_present ? port_fd : -1, .events = POLLIN };
		pfds[n++] = (struct pollfd){ .fd = sig_fd, .events = POLLIN };
		for (int i = 0; i < MAX_REQS; i++) {
			int64_t t = reqs[i].kind == R_READ ? (sendable(&reqs[i], 1) ? now : -1) /* more to send */
				  : reqs[i].kind == R_EXEC ? poll_exec(&reqs[i], &n) : -1;
			if (t >= 0 && (wake < 0 || t < wake))
				wake = t;
		}
		int timeout = wake < 0 ? -1 : wake <= now ? 0 : (int)(wake - now > 60000 ? 60000 : wake - now);
		if (!host_present && (timeout < 0 || timeout > HOST_POLL_MS))
			timeout = HOST_POLL_MS;
		if (poll(pfds, n, timeout) < 0) {
			if (errno == EINTR)
				continue;
			logmsg("poll: %s", strerror(errno));
			shutdown_agent(1);
		}

		if (pfds[1].revents) {
			struct signalfd_siginfo si;
			while (read(sig_fd, &si, sizeof si) > 0)
				;
			reap_children();
		}
		for (nfds_t i = 2; i < n; i++) {
			struct req *r = pmap[i].r;
			if (!pfds[i].revents || r->kind != R_EXEC)
				continue;
			if (pmap[i].which == W_OUT && r->out_fd == pfds[i].fd)
				pump_pipe(r, &r->out_fd, &r->out_left, T_STDOUT);
			else if (pmap[i].which == W_ERR && r->err_fd == pfds[i].fd)
				pump_pipe(r, &r->err_fd, &r->err_left, T_STDERR);
			else if (pmap[i].which == W_IN && r->in_fd == pfds[i].fd)
				pump_stdin(r);
		}
		for (int i = 0; i < MAX_REQS; i++)
			if (reqs[i].kind == R_READ)
				pump_read(&reqs[i]);
		if (pfds[0].revents)
			read_port();
		else if (!host_present)
			check_host_back();
		now = now_ms();
		for (int i = 0; i < MAX_REQS; i++)
			if (reqs[i].kind == R_EXEC)
				check_exec(&reqs[i], now);
	}
}

/* Finds the virtio-serial port by name; waits up to 5 s for it to appear. */
static int open_port(void)
{
	for (int tries = 0; tries < 50; tries++) {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *de;
		while (d && (de = readdir(d))) {
			char path[512], name[64];
			if (de->d_name[0] == '.')
				continue;
			snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", de->d_name);
			int fd = open(path, O_RDONLY | O_CLOEXEC);
			if (fd < 0)
				continue;
			ssize_t n = read(fd, name, sizeof name - 1);
			close(fd);
			if (n <= 0)
				continue;
			name[n] = 0;
			name[strcspn(name, "\n")] = 0;
			if (strcmp(name, PORT_NAME) != 0)
				continue;
			snprintf(path, sizeof path, "/dev/%s", de->d_name);
			fd = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY);
			if (fd >= 0) {
				closedir(d);
				return fd;
			}
		}
		if (d)
			closedir(d);
		sleep_ms(100);
	}
	logmsg("virtio-serial port %s not found", PORT_NAME);
	exit(1);
}

/* ------------------------------------------------------------------ */
/* PID 1                                                               */

static void __attribute__((noreturn)) fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void __attribute__((noreturn)) fatal(const char *fmt, ...)
{
	char buf[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	logmsg("fatal: %s; stopping the VM", buf);
	sync();
	/*
	 * A reset, not RB_POWER_OFF: QEMU runs with -no-reboot, so a reset ends it,
	 * while a kernel without a power-off method (microvm without ACPI) turns
	 * RB_POWER_OFF into a halt that would leave the VM hanging.  The reset path
	 * is the one panic=-1 relies on anyway.
	 */
	reboot(RB_AUTOBOOT);
	/* Not reached; if it were, init exiting panics the kernel: a reset too. */
	_exit(1);
}

static void try_mkdir(const char *path, mode_t mode)
{
	if (mkdir(path, mode) != 0 && errno != EEXIST)
		fatal("mkdir %s: %s", path, strerror(errno));
}

static void do_mount(const char *src, const char *dst, const char *type, unsigned long flags, const char *data)
{
	if (mount(src, dst, type, flags, data) != 0)
		fatal("mount %s on %s (%s): %s", src, dst, type ? type : "move", strerror(errno));
}

/* 0-2 must be open: pipes would otherwise land there and break dup2() in exec. */
static void setup_stdio(void)
{
	int fd = open("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);

	if (fd < 0)
		fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		fd = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return;
	for (int i = 0; i < 3; i++)
		dup2(fd, i);
	if (fd > 2)
		close(fd);
}

struct params {
	char root[256], fstype[32], rw[256], hostname[HOST_NAME_MAX + 1], net[64];
};

static void read_cmdline(struct params *pr)
{
	static const struct { const char *key; size_t off, size; } keys[] = {
		{ "tartarus.root=", offsetof(struct params, root), sizeof pr->root },
		{ "tartarus.rootfstype=", offsetof(struct params, fstype), sizeof pr->fstype },
		{ "tartarus.rw=", offsetof(struct params, rw), sizeof pr->rw },
		{ "tartarus.hostname=", offsetof(struct params, hostname), sizeof pr->hostname },
		{ "tartarus.net=", offsetof(struct params, net), sizeof pr->net },
	};
	char buf[4096];
	ssize_t n = -1;
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);

	strcpy(pr->root, "/dev/vda");
	strcpy(pr->fstype, "ext4");
	strcpy(pr->rw, "/dev/vdb");
	strcpy(pr->hostname, "sandbox");
	pr->net[0] = 0;
	if (fd >= 0) {
		n = read(fd, buf, sizeof buf - 1);
		close(fd);
	}
	if (n < 0)
		fatal("reading /proc/cmdline failed");
	buf[n] = 0;
	for (char *save = NULL, *tok = strtok_r(buf, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
		for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
			size_t kl = strlen(keys[i].key);
			if (strncmp(tok, keys[i].key, kl) != 0)
				continue;
			if (strlen(tok + kl) >= keys[i].size || !tok[kl])
				fatal("bad kernel parameter %s", tok);
			strcpy((char *)pr + keys[i].off, tok + kl);
		}
	}
}

/* Block devices normally exist before init runs; allow some slack anyway. */
static void wait_for_device(const char *dev)
{
	for (int i = 0; i < 500 && access(dev, F_OK) != 0; i++)
		sleep_ms(10);
}

static void loopback_up(void)
{
	struct ifreq ifr;
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (s < 0) {
		logmsg("socket: %s (loopback left down)", strerror(errno));
		return;
	}
	memset(&ifr, 0, sizeof ifr);
	strcpy(ifr.ifr_name, "lo");
	if (ioctl(s, SIOCGIFFLAGS, &ifr) != 0 || (ifr.ifr_flags |= IFF_UP, ioctl(s, SIOCSIFFLAGS, &ifr)) != 0)
		logmsg("bringing lo up: %s", strerror(errno));
	close(s);
}

/* tartarus.net=ADDR/PREFIX,GATEWAY: bring eth0 up with a static address and a default route. Only
 * template build VMs get a NIC (QEMU user networking); sandboxes' networking is the host's business. */
static void net_up(const char *spec)
{
	char addr[32], gw[32];
	unsigned prefix;
	struct ifreq ifr;
	struct rtentry rt;
	struct sockaddr_in *sin;
	int s;

	if (sscanf(spec, "%31[0-9.]/%u,%31[0-9.]", addr, &prefix, gw) != 3 || prefix > 32) {
		logmsg("bad tartarus.net=%s (want ADDR/PREFIX,GATEWAY)", spec);
		return;
	}
	s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		logmsg("socket: %s (eth0 left down)", strerror(errno));
		return;
	}
	memset(&ifr, 0, sizeof ifr);
	strcpy(ifr.ifr_name, "eth0");
	sin = (struct sockaddr_in *)&ifr.ifr_addr;
	sin->sin_family = AF_INET;
	if (inet_pton(AF_INET, addr, &sin->sin_addr) != 1 || ioctl(s, SIOCSIFADDR, &ifr) != 0)
		logmsg("eth0 address %s: %s", addr, strerror(errno));
	sin->sin_addr.s_addr = prefix ? htonl(~0u << (32 - prefix)) : 0;
	if (ioctl(s, SIOCSIFNETMASK, &ifr) != 0)
		logmsg("eth0 netmask /%u: %s", prefix, strerror(errno));
	if (ioctl(s, SIOCGIFFLAGS, &ifr) != 0 || (ifr.ifr_flags |= IFF_UP, ioctl(s, SIOCSIFFLAGS, &ifr)) != 0)
		logmsg("bringing eth0 up: %s", strerror(errno));
	memset(&rt, 0, sizeof rt);
	((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
	((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
	sin = (struct sockaddr_in *)&rt.rt_gateway;
	sin->sin_family = AF_INET;
	rt.rt_flags = RTF_UP | RTF_GATEWAY;
	if (inet_pton(AF_INET, gw, &sin->sin_addr) != 1 || ioctl(s, SIOCADDRT, &rt) != 0)
		logmsg("default route via %s: %s", gw, strerror(errno));
	close(s);
}

/* Mounts an API filesystem inside the new root, creating the mount point. */
static void mount_api(const char *src, const char *dst, const char *type, unsigned long flags, const char *data)
{
	try_mkdir(dst, 0755);
	do_mount(src, dst, type, flags, data);
}

static void setup_root(void)
{
	struct params pr;

	try_mkdir("/dev", 0755);
	if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") != 0 && errno != EBUSY) {
		setup_stdio();
		fatal("mount devtmpfs on /dev: %s", strerror(errno));
	}
	setup_stdio();
	try_mkdir("/proc", 0555);
	try_mkdir("/sys", 0555);
	do_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	do_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	read_cmdline(&pr);

	try_mkdir("/mnt", 0755);
	try_mkdir("/mnt/base", 0755);
	try_mkdir("/mnt/rw", 0755);
	try_mkdir("/newroot", 0755);
	wait_for_device(pr.root);
	int building = strcmp(pr.rw, "none") == 0;
	if (building) {
		/* A template build: the root is a private copy of the base, changed in place by the build
		 * steps and kept afterwards as the template's new base image. */
		do_mount(pr.root, "/newroot", pr.fstype, MS_NOATIME, NULL);
	} else {
		wait_for_device(pr.rw);
		do_mount(pr.root, "/mnt/base", pr.fstype, MS_RDONLY, NULL);
		/* noinit_itable: the layer is a sparse file whose unwritten inode tables read as zeros;
		 * without it ext4lazyinit spends guest CPU after boot (and every restore) zeroing them. */
		do_mount(pr.rw, "/mnt/rw", "ext4", MS_NOATIME, "noinit_itable");
		rw_fd = open("/mnt/rw", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		snprintf(rw_dev, sizeof rw_dev, "%s", pr.rw);
		try_mkdir("/mnt/rw/upper", 0755);
		try_mkdir("/mnt/rw/work", 0755);
		do_mount("overlay", "/newroot", "overlay", 0,
			 "lowerdir=/mnt/base,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work");
	}

	/* The initramfs copies of /proc and /sys are not needed any more. */
	umount2("/proc", MNT_DETACH);
	umount2("/sys", MNT_DETACH);
	try_mkdir("/newroot/dev", 0755);
	do_mount("/dev", "/newroot/dev", NULL, MS_MOVE, NULL);

	/* switch_root: make /newroot the root of the mount tree and of this process. */
	if (chdir("/newroot") != 0)
		fatal("chdir /newroot: %s", strerror(errno));
	do_mount(".", "/", NULL, MS_MOVE, NULL);
	if (chroot(".") != 0 || chdir("/") != 0)
		fatal("chroot: %s", strerror(errno));

	mount_api("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_api("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_api("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620");
	mount_api("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mount_api("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");

	if (sethostname(pr.hostname, strlen(pr.hostname)) != 0)
		logmsg("sethostname %s: %s", pr.hostname, strerror(errno));
	loopback_up();
	if (pr.net[0])
		net_up(pr.net);
	if (!building)
		bind_machine_id(); /* a build must not leave the bind's placeholder file in the image */
}

/* Put /etc/machine-id on tmpfs (see machine_id_bound), keeping the image's id until CONFIGURE. */
static void bind_machine_id(void)
{
	char id[64] = "";
	ssize_t n = 0;
	int fd = open("/etc/machine-id", O_RDONLY | O_CLOEXEC | O_NOFOLLOW);

	if (fd >= 0) {
		n = read(fd, id, sizeof id - 1);
		close(fd);
	} else {
		fd = open("/etc/machine-id", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0444);
		if (fd < 0) {
			logmsg("cannot create /etc/machine-id: %s", strerror(errno));
			return;
		}
		close(fd);
	}
	fd = open(MACHINE_ID_RUN, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0444);
	if (fd < 0 || (n > 0 && write_all(fd, id, (size_t)n) != 0)) {
		logmsg("cannot write %s: %s", MACHINE_ID_RUN, strerror(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	close(fd);
	if (mount(MACHINE_ID_RUN, "/etc/machine-id", NULL, MS_BIND, NULL) != 0)
		logmsg("bind %s on /etc/machine-id: %s", MACHINE_ID_RUN, strerror(errno));
}

static pid_t spawn_agent(void)
{
	pid_t pid = fork();

	if (pid == 0) {
		/* serve() sets the signal mask it needs. */
		reconnectable = true;
		serve(open_port());
	}
	if (pid < 0)
		logmsg("fork: %s", strerror(errno));
	return pid;
}

static void __attribute__((noreturn)) init_main(void)
{
	sigset_t all;
	int64_t deaths[21] = { 0 }; /* ring of recent death times */
	unsigned ndeaths = 0;

	/* The kernel only delivers signals to init that it handles; block them all anyway. */
	sigfillset(&all);
	sigprocmask(SIG_BLOCK, &all, NULL);
	setup_root();

	pid_t agent = spawn_agent();
	for (;;) {
		if (agent > 0) {
			int st;
			pid_t pid = wait(&st);
			if (pid < 0 && errno == EINTR)
				continue;
			if (pid > 0 && pid != agent)
				continue; /* an orphan, now reaped */
			if (pid < 0)
				logmsg("wait: %s", strerror(errno));
			else if (WIFSIGNALED(st))
				logmsg("agent killed by signal %d, restarting", WTERMSIG(st));
			else
				logmsg("agent exited with status %d, restarting", WEXITSTATUS(st));
		}
		/* More than 20 deaths in 10 s: something is badly wrong; stop the VM. */
		int64_t now = now_ms();
		deaths[ndeaths++ % 21] = now;
		if (ndeaths >= 21 && now - deaths[ndeaths % 21] < 10000)
			fatal("agent died more than 20 times in 10 s");
		sleep_ms(100);
		agent = spawn_agent();
	}
}

/* ------------------------------------------------------------------ */

int main(int argc, char **argv)
{
	if (getpid() == 1)
		init_main();
	if (argc == 2 && strcmp(argv[1], "--version") == 0) {
		printf("tartarus-agent %s (protocol %d)\n", AGENT_VERSION, PROTO_VERSION);
		return 0;
	}
	if (argc == 3 && strcmp(argv[1], "--serve-fd") == 0) {
		char *end;
		errno = 0;
		long fd = strtol(argv[2], &end, 10);
		if (errno || !*argv[2] || *end || fd < 0 || fd > INT_MAX || fcntl((int)fd, F_GETFD) < 0) {
			fprintf(stderr, "tartarus-agent: bad file descriptor %s\n", argv[2]);
			return 2;
		}
		/* Keep 0-2 occupied so command pipes never land there. */
		for (int i = 0; i < 3; i++)
			if (fcntl(i, F_GETFD) < 0 && open("/dev/null", O_RDWR) != i)
				return 2;
		fcntl((int)fd, F_SETFD, FD_CLOEXEC);
		fcntl((int)fd, F_SETFL, fcntl((int)fd, F_GETFL) & ~O_NONBLOCK);
		serve((int)fd);
	}
	fprintf(stderr, "usage: tartarus-agent --serve-fd N | --version\n"
			"(as PID 1 it runs as the sandbox init)\n");
	return 2;
}
