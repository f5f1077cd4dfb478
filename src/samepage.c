/*
 * samepage.c - the command: run a program under samepage, show what it
 * saves, turn the knobs.
 */
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "sp.h"

/* Smallest mapping `run --all` makes mergeable. */
static const char *all_min_default = "1048576";
/* Seconds an auto-started daemon stays after its last client. */
static const char *idle_exit_default = "10";

static char sock_path[108];

static const char usage_text[] =
	"usage: samepage run [--all] [--set knob=value]... -- program "
	"[arg ...]\n"
	"       samepage status [--json | --prometheus]\n"
	"       samepage set knob=value ...\n"
	"       samepage unmerge\n"
	"       samepage estimate [--json] pid ...\n"
	"knobs: pages_to_scan, sleep_millisecs, run (0 stop, 1 run, 2 unmerge "
	"and stop), use_zero_pages\n"
	"See samepage(1).\n";

static void usage(void)
{
	fputs(usage_text, stderr);
	exit(2);
}

static int self_dir(char *buf, size_t len)
{
	ssize_t n = readlink("/proc/self/exe", buf, len - 1);
	char *slash;

	if (n <= 0)
		return -1;
	buf[n] = 0;
	slash = strrchr(buf, '/');
	if (!slash)
		return -1;
	*slash = 0;
	return 0;
}

static int start_daemon(void)
{
	char dir[PATH_MAX], exe[PATH_MAX + 16];
	const char *env = getenv("SAMEPAGED"), *idle;
	int status;
	pid_t pid;

	if (env)
		snprintf(exe, sizeof(exe), "%s", env);
	else if (self_dir(dir, sizeof(dir)) == 0)
		snprintf(exe, sizeof(exe), "%s/samepaged", dir);
	else
		return -ENOENT;
	idle = getenv("SAMEPAGE_IDLE_EXIT");
	pid = fork();
	if (pid < 0)
		return -errno;
	if (pid == 0) {
		execl(exe, "samepaged", "--autostart", "-s", sock_path, "-i",
		      idle ? idle : idle_exit_default, (char *)NULL);
		fprintf(stderr, "samepage: cannot run %s: %s\n", exe,
			strerror(errno));
		_exit(127);
	}
	if (waitpid(pid, &status, 0) < 0)
		return -errno;
	/* 0: started and detached; 3: another one won the race */
	if (WIFEXITED(status) &&
	    (WEXITSTATUS(status) == 0 || WEXITSTATUS(status) == 3))
		return 0;
	return -EIO;
}

static int connect_daemon(bool start)
{
	int fd = sp_connect(sock_path), r;

	if (fd >= 0 || !start)
		return fd;
	r = start_daemon();
	if (r < 0)
		return r;
	for (int i = 0; i < 100; i++) {
		fd = sp_connect(sock_path);
		if (fd >= 0)
			return fd;
		usleep(20000);
	}
	return fd;
}

/* Wait for SP_END; print SP_ERROR.  0 or -1. */
static int wait_end(int fd)
{
	static uint64_t buf[SP_MSG_MAX / 8];
	struct sp_msg m;
	ssize_t n = sp_recv(fd, buf, sizeof(buf), NULL);

	if (n <= 0 || sp_decode(buf, (size_t)n, &m) < 0) {
		fprintf(stderr, "samepage: no answer from the daemon\n");
		return -1;
	}
	if (m.type == SP_ERROR) {
		fprintf(stderr, "samepage: %s\n", m.u.error->msg);
		return -1;
	}
	return m.type == SP_END ? 0 : -1;
}

static int set_knob(int fd, const char *kv)
{
	struct sp_set s = { 0 };
	const char *eq = strchr(kv, '=');
	char *end;

	if (!eq || eq == kv || eq - kv >= (long)sizeof(s.name)) {
		fprintf(stderr, "samepage: expected knob=value, got '%s'\n", kv);
		return -1;
	}
	memcpy(s.name, kv, (size_t)(eq - kv));
	errno = 0;
	s.value = strtoll(eq + 1, &end, 10);
	if (!eq[1] || *end || errno) {
		fprintf(stderr, "samepage: %s: value must be a whole number "
			"(as for /sys/kernel/mm/ksm/%s)\n", kv, s.name);
		return -1;
	}
	if (sp_send(fd, SP_SET, &s, sizeof(s)) < 0)
		return -1;
	return wait_end(fd);
}

static void no_daemon(void)
{
	fprintf(stderr, "samepage: no daemon at %s (start one with "
		"'samepaged' or 'samepage run')\n", sock_path);
	exit(1);
}

static int cmd_set(int argc, char **argv)
{
	int fd, r = 0;

	if (argc < 2)
		usage();
	fd = connect_daemon(false);
	if (fd < 0)
		no_daemon();
	for (int i = 1; i < argc && !r; i++)
		r = set_knob(fd, argv[i]);
	close(fd);
	return r ? 1 : 0;
}

static void prepend_env(const char *name, const char *val)
{
	const char *old = getenv(name);
	char *v;

	if (old && *old) {
		if (asprintf(&v, "%s:%s", val, old) < 0)
			return;
		setenv(name, v, 1);
		free(v);
	} else {
		setenv(name, val, 1);
	}
}

/* The file execvp would run for prog, into buf; -1 if none. */
static int find_program(const char *prog, char *buf, size_t len)
{
	const char *path = getenv("PATH"), *p, *e;

	if (strchr(prog, '/'))
		return snprintf(buf, len, "%s", prog) < (int)len ? 0 : -1;
	for (p = path && *path ? path : "/bin:/usr/bin"; *p; p = e + !!*e) {
		e = strchrnul(p, ':');
		if (snprintf(buf, len, "%.*s/%s", (int)(e - p), e > p ? p : ".",
			     prog) < (int)len &&
		    access(buf, X_OK) == 0)
			return 0;
	}
	return -1;
}

/* Does the 64-bit ELF file fd ask for a dynamic loader (PT_INTERP)?
 * 1 yes, 0 no, -1 not a 64-bit ELF file (a script, say: not ours to
 * judge). */
static int elf_has_interp(int fd)
{
	Elf64_Ehdr eh;
	Elf64_Phdr ph;

	if (pread(fd, &eh, sizeof(eh), 0) != (ssize_t)sizeof(eh) ||
	    memcmp(eh.e_ident, ELFMAG, SELFMAG) ||
	    eh.e_ident[EI_CLASS] != ELFCLASS64 ||
	    eh.e_phentsize != sizeof(ph))
		return -1;
	for (unsigned i = 0; i < eh.e_phnum; i++) {
		if (pread(fd, &ph, sizeof(ph),
			  (off_t)(eh.e_phoff + i * sizeof(ph))) !=
		    (ssize_t)sizeof(ph))
			return -1;
		if (ph.p_type == PT_INTERP)
			return 1;
	}
	return 0;
}

/*
 * Will the dynamic loader preload the agent into prog?  Not into a
 * statically linked program (no loader at all), nor into a set-user-ID
 * or set-group-ID one that changes our identity (the loader ignores
 * LD_PRELOAD paths there).  Either runs, unmerged; say so once, rather
 * than leave the user wondering why nothing merges.
 */
static void warn_if_not_preloadable(const char *prog)
{
	char file[PATH_MAX];
	struct stat st;
	int fd;

	if (find_program(prog, file, sizeof(file)) < 0)
		return;		/* execvp will say */
	fd = open(file, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	if (fstat(fd, &st) == 0 &&
	    (((st.st_mode & S_ISUID) && st.st_uid != geteuid()) ||
	     ((st.st_mode & S_ISGID) && st.st_gid != getegid())))
		fprintf(stderr, "samepage: %s is set-user-ID or set-group-ID: "
			"the loader ignores the agent there; it runs "
			"unmerged\n", file);
	else if (elf_has_interp(fd) == 0)
		fprintf(stderr, "samepage: %s is statically linked: the agent "
			"cannot be loaded into it; it runs unmerged (link it "
			"dynamically to merge its memory)\n", file);
	close(fd);
}

static int cmd_run(int argc, char **argv)
{
	char dir[PATH_MAX], pre[PATH_MAX + 64];
	const char *env = getenv("SAMEPAGE_PRELOAD");
	bool all = false;
	int i, fd, nset = 0;
	char **sets = calloc((size_t)argc, sizeof(char *));

	for (i = 1; i < argc && strcmp(argv[i], "--"); i++) {
		if (!strcmp(argv[i], "--all"))
			all = true;
		else if (!strcmp(argv[i], "--set") && i + 1 < argc)
			sets[nset++] = argv[++i];
		else if (!strncmp(argv[i], "--set=", 6))
			sets[nset++] = argv[i] + 6;
		else
			break;
	}
	if (i < argc && !strcmp(argv[i], "--"))
		i++;
	if (i >= argc || argv[i][0] == '-' || !sets)
		usage();
	fd = connect_daemon(true);
	if (fd < 0) {
		fprintf(stderr, "samepage: cannot reach or start samepaged at "
			"%s (%s); running %s unmerged\n", sock_path,
			strerror(-fd), argv[i]);
	} else {
		for (int k = 0; k < nset; k++)
			if (set_knob(fd, sets[k]) < 0)
				return 2;
		close(fd);
	}
	free(sets);
	if (env)
		snprintf(pre, sizeof(pre), "%s", env);
	else if (self_dir(dir, sizeof(dir)) == 0)
		snprintf(pre, sizeof(pre), "%s/../lib/libsamepage_preload.so",
			 dir);
	if (fd >= 0 && realpath(pre, dir)) {
		warn_if_not_preloadable(argv[i]);
		prepend_env("LD_PRELOAD", dir);
		setenv("SAMEPAGE_SOCKET", sock_path, 1);
		/* the slot prctl(PR_SET_MEMORY_MERGE) writes (interpose.c:
		 * set_all_env), empty for off unless inherited */
		setenv("SAMEPAGE_ALL", all ? all_min_default : "", all);
	} else if (fd >= 0) {
		fprintf(stderr, "samepage: preload library %s not found; "
			"running %s unmerged\n", pre, argv[i]);
	}
	execvp(argv[i], &argv[i]);
	fprintf(stderr, "samepage: cannot run %s: %s\n", argv[i],
		strerror(errno));
	return errno == ENOENT ? 127 : 126;
}

struct status {
	struct sp_status s;
	struct sp_client_info *c;
	size_t nc;
};

static int get_status(int fd, struct status *st)
{
	static uint64_t buf[SP_MSG_MAX / 8];

	memset(st, 0, sizeof(*st));
	if (sp_send(fd, SP_STATUS_REQ, NULL, 0) < 0)
		return -1;
	for (;;) {
		struct sp_msg m;
		ssize_t n = sp_recv(fd, buf, sizeof(buf), NULL);

		if (n <= 0 || sp_decode(buf, (size_t)n, &m) < 0)
			return -1;
		if (m.type == SP_END)
			return 0;
		if (m.type == SP_STATUS) {
			st->s = *m.u.status;
		} else if (m.type == SP_CLIENT) {
			struct sp_client_info *v =
				realloc(st->c, (st->nc + 1) * sizeof(*v));
			if (!v)
				return -1;
			st->c = v;
			st->c[st->nc++] = *m.u.client;
		} else {
			return -1;
		}
	}
}

#define FIELDS(X)                                                        \
	X(pages_shared) X(pages_sharing) X(pages_unshared)               \
	X(pages_volatile) X(pages_scanned) X(full_scans)                 \
	X(ksm_zero_pages) X(pages_to_scan) X(sleep_millisecs) X(run)     \
	X(use_zero_pages) X(clients) X(mappings) X(map_budget)           \
	X(pinned_skipped) X(budget_refusals) X(pool_pages)               \
	X(metadata_bytes) X(daemon_pid)

static void print_table(const struct status *st)
{
	const struct sp_status *s = &st->s;
	uint64_t saved = (s->pages_sharing + s->ksm_zero_pages) * SP_PAGE;

#define ROW(f) printf("%-18s %llu\n", #f, (unsigned long long)s->f);
	FIELDS(ROW)
#undef ROW
	printf("%-18s %lld\n", "general_profit", (long long)s->general_profit);
	printf("%-18s %llu (%.1f MiB)\n", "bytes_saved",
	       (unsigned long long)saved, (double)saved / (1 << 20));
	if (s->safety_move == s->clients)
		printf("%-18s %s\n", "safety", "UFFDIO_MOVE (full)");
	else
		printf("%-18s write-protection, pinned pages not detected, "
		       "on %llu of %llu clients\n", "safety",
		       (unsigned long long)s->safety_wp,
		       (unsigned long long)s->clients);
	if (!st->nc)
		return;
	printf("\n%7s %-16s %10s %10s %10s %9s %12s\n", "PID", "COMMAND",
	       "MERGING", "ZERO", "REGISTERED", "MAPPINGS", "PROFIT");
	for (size_t i = 0; i < st->nc; i++) {
		const struct sp_client_info *c = &st->c[i];

		printf("%7d %-16s %10llu %10llu %10llu %9llu %12lld\n", c->pid,
		       c->comm, (unsigned long long)c->merging_pages,
		       (unsigned long long)c->zero_pages,
		       (unsigned long long)c->registered_pages,
		       (unsigned long long)c->mappings, (long long)c->profit);
	}
}

static void print_json(const struct status *st)
{
	const struct sp_status *s = &st->s;

	printf("{");
#define JS(f) printf("\"%s\": %llu, ", #f, (unsigned long long)s->f);
	FIELDS(JS)
#undef JS
	printf("\"general_profit\": %lld, \"processes\": [",
	       (long long)s->general_profit);
	for (size_t i = 0; i < st->nc; i++) {
		const struct sp_client_info *c = &st->c[i];

		printf("%s{\"pid\": %d, \"comm\": \"", i ? ", " : "", c->pid);
		for (const char *p = c->comm; *p; p++)
			printf(*p == '"' || *p == '\\' ? "\\%c"
			       : (unsigned char)*p < 32 ? "?"
							: "%c",
			       *p);
		printf("\", \"ksm_merging_pages\": %llu, \"ksm_zero_pages\": "
		       "%llu, \"registered_pages\": %llu, \"mappings\": %llu, "
		       "\"ksm_process_profit\": %lld, \"safety\": \"%s\"}",
		       (unsigned long long)c->merging_pages,
		       (unsigned long long)c->zero_pages,
		       (unsigned long long)c->registered_pages,
		       (unsigned long long)c->mappings, (long long)c->profit,
		       c->safety == SP_SAFETY_MOVE ? "move" : "write-protect");
	}
	printf("]}\n");
}

static void print_prometheus(const struct status *st)
{
	const struct sp_status *s = &st->s;

#define PR(f)                                                            \
	printf("# TYPE samepage_%s gauge\nsamepage_%s %llu\n", #f, #f,   \
	       (unsigned long long)s->f);
	FIELDS(PR)
#undef PR
	printf("# TYPE samepage_general_profit gauge\n"
	       "samepage_general_profit %lld\n", (long long)s->general_profit);
	printf("# TYPE samepage_process_merging_pages gauge\n");
	for (size_t i = 0; i < st->nc; i++)
		printf("samepage_process_merging_pages{pid=\"%d\"} %llu\n",
		       st->c[i].pid,
		       (unsigned long long)st->c[i].merging_pages);
}

static int cmd_status(int argc, char **argv)
{
	struct status st;
	int fd, fmt = 0;

	if (argc > 2)
		usage();
	if (argc == 2) {
		if (!strcmp(argv[1], "--json"))
			fmt = 1;
		else if (!strcmp(argv[1], "--prometheus"))
			fmt = 2;
		else
			usage();
	}
	fd = connect_daemon(false);
	if (fd < 0)
		no_daemon();
	if (get_status(fd, &st) < 0) {
		fprintf(stderr, "samepage: bad status reply from the daemon\n");
		return 1;
	}
	if (fmt == 1)
		print_json(&st);
	else if (fmt == 2)
		print_prometheus(&st);
	else
		print_table(&st);
	free(st.c);
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		usage();
	if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
		fputs(usage_text, stdout);
		return 0;
	}
	if (sp_default_socket(sock_path, sizeof(sock_path)) < 0) {
		fprintf(stderr, "samepage: socket path too long\n");
		return 2;
	}
	if (!strcmp(argv[1], "run"))
		return cmd_run(argc - 1, argv + 1);
	if (!strcmp(argv[1], "status"))
		return cmd_status(argc - 1, argv + 1);
	if (!strcmp(argv[1], "set"))
		return cmd_set(argc - 1, argv + 1);
	if (!strcmp(argv[1], "estimate"))
		return cmd_estimate(argc - 1, argv + 1);
	if (!strcmp(argv[1], "unmerge")) {
		char set[] = "set", run2[] = "run=2";
		char *a[] = { set, run2, NULL };

		return cmd_set(2, a);
	}
	usage();
	return 2;
}
