/* The table of requests in flight and their flow control (WINDOW, CREDIT, DETACH). */
#include "agent.h"

struct req reqs[MAX_REQS];

struct req *find_req(uint32_t id, int kind)
{
	if (id == 0) /* unattached commands: no host request is theirs */
		return NULL;
	for (int i = 0; i < MAX_REQS; i++)
		if (reqs[i].kind == kind && reqs[i].id == id)
			return &reqs[i];
	return NULL;
}

void free_req(struct req *r)
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
	free(r->cmd);
	free(r->cwd);
	free_watch(r);
	memset(r, 0, sizeof *r);
	r->out_fd = r->err_fd = r->in_fd = r->fd = -1;
	r->out_left = r->err_left = r->credit = -1;
	r->kind = R_FREE;
}

/* How many output bytes r may send in one frame now (at most max): its credit less the frame's cost. */
size_t sendable(const struct req *r, size_t max)
{
	if (r->credit < 0 || r->detached)
		return max;
	if (r->credit <= FRAME_COST)
		return 0;
	return (uint64_t)(r->credit - FRAME_COST) < max ? (size_t)(r->credit - FRAME_COST) : max;
}

void charge(struct req *r, size_t n)
{
	if (r->credit >= 0)
		r->credit -= (int64_t)n + FRAME_COST;
}

/* Kills what we started and leaves; init restarts us. */
void __attribute__((noreturn)) shutdown_agent(int code)
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

/* Takes a free slot for a new request, or answers ERROR and returns NULL. */
struct req *new_req(uint32_t id, int kind)
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

/* The initial window of an EXEC or READ (WINDOW field), or answers ERROR and returns false. */
bool get_window(uint32_t id, struct msg *m, int64_t *window)
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

/* CREDIT: the host drained output of an EXEC or READ and lets it send SIZE bytes more. */
void h_credit(uint32_t id, struct msg *m)
{
	struct req *r = find_req(id, R_EXEC);

	if (!r)
		r = find_req(id, R_READ);
	if (!r)
		r = find_req(id, R_WATCH);
	if (!r || r->credit < 0 || !m->has[F_SIZE] || m->num[F_SIZE] <= 0)
		return;
	r->credit = m->num[F_SIZE] > INT64_MAX / 2 - r->credit ? INT64_MAX / 2 : r->credit + m->num[F_SIZE];
}

/*
 * DETACH: the host stopped listening.  A read, write or watch ends here (its
 * file closed, a write's temporary file removed); a command runs on, its output
 * read and dropped, and is reaped without EXIT.
 */
void h_detach(uint32_t id)
{
	struct req *r = find_req(id, R_EXEC);

	if (r && r->keep) {
		unattach(r);
		return;
	}
	if (r) {
		r->detached = true;
		return;
	}
	if ((r = find_req(id, R_READ)) || (r = find_req(id, R_WRITE)) || (r = find_req(id, R_WATCH)))
		free_req(r);
}

/*
 * A kept command loses its listener: it runs on, its output read and dropped
 * (it never blocks on a full pipe), and gives up its id, which the host may
 * use again; ATTACH gives it a new one.
 */
void unattach(struct req *r)
{
	r->detached = true;
	r->id = 0;
}

/* The live command with that guest pid that a host may address (not the sandbox's own processes). */
struct req *find_pid(int64_t pid)
{
	if (pid <= 0)
		return NULL;
	for (int i = 0; i < MAX_REQS; i++) {
		struct req *r = &reqs[i];
		if (r->kind == R_EXEC && r->pid == pid && !r->reaped && r->id < RESERVED_IDS)
			return r;
	}
	return NULL;
}
