/*
 * tartarus-launch - put a VMM in its place, then become it.
 *
 *   tartarus-launch [--tie PPID] [--setsid] [--nice N] [--no-thp] [--netns FD]
 *                   [--cgroup PROCS_FILE]... [--tap NAME FD] [--pidns FD]
 *                   [--jail DIR [--ro PATH]... [--rw PATH]... [--link PATH]...]
 *                   [--uid UID --gid GID [--group GID]...] -- QEMU ARGV...
 *
 * Joins the sandbox's network namespace and cgroups, ties itself to its parent
 * (PR_SET_PDEATHSIG) or leaves the parent's session, and execs QEMU: no guest
 * instruction runs outside its confinement.
 *
 * --no-thp turns transparent huge pages off for the VMM (PR_SET_THP_DISABLE,
 * kept across exec): TCG asks for them on its translation buffer, and an idle
 * sandbox's ~9 MiB of translated code then holds whole 2 MiB pages.
 *
 * The jail (Firecracker's jailer, for QEMU): with --tap, the TAP is opened here
 * (QEMU gets the fd; /dev/net/tun stays out of reach).  With --jail, a mount
 * namespace (and an IPC namespace) of its own whose root is a tmpfs at DIR
 * holding only the host paths given, bind-mounted at the same paths (--ro
 * read-only, --rw writable, --link a
 * copy of a host symlink), so QEMU's command line needs no rewriting; the host's
 * root is then detached.  With --uid, it drops to that uid and gid with no
 * supplementary groups but those given, an empty bounding and ambient
 * capability set and no_new_privs.  With --pidns, the VMM is pid 1 of a PID
 * namespace of its own (it sees and can signal no other process): the launcher
 * clones it as its own parent's child (CLONE_PARENT, so the starter reaps it and
 * reads its exit status), writes its pid (as the starter sees it) to FD, and
 * exits.  The mounts live only in the VMM's namespace:
 * they go when it exits, whatever becomes of its starter.  It exists so that the daemon can
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
#include <grp.h>
#include <linux/capability.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sys/ioctl.h>
#include <poll.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_CGROUPS 8
#define MAX_PATHS 32
#define MAX_GROUPS 4

enum kind { RO, RW, LINK };

struct entry {
	enum kind kind;
	const char *path;
};

static void __attribute__((noreturn)) die(const char *what, const char *arg)
{
	fprintf(stderr, "tartarus-launch: %s%s%s: %s\n", what, arg ? " " : "", arg ? arg : "", strerror(errno));
	exit(126);
}

static void __attribute__((noreturn)) usage(void)
{
	fprintf(stderr, "usage: tartarus-launch [--tie PPID] [--setsid] [--nice N] [--no-thp] [--netns FD] "
			"[--cgroup PROCS_FILE]... [--tap NAME FD] [--pidns FD] [--jail DIR [--ro|--rw|--link PATH]...] "
			"[--uid UID --gid GID [--group GID]...] -- ARGV...\n");
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

/* Open the TAP `name` (in the namespace joined) as QEMU's ifname= would, and put it at `target`. */
static void open_tap(const char *name, int target)
{
	struct ifreq ifr;
	int fd = open("/dev/net/tun", O_RDWR);
	if (fd < 0)
		die("opening", "/dev/net/tun");
	memset(&ifr, 0, sizeof(ifr));
	/* IFF_VNET_HDR as QEMU's own open sets it: a snapshot's virtio-net state records it */
	ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
	if (strlen(name) >= IFNAMSIZ)
		usage();
	strcpy(ifr.ifr_name, name);
	if (ioctl(fd, TUNSETIFF, &ifr) != 0)
		die("attaching to TAP", name);
	if (fd != target) {
		if (dup2(fd, target) < 0)
			die("dup2", NULL);
		close(fd);
	}
}

/* Go on as pid 1 of a new PID namespace, a child of our own parent; the launcher itself writes that
 * child's pid to `report` and exits.  Returns in the child only. */
static void enter_pid_namespace(int report)
{
	char line[32];
	long child = syscall(SYS_clone, CLONE_NEWPID | CLONE_PARENT, 0, 0, 0, 0);
	if (child < 0)
		die("clone", NULL);
	if (child > 0) {
		int n = snprintf(line, sizeof(line), "%ld\n", child);
		_exit(write(report, line, (size_t)n) == n ? 0 : 126);
	}
	close(report);
}

/* True if the process `pidfd` refers to has exited. */
static int exited(int pidfd)
{
	struct pollfd p = {.fd = pidfd, .events = POLLIN};
	return poll(&p, 1, 0) != 0;
}

/* Make every directory above `path`. */
static void make_parents(char *path)
{
	for (char *p = strchr(path + 1, '/'); p; p = strchr(p + 1, '/')) {
		*p = '\0';
		if (mkdir(path, 0755) != 0 && errno != EEXIST)
			die("mkdir", path);
		*p = '/';
	}
}

static void place(const char *root, const struct entry *e)
{
	char target[4096], link[4096];
	struct stat st;
	if (e->path[0] != '/' || snprintf(target, sizeof(target), "%s%s", root, e->path) >= (int)sizeof(target))
		usage();
	make_parents(target);
	if (e->kind == LINK) {
		ssize_t n = readlink(e->path, link, sizeof(link) - 1);
		if (n < 0)
			die("readlink", e->path);
		link[n] = '\0';
		if (symlink(link, target) != 0)
			die("symlink", target);
		return;
	}
	if (stat(e->path, &st) != 0)
		die("stat", e->path);
	if (S_ISDIR(st.st_mode) ? mkdir(target, 0755) != 0 && errno != EEXIST
				: mknod(target, S_IFREG | 0600, 0) != 0 && errno != EEXIST)
		die("creating mount point", target);
	if (mount(e->path, target, NULL, MS_BIND, NULL) != 0)
		die("bind-mounting", e->path);
	unsigned long flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (e->kind == RO ? MS_RDONLY : 0);
	if (!S_ISCHR(st.st_mode) && !S_ISDIR(st.st_mode))
		flags |= MS_NODEV;
	if (mount(NULL, target, NULL, flags, NULL) != 0)
		die("remounting", e->path);
}

/* A mount namespace whose root holds only `entries`; the host's root is gone from it. */
static void enter_jail(const char *root, const struct entry *entries, int n)
{
	mode_t umask_ = umask(022); /* the jail's directories must be traversable by the VMM's uid */
	/* and an IPC namespace: no System V IPC object or POSIX message queue of the host's in reach */
	if (unshare(CLONE_NEWNS | CLONE_NEWIPC) != 0)
		die("unshare", NULL);
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
		die("making mounts private", NULL);
	if (mount("tartarus-jail", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k,nr_inodes=256") != 0)
		die("mounting jail", root);
	for (int k = 0; k < n; k++)
		place(root, &entries[k]);
	if (chdir(root) != 0)
		die("chdir", root);
	if (syscall(SYS_pivot_root, ".", ".") != 0)
		die("pivot_root", root);
	if (umount2(".", MNT_DETACH) != 0)
		die("detaching the host root", NULL);
	if (chdir("/") != 0)
		die("chdir", "/");
	if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) != 0)
		die("sealing jail root", NULL);
	umask(umask_);
}

/* Become `uid`:`gid` with only `groups`, no capabilities (bounding and ambient sets emptied while we
 * still may) and no_new_privs: nothing exec'd from here can gain a privilege back. */
static void drop_privileges(long uid, long gid, const gid_t *groups, int ngroups)
{
	for (int cap = 0; cap <= CAP_LAST_CAP; cap++)
		if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL)
			die("dropping bounding capability", NULL);
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0)
		die("clearing ambient capabilities", NULL);
	if (setgroups((size_t)ngroups, groups) != 0)
		die("setgroups", NULL);
	if (setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) != 0)
		die("setresgid", NULL);
	if (setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) != 0)
		die("setresuid", NULL);
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
		die("no_new_privs", NULL);
	if (setresuid(0, 0, 0) == 0 || setresgid(0, 0, 0) == 0) { /* never: but if it did, stop here */
		errno = EPERM;
		die("privileges not dropped", NULL);
	}
}

int main(int argc, char **argv)
{
	long tie = -1, nice_ = 0, netns = -1, tap_fd = -1, uid = -1, gid = -1, pidns = -1;
	int tie_fd = -1;
	int new_session = 0, no_thp = 0, ncg = 0, npaths = 0, ngroups = 0, i = 1;
	const char *cgroups[MAX_CGROUPS], *tap = NULL, *jail = NULL;
	struct entry paths[MAX_PATHS];
	gid_t groups[MAX_GROUPS];

	for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
		if (strcmp(argv[i], "--setsid") == 0)
			new_session = 1;
		else if (strcmp(argv[i], "--no-thp") == 0)
			no_thp = 1;
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
		else if (strcmp(argv[i], "--tap") == 0 && i + 2 < argc) {
			tap = argv[++i];
			tap_fd = number(argv[++i]);
		} else if (strcmp(argv[i], "--pidns") == 0)
			pidns = number(argv[++i]);
		else if (strcmp(argv[i], "--jail") == 0)
			jail = argv[++i];
		else if (strcmp(argv[i], "--ro") == 0 && npaths < MAX_PATHS)
			paths[npaths++] = (struct entry){RO, argv[++i]};
		else if (strcmp(argv[i], "--rw") == 0 && npaths < MAX_PATHS)
			paths[npaths++] = (struct entry){RW, argv[++i]};
		else if (strcmp(argv[i], "--link") == 0 && npaths < MAX_PATHS)
			paths[npaths++] = (struct entry){LINK, argv[++i]};
		else if (strcmp(argv[i], "--uid") == 0)
			uid = number(argv[++i]);
		else if (strcmp(argv[i], "--gid") == 0)
			gid = number(argv[++i]);
		else if (strcmp(argv[i], "--group") == 0 && ngroups < MAX_GROUPS)
			groups[ngroups++] = (gid_t)number(argv[++i]);
		else
			usage();
	}
	if (i + 1 >= argc || (uid >= 0) != (gid >= 0) || uid == 0 || gid == 0 || (npaths && !jail))
		usage();

	if (new_session && setsid() < 0)
		die("setsid", NULL);
	if (nice_) {
		errno = 0;
		if (nice((int)nice_) == -1 && errno)
			die("nice", NULL);
	}
	if (no_thp && prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0)
		die("disabling transparent huge pages", NULL);
	if (netns >= 0) {
		if (setns((int)netns, CLONE_NEWNET) != 0)
			die("setns", NULL);
		close((int)netns);
	}
	if (tap)
		open_tap(tap, (int)tap_fd);
	for (int c = 0; c < ncg; c++) {
		int fd = open(cgroups[c], O_WRONLY | O_CLOEXEC);
		if (fd < 0 || write(fd, "0", 1) != 1)
			die("joining cgroup", cgroups[c]);
		close(fd);
	}
	if (pidns >= 0) {
		/* the tie's parent is outside the namespace (getppid() is 0 there): watch it by pidfd */
		if (tie >= 0 && (tie_fd = (int)syscall(SYS_pidfd_open, (pid_t)tie, 0)) < 0)
			die("pidfd_open", NULL);
		enter_pid_namespace((int)pidns);
	}
	if (jail)
		enter_jail(jail, paths, npaths);
	if (uid > 0)
		drop_privileges(uid, gid, groups, ngroups);
	/* Last: a change of credentials clears the parent-death signal. */
	if (tie >= 0) {
		if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
			die("prctl", NULL);
		/* the parent died before the tie took effect */
		if (tie_fd >= 0 ? exited(tie_fd) : getppid() != (pid_t)tie)
			exit(126);
		if (tie_fd >= 0)
			close(tie_fd);
	}
	execv(argv[i + 1], &argv[i + 1]);
	die("exec", argv[i + 1]);
}
