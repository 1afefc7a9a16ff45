/*
 * libtartarus-ramfile.so - open the template's guest RAM file read-only, in a jailed QEMU 7.2.
 *
 * A restored sandbox maps its template's memory file privately (copy-on-write): QEMU never writes
 * the file, but QEMU before 8.2 opens a memory-backend-file's mem-path O_RDWR all the same (its
 * readonly=on also maps guest RAM read-only: a ROM; 8.2's rom=off separates the two).  So the file
 * would have to be writable by every VMM of the template, and one escaped VMM could change the RAM
 * every other restore of it starts from (a private mapping sees the file's changes on every page it
 * has not copied yet).
 *
 * Preloaded into such a QEMU only (LD_PRELOAD, with TARTARUS_RAM_FILE naming the file), this turns
 * an O_RDWR open of exactly that path into O_RDONLY: a private writable mapping of a read-only fd is
 * what the kernel allows, and the only write QEMU 7.2 could do through the fd (a discard's
 * fallocate hole punch, which no device of ours asks for) fails instead of changing the template.
 * The file's mode and a read-only bind mount are what forbid the write; this only stops QEMU asking.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

typedef int (*open_fn)(const char *, int, ...);
typedef int (*openat_fn)(int, const char *, int, ...);

static int readonly_flags(const char *path, int flags)
{
	const char *ram = getenv("TARTARUS_RAM_FILE");
	if (ram && path && strcmp(path, ram) == 0 && (flags & O_ACCMODE) == O_RDWR && !(flags & (O_CREAT | O_TRUNC)))
		return (flags & ~O_ACCMODE) | O_RDONLY;
	return flags;
}

static mode_t mode_arg(int flags, va_list ap)
{
	return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

#define OPEN(name)                                                                      \
	int name(const char *path, int flags, ...)                                      \
	{                                                                               \
		static open_fn real;                                                    \
		va_list ap;                                                             \
		va_start(ap, flags);                                                    \
		mode_t mode = mode_arg(flags, ap);                                      \
		va_end(ap);                                                             \
		if (!real)                                                              \
			real = (open_fn)dlsym(RTLD_NEXT, #name);                        \
		return real(path, readonly_flags(path, flags), mode);                   \
	}

#define OPENAT(name)                                                                    \
	int name(int dir, const char *path, int flags, ...)                             \
	{                                                                               \
		static openat_fn real;                                                  \
		va_list ap;                                                             \
		va_start(ap, flags);                                                    \
		mode_t mode = mode_arg(flags, ap);                                      \
		va_end(ap);                                                             \
		if (!real)                                                              \
			real = (openat_fn)dlsym(RTLD_NEXT, #name);                      \
		return real(dir, path, readonly_flags(path, flags), mode);              \
	}

OPEN(open)
OPEN(open64)
OPENAT(openat)
OPENAT(openat64)

/* What _FORTIFY_SOURCE builds call when the flags are not a compile-time constant (QEMU's are not). */
#define OPEN_2(name)                                                                    \
	int name(const char *path, int flags)                                           \
	{                                                                               \
		static int (*real)(const char *, int);                                  \
		if (!real)                                                              \
			real = (int (*)(const char *, int))dlsym(RTLD_NEXT, #name);     \
		return real(path, readonly_flags(path, flags));                         \
	}

#define OPENAT_2(name)                                                                  \
	int name(int dir, const char *path, int flags)                                  \
	{                                                                               \
		static int (*real)(int, const char *, int);                             \
		if (!real)                                                              \
			real = (int (*)(int, const char *, int))dlsym(RTLD_NEXT, #name); \
		return real(dir, path, readonly_flags(path, flags));                    \
	}

OPEN_2(__open_2)
OPEN_2(__open64_2)
OPENAT_2(__openat_2)
OPENAT_2(__openat64_2)
