/* PID 1: assembles the root filesystem, switches into it, reaps orphans and keeps the serving agent alive. */
#include "agent.h"

/* Finds the virtio-serial port by name; waits up to 5 s for it to appear. */
static int open_port(void)
{
	for (int tries = 0; tries < 50; tries++) {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *de;
		while (d && (de = readdir(d))) {
			char path[512], name[64];
			if (de->d_name[0] == '.')
				continue;
			snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", de->d_name);
			int fd = open(path, O_RDONLY | O_CLOEXEC);
			if (fd < 0)
				continue;
			ssize_t n = read(fd, name, sizeof name - 1);
			close(fd);
			if (n <= 0)
				continue;
			name[n] = 0;
			name[strcspn(name, "\n")] = 0;
			if (strcmp(name, PORT_NAME) != 0)
				continue;
			snprintf(path, sizeof path, "/dev/%s", de->d_name);
			fd = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY);
			if (fd >= 0) {
				closedir(d);
				return fd;
			}
		}
		if (d)
			closedir(d);
		sleep_ms(100);
	}
	logmsg("virtio-serial port %s not found", PORT_NAME);
	exit(1);
}

static void __attribute__((noreturn)) fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void __attribute__((noreturn)) fatal(const char *fmt, ...)
{
	char buf[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	logmsg("fatal: %s; stopping the VM", buf);
	sync();
	/*
	 * A reset, not RB_POWER_OFF: QEMU runs with -no-reboot, so a reset ends it,
	 * while a kernel without a power-off method (microvm without ACPI) turns
	 * RB_POWER_OFF into a halt that would leave the VM hanging.  The reset path
	 * is the one panic=-1 relies on anyway.
	 */
	reboot(RB_AUTOBOOT);
	/* Not reached; if it were, init exiting panics the kernel: a reset too. */
	_exit(1);
}

static void try_mkdir(const char *path, mode_t mode)
{
	if (mkdir(path, mode) != 0 && errno != EEXIST)
		fatal("mkdir %s: %s", path, strerror(errno));
}

static void do_mount(const char *src, const char *dst, const char *type, unsigned long flags, const char *data)
{
	if (mount(src, dst, type, flags, data) != 0)
		fatal("mount %s on %s (%s): %s", src, dst, type ? type : "move", strerror(errno));
}

/* 0-2 must be open: pipes would otherwise land there and break dup2() in exec. */
static void setup_stdio(void)
{
	int fd = open("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);

	if (fd < 0)
		fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		fd = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return;
	for (int i = 0; i < 3; i++)
		dup2(fd, i);
	if (fd > 2)
		close(fd);
}

struct params {
	char root[256], fstype[32], rw[256], hostname[HOST_NAME_MAX + 1], net[64];
};

static void read_cmdline(struct params *pr)
{
	static const struct { const char *key; size_t off, size; } keys[] = {
		{ "tartarus.root=", offsetof(struct params, root), sizeof pr->root },
		{ "tartarus.rootfstype=", offsetof(struct params, fstype), sizeof pr->fstype },
		{ "tartarus.rw=", offsetof(struct params, rw), sizeof pr->rw },
		{ "tartarus.hostname=", offsetof(struct params, hostname), sizeof pr->hostname },
		{ "tartarus.net=", offsetof(struct params, net), sizeof pr->net },
	};
	char buf[4096];
	ssize_t n = -1;
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);

	strcpy(pr->root, "/dev/vda");
	strcpy(pr->fstype, "ext4");
	strcpy(pr->rw, "/dev/vdb");
	strcpy(pr->hostname, "sandbox");
	pr->net[0] = 0;
	if (fd >= 0) {
		n = read(fd, buf, sizeof buf - 1);
		close(fd);
	}
	if (n < 0)
		fatal("reading /proc/cmdline failed");
	buf[n] = 0;
	for (char *save = NULL, *tok = strtok_r(buf, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
		for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
			size_t kl = strlen(keys[i].key);
			if (strncmp(tok, keys[i].key, kl) != 0)
				continue;
			if (strlen(tok + kl) >= keys[i].size || !tok[kl])
				fatal("bad kernel parameter %s", tok);
			strcpy((char *)pr + keys[i].off, tok + kl);
		}
	}
}

/* Block devices normally exist before init runs; allow some slack anyway. */
static void wait_for_device(const char *dev)
{
	for (int i = 0; i < 500 && access(dev, F_OK) != 0; i++)
		sleep_ms(10);
}

static void loopback_up(void)
{
	struct ifreq ifr;
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (s < 0) {
		logmsg("socket: %s (loopback left down)", strerror(errno));
		return;
	}
	memset(&ifr, 0, sizeof ifr);
	strcpy(ifr.ifr_name, "lo");
	if (ioctl(s, SIOCGIFFLAGS, &ifr) != 0 || (ifr.ifr_flags |= IFF_UP, ioctl(s, SIOCSIFFLAGS, &ifr)) != 0)
		logmsg("bringing lo up: %s", strerror(errno));
	close(s);
}

/* tartarus.net=ADDR/PREFIX,GATEWAY: bring eth0 up with a static address and a default route. Only
 * template build VMs get a NIC (QEMU user networking); sandboxes' networking is the host's business. */
static void net_up(const char *spec)
{
	char addr[32], gw[32];
	unsigned prefix;
	struct ifreq ifr;
	struct rtentry rt;
	struct sockaddr_in *sin;
	int s;

	if (sscanf(spec, "%31[0-9.]/%u,%31[0-9.]", addr, &prefix, gw) != 3 || prefix > 32) {
		logmsg("bad tartarus.net=%s (want ADDR/PREFIX,GATEWAY)", spec);
		return;
	}
	s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		logmsg("socket: %s (eth0 left down)", strerror(errno));
		return;
	}
	memset(&ifr, 0, sizeof ifr);
	strcpy(ifr.ifr_name, "eth0");
	sin = (struct sockaddr_in *)&ifr.ifr_addr;
	sin->sin_family = AF_INET;
	if (inet_pton(AF_INET, addr, &sin->sin_addr) != 1 || ioctl(s, SIOCSIFADDR, &ifr) != 0)
		logmsg("eth0 address %s: %s", addr, strerror(errno));
	sin->sin_addr.s_addr = prefix ? htonl(~0u << (32 - prefix)) : 0;
	if (ioctl(s, SIOCSIFNETMASK, &ifr) != 0)
		logmsg("eth0 netmask /%u: %s", prefix, strerror(errno));
	if (ioctl(s, SIOCGIFFLAGS, &ifr) != 0 || (ifr.ifr_flags |= IFF_UP, ioctl(s, SIOCSIFFLAGS, &ifr)) != 0)
		logmsg("bringing eth0 up: %s", strerror(errno));
	memset(&rt, 0, sizeof rt);
	((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
	((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
	sin = (struct sockaddr_in *)&rt.rt_gateway;
	sin->sin_family = AF_INET;
	rt.rt_flags = RTF_UP | RTF_GATEWAY;
	if (inet_pton(AF_INET, gw, &sin->sin_addr) != 1 || ioctl(s, SIOCADDRT, &rt) != 0)
		logmsg("default route via %s: %s", gw, strerror(errno));
	close(s);
}

/* Mounts an API filesystem inside the new root, creating the mount point. */
static void mount_api(const char *src, const char *dst, const char *type, unsigned long flags, const char *data)
{
	try_mkdir(dst, 0755);
	do_mount(src, dst, type, flags, data);
}

static void bind_machine_id(void);

static void setup_root(void)
{
	struct params pr;

	try_mkdir("/dev", 0755);
	if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") != 0 && errno != EBUSY) {
		setup_stdio();
		fatal("mount devtmpfs on /dev: %s", strerror(errno));
	}
	setup_stdio();
	try_mkdir("/proc", 0555);
	try_mkdir("/sys", 0555);
	do_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	do_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	read_cmdline(&pr);

	try_mkdir("/mnt", 0755);
	try_mkdir("/mnt/base", 0755);
	try_mkdir("/mnt/rw", 0755);
	try_mkdir("/newroot", 0755);
	wait_for_device(pr.root);
	int building = strcmp(pr.rw, "none") == 0;
	if (building) {
		/* A template build: the root is a private copy of the base, changed in place by the build
		 * steps and kept afterwards as the template's new base image. */
		do_mount(pr.root, "/newroot", pr.fstype, MS_NOATIME, NULL);
	} else {
		wait_for_device(pr.rw);
		do_mount(pr.root, "/mnt/base", pr.fstype, MS_RDONLY, NULL);
		/* noinit_itable: the layer is a sparse file whose unwritten inode tables read as zeros;
		 * without it ext4lazyinit spends guest CPU after boot (and every restore) zeroing them. */
		do_mount(pr.rw, "/mnt/rw", "ext4", MS_NOATIME, "noinit_itable");
		rw_fd = open("/mnt/rw", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		snprintf(rw_dev, sizeof rw_dev, "%s", pr.rw);
		try_mkdir("/mnt/rw/upper", 0755);
		try_mkdir("/mnt/rw/work", 0755);
		do_mount("overlay", "/newroot", "overlay", 0,
			 "lowerdir=/mnt/base,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work");
	}

	/* The initramfs copies of /proc and /sys are not needed any more. */
	umount2("/proc", MNT_DETACH);
	umount2("/sys", MNT_DETACH);
	try_mkdir("/newroot/dev", 0755);
	do_mount("/dev", "/newroot/dev", NULL, MS_MOVE, NULL);

	/* switch_root: make /newroot the root of the mount tree and of this process. */
	if (chdir("/newroot") != 0)
		fatal("chdir /newroot: %s", strerror(errno));
	do_mount(".", "/", NULL, MS_MOVE, NULL);
	if (chroot(".") != 0 || chdir("/") != 0)
		fatal("chroot: %s", strerror(errno));

	mount_api("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_api("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_api("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620");
	mount_api("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mount_api("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");

	if (sethostname(pr.hostname, strlen(pr.hostname)) != 0)
		logmsg("sethostname %s: %s", pr.hostname, strerror(errno));
	loopback_up();
	if (pr.net[0])
		net_up(pr.net);
	if (!building)
		bind_machine_id(); /* a build must not leave the bind's placeholder file in the image */
}

/* Put /etc/machine-id on tmpfs (see machine_id_bound), keeping the image's id until CONFIGURE. */
static void bind_machine_id(void)
{
	char id[64] = "";
	ssize_t n = 0;
	int fd = open("/etc/machine-id", O_RDONLY | O_CLOEXEC | O_NOFOLLOW);

	if (fd >= 0) {
		n = read(fd, id, sizeof id - 1);
		close(fd);
	} else {
		fd = open("/etc/machine-id", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0444);
		if (fd < 0) {
			logmsg("cannot create /etc/machine-id: %s", strerror(errno));
			return;
		}
		close(fd);
	}
	fd = open(MACHINE_ID_RUN, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0444);
	if (fd < 0 || (n > 0 && write_all(fd, id, (size_t)n) != 0)) {
		logmsg("cannot write %s: %s", MACHINE_ID_RUN, strerror(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	close(fd);
	if (mount(MACHINE_ID_RUN, "/etc/machine-id", NULL, MS_BIND, NULL) != 0)
		logmsg("bind %s on /etc/machine-id: %s", MACHINE_ID_RUN, strerror(errno));
}

static pid_t spawn_agent(void)
{
	pid_t pid = fork();

	if (pid == 0) {
		/* serve() sets the signal mask it needs. */
		reconnectable = true;
		serve(open_port());
	}
	if (pid < 0)
		logmsg("fork: %s", strerror(errno));
	return pid;
}

void __attribute__((noreturn)) init_main(void)
{
	sigset_t all;
	int64_t deaths[21] = { 0 }; /* ring of recent death times */
	unsigned ndeaths = 0;

	/* The kernel only delivers signals to init that it handles; block them all anyway. */
	sigfillset(&all);
	sigprocmask(SIG_BLOCK, &all, NULL);
	setup_root();

	pid_t agent = spawn_agent();
	for (;;) {
		if (agent > 0) {
			int st;
			pid_t pid = wait(&st);
			if (pid < 0 && errno == EINTR)
				continue;
			if (pid > 0 && pid != agent)
				continue; /* an orphan, now reaped */
			if (pid < 0)
				logmsg("wait: %s", strerror(errno));
			else if (WIFSIGNALED(st))
				logmsg("agent killed by signal %d, restarting", WTERMSIG(st));
			else
				logmsg("agent exited with status %d, restarting", WEXITSTATUS(st));
		}
		/* More than 20 deaths in 10 s: something is badly wrong; stop the VM. */
		int64_t now = now_ms();
		deaths[ndeaths++ % 21] = now;
		if (ndeaths >= 21 && now - deaths[ndeaths % 21] < 10000)
			fatal("agent died more than 20 times in 10 s");
		sleep_ms(100);
		agent = spawn_agent();
	}
}
