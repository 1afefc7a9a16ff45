/* The serving agent: the port, frame dispatch and the poll() loop. */
#include "agent.h"

int port_fd = -1;
/*
 * Serving the virtio port, a closed host side is a daemon restarting: the
 * agent waits for the next host instead of exiting (see host_left()).
 */
bool reconnectable;
static bool host_present = true;

struct rlimit orig_nofile;

static struct msg M;

static void h_ping(uint32_t id)
{
	ob_begin();
	put_int(F_VERSION, PROTO_VERSION);
	ob_send(id, T_OK);
}

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
	if (type < T_PING || type > T_WATCH) {
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
	case T_ATTACH: h_attach(id, &M); break;
	case T_PROCS: h_procs(id); break;
	case T_INPUT: h_input(id, &M); break;
	case T_PSIGNAL: h_psignal(id, &M); break;
	case T_PRESIZE: h_presize(id, &M); break;
	case T_WATCH: h_watch(id, &M); break;
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
		if (r->kind == R_EXEC && r->keep) { /* a background command: runs on, for the next host to attach */
			unattach(r);
			continue;
		}
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

/* Adds a watch's inotify fd to the poll set while it has credit (else events wait in the kernel's
 * queue, which overflows into IN_Q_OVERFLOW); returns now if an overflow EVENT is due. */
static int64_t poll_watch(struct req *r, nfds_t *n)
{
	if (r->lost)
		return sendable(r, EVENT_FIELDS) >= EVENT_FIELDS ? now_ms() : -1;
	if (r->fd >= 0 && sendable(r, WATCH_MIN) >= WATCH_MIN)
		add_pollfd(n, r, W_OUT, r->fd, POLLIN);
	return -1;
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

void __attribute__((noreturn)) serve(int fd)
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
				  : reqs[i].kind == R_EXEC ? poll_exec(&reqs[i], &n)
				  : reqs[i].kind == R_WATCH ? poll_watch(&reqs[i], &n) : -1;
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
			if (pfds[i].revents && r->kind == R_WATCH && r->fd == pfds[i].fd) {
				pump_watch(r);
				continue;
			}
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
			else if (reqs[i].kind == R_WATCH && reqs[i].lost)
				flush_lost(&reqs[i]);
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
