/* Entry point: PID 1 runs as init; otherwise --version, or serve a host on an inherited fd (tests). */
#include "agent.h"

int main(int argc, char **argv)
{
	if (getpid() == 1)
		init_main();
	if (argc == 2 && strcmp(argv[1], "--version") == 0) {
		printf("tartarus-agent %s (protocol %d)\n", AGENT_VERSION, PROTO_VERSION);
		return 0;
	}
	if (argc == 3 && strcmp(argv[1], "--serve-fd") == 0) {
		char *end;
		errno = 0;
		long fd = strtol(argv[2], &end, 10);
		if (errno || !*argv[2] || *end || fd < 0 || fd > INT_MAX || fcntl((int)fd, F_GETFD) < 0) {
			fprintf(stderr, "tartarus-agent: bad file descriptor %s\n", argv[2]);
			return 2;
		}
		/* Keep 0-2 occupied so command pipes never land there. */
		for (int i = 0; i < 3; i++)
			if (fcntl(i, F_GETFD) < 0 && open("/dev/null", O_RDWR) != i)
				return 2;
		fcntl((int)fd, F_SETFD, FD_CLOEXEC);
		fcntl((int)fd, F_SETFL, fcntl((int)fd, F_GETFL) & ~O_NONBLOCK);
		serve((int)fd);
	}
	fprintf(stderr, "usage: tartarus-agent --serve-fd N | --version\n"
			"(as PID 1 it runs as the sandbox init)\n");
	return 2;
}
