/* EXEC: starting a command (credentials, environment, pipes or a terminal) and running it to its EXIT. */
#include "agent.h"

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

/* What PROCS reports of a command: its argv (whole entries, CMD_KEEP bytes at most) and directory. */
static void keep_cmdline(struct req *r, struct msg *m, const char *cwd)
{
	size_t n = 0;

	r->cmd = xrealloc(NULL, CMD_KEEP);
	for (size_t i = 0; i < m->argc; i++) {
		size_t len = strlen(m->argv[i]) + 1;
		if (len > CMD_KEEP - n)
			break;
		memcpy(r->cmd + n, m->argv[i], len);
		n += len;
	}
	r->cmdlen = n;
	r->cwd = xstrdup(cwd);
}

void h_exec(uint32_t id, struct msg *m)
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
	int64_t flags = get_flags(m);
	if (timeout < 0 || (want_stdin != 0 && want_stdin != 1) || (flags & ~(int64_t)FLAG_KEEP)) {
		send_error(id, EINVAL, "bad TIMEOUT_MS, STDIN or FLAGS value");
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
	r->keep = flags & FLAG_KEEP;
	keep_cmdline(r, m, s->cwd);
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

/* Queues input for a command's stdin; n == 0 closes it once drained (on a terminal: types ^D). */
static void feed_stdin(struct req *r, const uint8_t *d, uint32_t n)
{
	struct termios tio;
	uint8_t veof;

	if (r->in_fd < 0 || r->in_eof)
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
		logmsg("request %u: stdin buffer over %u bytes, closing stdin", r->id, STDIN_MAX);
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

void h_stdin(uint32_t id, const uint8_t *d, uint32_t n)
{
	struct req *r = find_req(id, R_EXEC);

	if (r)
		feed_stdin(r, d, n);
}

/* Called when the stdin pipe is writable (or broken). */
void pump_stdin(struct req *r)
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
bool pump_pipe(struct req *r, int *fd, int64_t *left, uint8_t type)
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

static void signal_cmd(struct req *r, int sig)
{
	if (r->pty)
		kill_session(r->pid, sig);
	else
		kill(-r->pid, sig);
}

void h_signal(uint32_t id, struct msg *m)
{
	struct req *r = find_req(id, R_EXEC);

	/* After the reap the pgid may be recycled: signal only live commands. */
	if (!r || r->reaped || !m->has[F_SIGNAL] || m->num[F_SIGNAL] < 1 || m->num[F_SIGNAL] >= NSIG)
		return;
	signal_cmd(r, (int)m->num[F_SIGNAL]);
}

static int64_t cmd_flags(const struct req *r)
{
	return (r->keep ? FLAG_KEEP : 0) | (r->pty ? FLAG_PTY : 0) | (r->in_fd >= 0 && !r->in_eof ? FLAG_STDIN : 0) |
	       (r->detached ? 0 : FLAG_ATTACHED);
}

/* The command a PID field names, or answers ERROR (ESRCH) and returns NULL. */
struct req *need_pid(uint32_t id, struct msg *m)
{
	struct req *r = m->has[F_PID] ? find_pid(m->num[F_PID]) : NULL;

	if (!m->has[F_PID])
		send_error(id, EINVAL, "PID is required");
	else if (!r)
		send_error(id, ESRCH, "no running command with pid %lld", (long long)m->num[F_PID]);
	return r;
}

/*
 * ATTACH: a new request takes over a running command's stream: STARTED, then
 * its output from now on and its EXIT, under this id.  A listener it already
 * had gets ERROR EBUSY (one listener per command, so credit stays simple).
 */
void h_attach(uint32_t id, struct msg *m)
{
	int64_t window;

	if (!get_window(id, m, &window))
		return;
	for (int i = 0; i < MAX_REQS; i++) {
		if (reqs[i].kind != R_FREE && reqs[i].id == id) {
			send_error(id, EBUSY, "request id %u is already in flight", id);
			return;
		}
	}
	struct req *r = need_pid(id, m);
	if (!r)
		return;
	if (!r->detached)
		send_error(r->id, EBUSY, "another client attached to command %d", (int)r->pid);
	r->id = id;
	r->detached = false;
	r->credit = window;
	ob_begin();
	put_int(F_PID, r->pid);
	put_int(F_FLAGS, cmd_flags(r));
	ob_send(id, T_STARTED);
}

/* PROCS: a PROC frame for every running command a host may address, then END. */
void h_procs(uint32_t id)
{
	for (int i = 0; i < MAX_REQS; i++) {
		struct req *r = &reqs[i];
		if (r->kind != R_EXEC || r->reaped || r->id >= RESERVED_IDS)
			continue;
		ob_begin();
		put_int(F_PID, r->pid);
		for (size_t off = 0; r->cmd && off < r->cmdlen; off += strlen(r->cmd + off) + 1)
			put_str(F_ARGV, r->cmd + off);
		if (r->cwd)
			put_str(F_CWD, r->cwd);
		put_int(F_FLAGS, cmd_flags(r));
		ob_send(id, T_PROC);
	}
	ob_begin();
	ob_send(id, T_END);
}

/* INPUT: stdin for a command by pid (INPUT bytes, FLAGS bit 0: then close it); OK, or ERROR. */
void h_input(uint32_t id, struct msg *m)
{
	struct req *r = need_pid(id, m);
	int64_t flags = get_flags(m);

	if (!r)
		return;
	if (flags & ~(int64_t)FLAG_EOF) {
		send_error(id, EINVAL, "bad FLAGS value");
		return;
	}
	if (r->in_fd < 0 || r->in_eof) {
		send_error(id, EPIPE, "the stdin of command %d is closed", (int)r->pid);
		return;
	}
	if (m->has[F_INPUT] && m->slen[F_INPUT] > 0)
		feed_stdin(r, (const uint8_t *)m->str[F_INPUT], (uint32_t)m->slen[F_INPUT]);
	if (flags & FLAG_EOF)
		feed_stdin(r, NULL, 0);
	send_ok(id);
}

/* PSIGNAL: a signal for a command by pid; OK, or ERROR. */
void h_psignal(uint32_t id, struct msg *m)
{
	if (!m->has[F_SIGNAL] || m->num[F_SIGNAL] < 1 || m->num[F_SIGNAL] >= NSIG) {
		send_error(id, EINVAL, "SIGNAL must be 1-%d", NSIG - 1);
		return;
	}
	struct req *r = need_pid(id, m);
	if (r) {
		signal_cmd(r, (int)m->num[F_SIGNAL]);
		send_ok(id);
	}
}

void reap_children(void)
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
void check_exec(struct req *r, int64_t now)
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
