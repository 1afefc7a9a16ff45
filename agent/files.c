/* File requests: READ, WRITE, LIST, STAT, MKDIR, REMOVE, RENAME. */
#include "agent.h"

void h_read(uint32_t id, struct msg *m)
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
void pump_read(struct req *r)
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

void h_write(uint32_t id, struct msg *m)
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

void h_write_data(uint32_t id, const uint8_t *d, uint32_t n)
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

void h_write_end(uint32_t id)
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

void h_list(uint32_t id, struct msg *m)
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

void h_stat(uint32_t id, struct msg *m)
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

void h_mkdir(uint32_t id, struct msg *m)
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

void h_remove(uint32_t id, struct msg *m)
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

void h_rename(uint32_t id, struct msg *m)
{
	const char *from = need_path(id, m, F_PATH), *to = from ? need_path(id, m, F_NEWPATH) : NULL;

	if (!to)
		return;
	if (rename(from, to) != 0)
		send_syserr(id, errno, "rename", from);
	else
		send_ok(id);
}
