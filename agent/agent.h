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
 *
 * The sources, one job each:
 *   main.c       the entry point: init, --serve-fd or --version
 *   init.c       PID 1: mounts, switch_root, the reaper, restarting the serving agent
 *   rpc.c        the serving agent: the port, frame dispatch, the poll() loop
 *   frame.c      the wire format: sending frames, parsing fields
 *   requests.c   the table of requests in flight and their flow control
 *   exec.c       EXEC: starting a command and running it to its EXIT
 *   pty.c        the terminal of a PTY exec
 *   files.c      READ, WRITE, LIST, STAT, MKDIR, REMOVE, RENAME
 *   watch.c      WATCH: a directory's changes (inotify) as EVENT frames
 *   configure.c  CONFIGURE
 *   util.c       small helpers shared by all of them
 * This header holds the protocol constants, the shared types and what one
 * source calls in another.
 */
#ifndef TARTARUS_AGENT_H
#define TARTARUS_AGENT_H

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
#define PROTO_VERSION 5
#define PORT_NAME "org.tartarus.agent.0"

#define HDR_LEN 12
#define MAX_PAYLOAD (1u << 20)
#define MAX_REQS 256              /* execs + reads + writes in flight */
#define MAX_LIST 4096             /* ARGV / ENV entries */
#define MAX_LIST_LEN (128 * 1024) /* one ARGV / ENV entry */
#define PIPE_CHUNK (64 * 1024)
#define DATA_CHUNK (256 * 1024)
#define STDIN_MAX (16u << 20)
#define DRAIN_MS 100             /* pipe draining after the command was reaped */
#define FRAME_COST 256           /* window bytes a data frame costs beyond its payload */
#define FINISH_MAX (1 << 20)      /* output still forwarded from a pipe after the drain time */
#define HOST_POLL_MS 20           /* how often a closed port is checked for a returning host */
#define RM_MAX_DEPTH 256          /* recursive REMOVE holds one fd per level */
#define PTY_MAX_SIZE 1000         /* rows and columns of a terminal */
#define INPUT_MAX (64 * 1024)     /* one INPUT field */
#define CMD_KEEP (8 * 1024)       /* argv bytes kept per command for PROCS */
#define MAX_WATCHES 16            /* WATCH requests at once */
#define WATCH_DIRS 4096           /* directories one recursive WATCH follows */
#define WATCH_MIN (16 * 1024)     /* credit a WATCH needs before it reads more events */
#define EVENT_FIELDS 18           /* TYPE (5 + 8) and NAME's header (5): an EVENT's payload less its name */
#define DEFAULT_TERM "TERM=xterm-256color"
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* Frame types. */
enum {
	T_PING = 0x01, T_EXEC, T_STDIN, T_SIGNAL, T_READ, T_WRITE, T_WRITE_DATA,
	T_WRITE_END, T_LIST, T_STAT, T_MKDIR, T_REMOVE, T_RENAME, T_CONFIGURE,
	T_RESIZE, T_CREDIT, T_DETACH, T_ATTACH, T_PROCS, T_INPUT, T_PSIGNAL,
	T_PRESIZE, T_WATCH,
	T_HELLO = 0x80, T_OK, T_STARTED, T_STDOUT, T_STDERR, T_EXIT, T_DATA,
	T_END, T_ENTRY, T_PROC, T_EVENT, T_ERROR = 0x8F,
};

/* Field tags. */
enum {
	F_ARGV = 1, F_ENV, F_CWD, F_UID, F_GID, F_TIMEOUT_MS, F_STDIN, F_PATH,
	F_NEWPATH, F_MODE, F_FLAGS, F_PID, F_EXIT_CODE, F_SIGNAL, F_TIMED_OUT,
	F_ERRNO, F_MESSAGE, F_SIZE, F_NAME, F_TYPE, F_MTIME_NS, F_LINK,
	F_VERSION, F_TIME_NS, F_ENTROPY, F_HOSTNAME, F_USER, F_MACHINE_ID,
	F_ROWS, F_COLS, F_WINDOW, F_INPUT, F_MAX
};

/* Field kinds: K_BYTES is like a string but may hold NUL (ENTROPY, INPUT). */
enum { K_UNKNOWN, K_INT, K_STR, K_BYTES, K_LIST };

#define FLAG_RECURSIVE 1 /* also "parents" for MKDIR */
#define FLAG_APPEND 2
#define FLAG_EOF 1   /* INPUT: close stdin after the data */
/* EXEC: the command outlives its requester (DETACH, the host leaving); also in PROC and ATTACH's STARTED. */
#define FLAG_KEEP 4
#define FLAG_PTY 8      /* PROC, STARTED of ATTACH: the command runs on a terminal */
#define FLAG_STDIN 16   /* PROC, STARTED of ATTACH: its stdin is open */
#define FLAG_ATTACHED 32 /* PROC: a host request listens to it */

/* /etc/machine-id is a bind mount of a tmpfs file (set up by init), so a restored clone gets its own id
 * with one tmpfs write instead of an overlayfs copy-up and an ext4 allocation: on a freshly restored
 * guest every kernel path runs for the first time, and under TCG that is what costs. */
#define MACHINE_ID_RUN "/run/tartarus-machine-id"

/* Requests in flight */

enum { R_FREE, R_EXEC, R_READ, R_WRITE, R_WATCH };

/* A directory a WATCH follows: its inotify watch and its path below the watched root ("" for the root). */
struct wdir {
	int wd;
	char *rel;
};

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
	bool keep;                   /* FLAG_KEEP: detaching leaves it running, unattached (id 0) */
	char *cmd;                   /* its argv, NUL-separated, at most CMD_KEEP bytes (PROCS) */
	size_t cmdlen;
	char *cwd;
	/* R_EXEC, R_READ: window bytes the host still grants for output (CREDIT), -1 = no flow control */
	int64_t credit;
	/* R_READ, R_WRITE */
	int fd;
	uint64_t size;
	char *path;                  /* READ: for messages; WRITE: final name */
	char *tmp;                   /* WRITE: temporary file (NULL when appending) */
	/* R_WATCH: fd is the inotify instance, path the watched root */
	struct wdir *wds;
	size_t nwds, capwds;
	bool recursive;
	bool lost;                   /* events were dropped for want of credit: an overflow EVENT is due */
};

/* Requests with ids from here up are the sandbox's own processes (interpreter, start command). */
#define RESERVED_IDS 0xFFFF0000u

/* A frame's fields, parsed (frame.c). */
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

/* util.c */
void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int64_t now_ms(void);
void sleep_ms(long ms);
uint32_t get_be32(const uint8_t *p);
uint64_t get_be64(const uint8_t *p);
void put_be32(uint8_t *p, uint32_t v);
void put_be64(uint8_t *p, uint64_t v);
void xclose(int *fd);
void set_nonblock(int fd);
int write_all(int fd, const void *buf, size_t n);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);

/* frame.c */
extern uint8_t iobuf[HDR_LEN + DATA_CHUNK];
void send_iobuf(uint32_t id, uint8_t type, size_t n);
void ob_begin(void);
void put_field(uint8_t tag, const void *v, size_t n);
void put_int(uint8_t tag, int64_t v);
void put_str(uint8_t tag, const char *s);
void ob_send(uint32_t id, uint8_t type);
void send_ok(uint32_t id);
void send_error(uint32_t id, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void send_syserr(uint32_t id, int err, const char *what, const char *path);
int parse_fields(const uint8_t *p, uint32_t len, struct msg *m);
const char *need_path(uint32_t id, struct msg *m, int tag);
bool get_mode(uint32_t id, struct msg *m, mode_t def, mode_t *mode);
int64_t get_flags(struct msg *m);

/* requests.c */
extern struct req reqs[MAX_REQS];
struct req *find_req(uint32_t id, int kind);
void free_req(struct req *r);
size_t sendable(const struct req *r, size_t max);
void charge(struct req *r, size_t n);
void __attribute__((noreturn)) shutdown_agent(int code);
struct req *new_req(uint32_t id, int kind);
bool get_window(uint32_t id, struct msg *m, int64_t *window);
void h_credit(uint32_t id, struct msg *m);
void h_detach(uint32_t id);
void unattach(struct req *r);
struct req *find_pid(int64_t pid);

/* exec.c */
void h_exec(uint32_t id, struct msg *m);
void h_stdin(uint32_t id, const uint8_t *d, uint32_t n);
void pump_stdin(struct req *r);
bool pump_pipe(struct req *r, int *fd, int64_t *left, uint8_t type);
void h_signal(uint32_t id, struct msg *m);
void h_attach(uint32_t id, struct msg *m);
void h_procs(uint32_t id);
void h_input(uint32_t id, struct msg *m);
void h_psignal(uint32_t id, struct msg *m);
struct req *need_pid(uint32_t id, struct msg *m);
void reap_children(void);
void check_exec(struct req *r, int64_t now);

/* pty.c */
bool get_winsize(struct msg *m, struct winsize *ws);
int open_pty(const struct winsize *ws, int *master, int *slave);
void kill_session(pid_t sid, int sig);
void h_resize(uint32_t id, struct msg *m);
void h_presize(uint32_t id, struct msg *m);

/* watch.c */
void h_watch(uint32_t id, struct msg *m);
void pump_watch(struct req *r);
void flush_lost(struct req *r);
void free_watch(struct req *r);

/* files.c */
void h_read(uint32_t id, struct msg *m);
void pump_read(struct req *r);
void h_write(uint32_t id, struct msg *m);
void h_write_data(uint32_t id, const uint8_t *d, uint32_t n);
void h_write_end(uint32_t id);
void h_list(uint32_t id, struct msg *m);
void h_stat(uint32_t id, struct msg *m);
void h_mkdir(uint32_t id, struct msg *m);
void h_remove(uint32_t id, struct msg *m);
void h_rename(uint32_t id, struct msg *m);

/* configure.c */
extern int rw_fd;
extern char rw_dev[256];
void h_configure(uint32_t id, struct msg *m);

/* rpc.c */
extern int port_fd;
extern bool reconnectable;
extern struct rlimit orig_nofile;
void __attribute__((noreturn)) serve(int fd);

/* init.c */
void __attribute__((noreturn)) init_main(void);

#endif
