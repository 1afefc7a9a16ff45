/*
 * tartarus-launch - put a VMM in its place, then become it.
 *
 *   tartarus-launch [--tie PPID] [--setsid] [--nice N] [--netns FD]
 *                   [--cgroup PROCS_FILE]... -- QEMU ARGV...
 *
 * Joins the sandbox's network namespace and cgroups, ties itself to its parent
 * (PR_SET_PDEATHSIG) or leaves the parent's session, and execs QEMU: no guest
 * instruction runs outside its confinement.  It exists so that the daemon can
 * start VMMs without a Python preexec_fn: that forces a full fork() of the
 * daemon, which with the interpreter lock held stalls every request for ~10 ms
 * at a daemon's size, where a spawn without one is a vfork (~0.2 ms).
 *
 * Every failure exits 126 with a message on stderr (the VMM's log).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#define MAX_CGROUPS 8

static void __attribute__((noreturn)) die(const char *what, const char *arg)
{
	fprintf(stderr, "tartarus-launch: %s%s%s: %s\n", what, arg ? " " : "", arg ? arg : "", strerror(errno));
	exit(126);
}

static void __attribute__((noreturn)) usage(void)
{
	fprintf(stderr, "usage: tartarus-launch [--tie PPID] [--setsid] [--nice N] [--netns FD] "
			"[--cgroup PROCS_FILE]... -- ARGV...\n");
	exit(126);
}

static long number(const char *s)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || !*s || *end)
		usage();
	return v;
}

int main(int argc, char **argv)
{
	long tie = -1, nice_ = 0, netns = -1;
	int new_session = 0, ncg = 0, i = 1;
	const char *cgroups[MAX_CGROUPS];

	for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
		if (strcmp(argv[i], "--setsid") == 0)
			new_session = 1;
		else if (i + 1 >= argc)
			usage();
		else if (strcmp(argv[i], "--tie") == 0)
			tie = number(argv[++i]);
		else if (strcmp(argv[i], "--nice") == 0)
			nice_ = number(argv[++i]);
		else if (strcmp(argv[i], "--netns") == 0)
			netns = number(argv[++i]);
		else if (strcmp(argv[i], "--cgroup") == 0 && ncg < MAX_CGROUPS)
			cgroups[ncg++] = argv[++i];
		else
			usage();
	}
	if (i + 1 >= argc)
		usage();

	if (tie >= 0) {
		if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
			die("prctl", NULL);
		if (getppid() != (pid_t)tie) /* the parent died before the tie took effect */
			exit(126);
	}
	if (new_session && setsid() < 0)
		die("setsid", NULL);
	if (nice_) {
		errno = 0;
		if (nice((int)nice_) == -1 && errno)
			die("nice", NULL);
	}
	if (netns >= 0) {
		if (setns((int)netns, CLONE_NEWNET) != 0)
			die("setns", NULL);
		close((int)netns);
	}
	for (int c = 0; c < ncg; c++) {
		int fd = open(cgroups[c], O_WRONLY | O_CLOEXEC);
		if (fd < 0 || write(fd, "0", 1) != 1)
			die("joining cgroup", cgroups[c]);
		close(fd);
	}
	execv(argv[i + 1], &argv[i + 1]);
	die("exec", argv[i + 1]);
}
