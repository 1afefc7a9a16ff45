/* The wire format: frames sent to the host, and the fields of the frames it sends. */
#include "agent.h"

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
	[F_WINDOW] = { K_INT, "WINDOW" }, [F_INPUT] = { K_BYTES, "INPUT" },
};

/* Data frames are read straight behind their header, so they are never copied. */
uint8_t iobuf[HDR_LEN + DATA_CHUNK];
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

void send_iobuf(uint32_t id, uint8_t type, size_t n)
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

void ob_begin(void)
{
	ob.len = 0;
	ob_reserve(HDR_LEN);
	ob.len = HDR_LEN;
}

void put_field(uint8_t tag, const void *v, size_t n)
{
	ob_reserve(5 + n);
	ob.p[ob.len] = tag;
	put_be32(ob.p + ob.len + 1, (uint32_t)n);
	if (n)
		memcpy(ob.p + ob.len + 5, v, n);
	ob.len += 5 + n;
}

void put_int(uint8_t tag, int64_t v)
{
	uint8_t b[8];

	put_be64(b, (uint64_t)v);
	put_field(tag, b, 8);
}

void put_str(uint8_t tag, const char *s)
{
	put_field(tag, s, strlen(s));
}

void ob_send(uint32_t id, uint8_t type)
{
	fill_header(ob.p, (uint32_t)(ob.len - HDR_LEN), id, type);
	write_port(ob.p, ob.len);
}

void send_ok(uint32_t id)
{
	ob_begin();
	ob_send(id, T_OK);
}

void send_error(uint32_t id, int err, const char *fmt, ...)
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
void send_syserr(uint32_t id, int err, const char *what, const char *path)
{
	send_error(id, err, "%s %s: %s", what, path, strerror(err));
}

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
int parse_fields(const uint8_t *p, uint32_t len, struct msg *m)
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
		if (n > (kind == K_LIST ? MAX_LIST_LEN : tag == F_INPUT ? INPUT_MAX : PATH_MAX - 1)) {
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
const char *need_path(uint32_t id, struct msg *m, int tag)
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

bool get_mode(uint32_t id, struct msg *m, mode_t def, mode_t *mode)
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

int64_t get_flags(struct msg *m)
{
	return m->has[F_FLAGS] ? m->num[F_FLAGS] : 0;
}
