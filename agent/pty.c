/* The terminal of a PTY exec: its size, its creation, RESIZE, and signalling its whole session. */
#include "agent.h"

/* ROWS and COLS of an EXEC or RESIZE: both present, each 1..PTY_MAX_SIZE. */
bool get_winsize(struct msg *m, struct winsize *ws)
{
	if (!m->has[F_ROWS] || !m->has[F_COLS] || m->num[F_ROWS] < 1 || m->num[F_ROWS] > PTY_MAX_SIZE ||
	    m->num[F_COLS] < 1 || m->num[F_COLS] > PTY_MAX_SIZE)
		return false;
	memset(ws, 0, sizeof *ws);
	ws->ws_row = (unsigned short)m->num[F_ROWS];
	ws->ws_col = (unsigned short)m->num[F_COLS];
	return true;
}

/*
 * The slave of `master`.  TIOCGPTPEER opens this master's own slave: no path lookup another process
 * could race.  gVisor has no TIOCGPTPEER (ENOTTY); there the slave is opened by its name, in a sandbox
 * whose only other processes are the commands the agent started.
 */
static int open_slave(int master)
{
	char name[64];
	int fd = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);

	if (fd >= 0 || errno != ENOTTY)
		return fd;
	int e = ptsname_r(master, name, sizeof name);
	if (e != 0) {
		errno = e;
		return -1;
	}
	return open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
}

/* A pseudo-terminal of the given size: the master (non-blocking) and its slave, or errno. */
int open_pty(const struct winsize *ws, int *master, int *slave)
{
	*slave = -1;
	*master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (*master < 0)
		return errno;
	if (unlockpt(*master) != 0 || ioctl(*master, TIOCSWINSZ, ws) != 0 || (*slave = open_slave(*master)) < 0) {
		int e = errno;
		xclose(master);
		return e;
	}
	set_nonblock(*master);
	return 0;
}

/*
 * Signals a PTY exec's whole session: the shell and every job it started, in the foreground or not,
 * as a terminal hangup would reach them (a shell killed outright cannot pass the hangup on).  Only
 * processes that left the session (setsid) escape, as they do on any terminal.
 */
void kill_session(pid_t sid, int sig)
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

/* Sets a PTY exec's terminal size; the kernel sends SIGWINCH to its foreground job. */
void h_resize(uint32_t id, struct msg *m)
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

/* PRESIZE: sets the terminal size of a command by its pid (a background command nobody may be
 * following); OK, or ERROR: ESRCH no such command, ENOTTY it runs on no terminal. */
void h_presize(uint32_t id, struct msg *m)
{
	struct winsize ws;
	struct req *r;

	if (!get_winsize(m, &ws)) {
		send_error(id, EINVAL, "ROWS and COLS must be given, each 1-%d", PTY_MAX_SIZE);
		return;
	}
	if (!(r = need_pid(id, m)))
		return;
	if (!r->pty || r->out_fd < 0) {
		send_error(id, ENOTTY, "command %d runs on no terminal", (int)r->pid);
		return;
	}
	if (ioctl(r->out_fd, TIOCSWINSZ, &ws) != 0) {
		send_error(id, errno, "TIOCSWINSZ: %s", strerror(errno));
		return;
	}
	send_ok(id);
}
