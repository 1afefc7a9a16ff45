/* CONFIGURE: what a restored clone changes to become its own machine (clock, entropy, names, disk size). */
#include "agent.h"

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
int rw_fd = -1;
char rw_dev[256];

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

void h_configure(uint32_t id, struct msg *m)
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
