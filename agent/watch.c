/*
 * WATCH: a directory's changes, from inotify, streamed as EVENT frames (TYPE: the inotify mask, NAME:
 * the path below the watched directory) until the host DETACHes or the directory goes away (END).
 *
 * Events are sent against credit like command output.  Without credit the inotify fd is not read: the
 * kernel queues events (bounded by max_queued_events) and reports IN_Q_OVERFLOW past that, which is
 * passed on.  An event that does not fit the credit left is dropped and an overflow EVENT (mask
 * IN_Q_OVERFLOW) follows once credit returns, so a guest making changes faster than the host takes
 * them costs neither side unbounded memory.
 */
#include "agent.h"
#include <sys/inotify.h>

#define WATCH_MASK (IN_CREATE | IN_MODIFY | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB | \
		    IN_DELETE_SELF | IN_MOVE_SELF)

void free_watch(struct req *r)
{
	for (size_t i = 0; i < r->nwds; i++)
		free(r->wds[i].rel);
	free(r->wds);
	r->wds = NULL;
	r->nwds = r->capwds = 0;
}

static struct wdir *find_wd(struct req *r, int wd)
{
	for (size_t i = 0; i < r->nwds; i++)
		if (r->wds[i].wd == wd)
			return &r->wds[i];
	return NULL;
}

/* Watches root/rel and, for a recursive watch, the directories below it; 0 or an errno (ENOSPC: more
 * than WATCH_DIRS directories).  Subdirectories that vanish or cannot be read meanwhile are skipped. */
static int add_dir(struct req *r, const char *rel, int depth)
{
	char full[PATH_MAX];
	int n = *rel ? snprintf(full, sizeof full, "%s/%s", r->path, rel) : snprintf(full, sizeof full, "%s", r->path);

	if (n < 0 || (size_t)n >= sizeof full)
		return ENAMETOOLONG;
	if (r->nwds >= WATCH_DIRS)
		return ENOSPC;
	/* Below the root, symlinks are not followed: a link to an ancestor would loop. */
	int wd = inotify_add_watch(r->fd, full, WATCH_MASK | IN_ONLYDIR | (*rel ? IN_DONT_FOLLOW : 0));
	if (wd < 0)
		return errno;
	if (find_wd(r, wd)) /* the same directory by another path */
		return 0;
	if (r->nwds == r->capwds) {
		r->capwds = r->capwds ? 2 * r->capwds : 16;
		r->wds = xrealloc(r->wds, r->capwds * sizeof *r->wds);
	}
	r->wds[r->nwds++] = (struct wdir){ .wd = wd, .rel = xstrdup(rel) };
	if (!r->recursive || depth >= RM_MAX_DEPTH)
		return 0;
	DIR *d = opendir(full);
	struct dirent *de;
	int e = 0;
	while (d && !e && (de = readdir(d))) {
		char child[PATH_MAX];
		struct stat st;
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		if (de->d_type != DT_DIR && de->d_type != DT_UNKNOWN)
			continue;
		if (de->d_type == DT_UNKNOWN && (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
						 !S_ISDIR(st.st_mode)))
			continue;
		n = *rel ? snprintf(child, sizeof child, "%s/%s", rel, de->d_name) : snprintf(child, sizeof child, "%s", de->d_name);
		if (n < 0 || (size_t)n >= sizeof child)
			continue;
		e = add_dir(r, child, depth + 1);
		if (e != ENOSPC)
			e = 0;
	}
	if (d)
		closedir(d);
	return e;
}

/* WATCH: PATH (a directory), FLAGS (RECURSIVE), WINDOW; OK, then EVENT frames. */
void h_watch(uint32_t id, struct msg *m)
{
	const char *path = need_path(id, m, F_PATH);
	int64_t flags = get_flags(m), window;
	struct stat st;
	int watches = 0;

	if (!path || !get_window(id, m, &window))
		return;
	if (flags & ~(int64_t)FLAG_RECURSIVE) {
		send_error(id, EINVAL, "bad FLAGS value");
		return;
	}
	for (int i = 0; i < MAX_REQS; i++)
		watches += reqs[i].kind == R_WATCH;
	if (watches >= MAX_WATCHES) {
		send_error(id, EMFILE, "too many directories watched at once (max %d)", MAX_WATCHES);
		return;
	}
	if (stat(path, &st) != 0) {
		send_syserr(id, errno, "watch", path);
		return;
	}
	if (!S_ISDIR(st.st_mode)) {
		send_syserr(id, ENOTDIR, "watch", path);
		return;
	}
	struct req *r = new_req(id, R_WATCH);
	if (!r)
		return;
	r->fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	if (r->fd < 0) {
		send_syserr(id, errno, "inotify for", path);
		free_req(r);
		return;
	}
	r->path = xstrdup(path);
	r->recursive = flags & FLAG_RECURSIVE;
	r->credit = window;
	int e = add_dir(r, "", 0);
	if (e == ENOSPC)
		send_error(id, ENOSPC, "%s holds more than %d directories to watch", path, WATCH_DIRS);
	else if (e)
		send_syserr(id, e, "watch", path);
	if (e) {
		free_req(r);
		return;
	}
	send_ok(id);
}

/* One EVENT, if the credit left covers it; else it is dropped and an overflow EVENT is due. */
static void send_event(struct req *r, uint32_t mask, const char *name)
{
	size_t cost = EVENT_FIELDS + strlen(name);

	if (sendable(r, cost) < cost) {
		r->lost = true;
		return;
	}
	ob_begin();
	put_int(F_TYPE, mask);
	put_str(F_NAME, name);
	ob_send(r->id, T_EVENT);
	charge(r, cost);
}

/* Sends the overflow EVENT that dropped events left due, once there is credit for it. */
void flush_lost(struct req *r)
{
	if (sendable(r, EVENT_FIELDS) < EVENT_FIELDS)
		return;
	r->lost = false;
	send_event(r, IN_Q_OVERFLOW, "");
}

static void forget_wd(struct req *r, struct wdir *w)
{
	free(w->rel);
	*w = r->wds[--r->nwds];
}

/* Reads what inotify has and sends it on; the root going away ends the watch with END. */
void pump_watch(struct req *r)
{
	char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
	ssize_t n = read(r->fd, buf, sizeof buf);

	if (n <= 0) {
		if (n < 0 && errno != EAGAIN && errno != EINTR)
			logmsg("request %u: reading inotify: %s", r->id, strerror(errno));
		return;
	}
	for (char *p = buf; p < buf + n;) {
		const struct inotify_event *ev = (const struct inotify_event *)p;
		p += sizeof *ev + ev->len;
		if (ev->mask & IN_Q_OVERFLOW) { /* the kernel dropped events */
			r->lost = true;
			flush_lost(r);
			continue;
		}
		struct wdir *w = find_wd(r, ev->wd);
		if (!w)
			continue;
		bool root = !*w->rel;
		if (ev->mask & IN_IGNORED) { /* the directory is gone (or unmounted) */
			if (root) {
				ob_begin();
				ob_send(r->id, T_END);
				free_req(r);
				return;
			}
			forget_wd(r, w);
			continue;
		}
		if (!ev->len && !root) /* a subdirectory's own removal: its parent reported it */
			continue;
		char name[PATH_MAX];
		int k = !ev->len ? snprintf(name, sizeof name, "%s", w->rel)
		      : root     ? snprintf(name, sizeof name, "%s", ev->name)
				 : snprintf(name, sizeof name, "%s/%s", w->rel, ev->name);
		if (k < 0 || (size_t)k >= sizeof name)
			continue;
		if (r->recursive && (ev->mask & IN_ISDIR) && (ev->mask & (IN_CREATE | IN_MOVED_TO))) {
			int depth = 1;
			for (const char *c = name; *c; c++)
				depth += *c == '/';
			if (add_dir(r, name, depth) == ENOSPC)
				r->lost = true; /* changes below it will be missed: say so */
		}
		send_event(r, ev->mask, name);
	}
}
