/*
 * samepaged.c - the samepage daemon: plays ksmd's part for the processes
 * that run the agent.  One thread: a poll loop over the control socket
 * and the clients, and a scan tick every sleep_millisecs.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "sp.h"

/* How long a run=2 waits for every agent before it gives up. */
static const uint64_t unmerge_timeout_ms = 30000;
/* Clients at most; one more is refused. */
#define MAX_CLIENTS 1024

static struct daemon D = {
	.pages_to_scan = 1000,	/* kernel: 100 */
	.sleep_millisecs = 20,	/* kernel: 20 */
	.run = 1,		/* kernel: 0, off until asked */
	.use_zero_pages = 1,	/* kernel: 0 */
	.unmerge_waiter = -1,
};

static volatile sig_atomic_t quit;
static int listen_fd = -1;
static char sock_path[108];
static long idle_exit_s = -1;	/* -1: never leave */
static uint64_t last_agent_ms;

struct knob {
	const char *name;
	uint64_t *val;
	uint64_t max;
};

static const struct knob knobs[] = {
	{ "pages_to_scan", &D.pages_to_scan, UINT32_MAX },
	{ "sleep_millisecs", &D.sleep_millisecs, UINT32_MAX },
	{ "run", &D.run, 2 },
	{ "use_zero_pages", &D.use_zero_pages, 1 },
};

static void usage(void)
{
	fprintf(stderr, "usage: samepaged [-dfv] [-i idle-seconds] "
			"[-o knob=value] [-s socket]\n");
	exit(2);
}

static int knob_set(const char *name, int64_t v, char *err, size_t len)
{
	for (size_t i = 0; i < SP_ARRAY_SIZE(knobs); i++) {
		if (strcmp(knobs[i].name, name))
			continue;
		if (v < 0 || (uint64_t)v > knobs[i].max) {
			snprintf(err, len, "invalid value %lld for %s "
				 "(0 to %llu)", (long long)v, name,
				 (unsigned long long)knobs[i].max);
			return -EINVAL;
		}
		*knobs[i].val = (uint64_t)v;
		log_info("%s = %lld", name, (long long)v);
		return 0;
	}
	snprintf(err, len, "unknown knob %s (pages_to_scan, sleep_millisecs, "
		 "run, use_zero_pages)", name);
	return -ENOENT;
}

static void send_error(int fd, int err, const char *msg)
{
	struct sp_error e = { .err = err };

	snprintf(e.msg, sizeof(e.msg), "%s", msg);
	sp_send(fd, SP_ERROR, &e, sizeof(e));
}

static uint64_t metadata_bytes(void)
{
	uint64_t b = pool_meta_bytes(&D.pool) +
		     D.ut.cap * sizeof(struct ut_entry);

	for (struct client *c = D.clients; c; c = c->next)
		b += c->registered * sizeof(struct pstate);
	return b;
}

static void fill_status(struct sp_status *s)
{
	memset(s, 0, sizeof(*s));
	s->pages_shared = D.pool.shared;
	s->pages_sharing = D.pool.total_refs - D.pool.shared;
	s->pages_unshared = D.ut.n;
	s->pages_volatile = D.pages_volatile;
	s->pages_scanned = D.pages_scanned;
	s->full_scans = D.full_scans;
	s->pages_to_scan = D.pages_to_scan;
	s->sleep_millisecs = D.sleep_millisecs;
	s->run = D.run;
	s->use_zero_pages = D.use_zero_pages;
	s->pool_pages = D.pool.used;
	s->metadata_bytes = metadata_bytes();
	s->daemon_pid = (uint64_t)getpid();
	for (struct client *c = D.clients; c; c = c->next) {
		if (!c->agent)
			continue;
		s->clients++;
		s->ksm_zero_pages += c->zero;
		s->mappings += c->maps_shown;
		s->map_budget = c->figs.map_budget;
		s->pinned_skipped += c->figs.pinned_skipped;
		s->budget_refusals += c->figs.budget_refusals;
		s->safety_move += c->safety == SP_SAFETY_MOVE;
		s->safety_wp += c->safety == SP_SAFETY_WP;
	}
	s->general_profit = (int64_t)((s->pages_sharing + s->ksm_zero_pages) *
				      SP_PAGE) -
			    (int64_t)s->metadata_bytes;
}

/*
 * The agents count their mappings by arithmetic between reads of their
 * maps, and overcount: neighbouring pool mappings merge in the kernel (a
 * Python program with 16,384 pages merged showed 16,081 where its maps
 * held five pool mappings).  Status shows the kernel's own count, the
 * lines of /proc/PID/maps, read again when the agent's figure has
 * changed and the agent has been quiet for a second (no batch done),
 * and every 30 s in any case (the program maps and unmaps too); in
 * between, the last count plus the agent's arithmetic since.  A read
 * costs about 0.4 us a mapping (13 ms for 32,000), and a monitor may
 * ask for status five times a second: read every 5 s while merging went
 * on, it took 0.22 s of the daemon's CPU in scattered (bench, 4 programs
 * of 48,000 mappings), 4% of samepage's.
 */
static void count_mappings(void)
{
	uint64_t now = sp_now_ms();

	for (struct client *c = D.clients; c; c = c->next) {
		uint64_t est = c->figs.mappings;
		long n;

		if (!c->agent)
			continue;
		if (((!c->maps_at_ms || est != c->maps_est) &&
		     now - c->done_ms >= 1000) ||
		    now - c->maps_at_ms >= 30000) {
			n = sp_count_maps(c->pid);
			if (n > 0) {
				c->maps_counted = (uint64_t)n;
				c->maps_est = est;
				c->maps_at_ms = now;
			}
		}
		/* (a figure below the last: the agent has counted itself) */
		c->maps_shown = c->maps_at_ms && est >= c->maps_est
					? c->maps_counted + (est - c->maps_est)
					: est;
	}
}

static void send_status(struct client *cli)
{
	struct sp_status s;

	count_mappings();
	fill_status(&s);
	sp_send(cli->fd, SP_STATUS, &s, sizeof(s));
	for (struct client *c = D.clients; c; c = c->next) {
		struct sp_client_info ci = { 0 };

		if (!c->agent)
			continue;
		ci.pid = c->pid;
		ci.safety = c->safety;
		memcpy(ci.comm, c->comm, sizeof(ci.comm));
		ci.merging_pages = c->merging;
		ci.zero_pages = c->zero;
		ci.registered_pages = c->registered;
		ci.mappings = c->maps_shown;
		ci.map_budget = c->figs.map_budget;
		ci.pinned_skipped = c->figs.pinned_skipped;
		ci.profit = (int64_t)((c->merging + c->zero) * SP_PAGE) -
			    (int64_t)(c->registered * sizeof(struct pstate));
		sp_send(cli->fd, SP_CLIENT, &ci, sizeof(ci));
	}
	sp_send(cli->fd, SP_END, NULL, 0);
}

static void release_all(struct client *c)
{
	for (size_t i = 0; i < c->nr; i++)
		for (uint64_t j = 0; j < c->r[i].npages; j++)
			client_release(c, &D.pool, &c->r[i].st[j]);
}

static void unmerge_check(bool timeout)
{
	struct client *c;

	if (D.unmerge_waiter < 0)
		return;
	for (c = D.clients; c && !timeout; c = c->next)
		if (c->unmerge_pending)
			return;
	for (c = D.clients; c; c = c->next) {
		if (!c->unmerge_pending)
			release_all(c);
		c->unmerge_pending = false;
	}
	D.run = 0;
	if (timeout)
		send_error(D.unmerge_waiter, ETIMEDOUT,
			   "unmerge: some programs did not answer in time");
	else
		sp_send(D.unmerge_waiter, SP_END, NULL, 0);
	log_info("unmerge %s; run = 0", timeout ? "timed out" : "complete");
	D.unmerge_waiter = -1;
}

static void unmerge_start(struct client *cli)
{
	if (D.unmerge_waiter >= 0) {
		send_error(cli->fd, EBUSY, "an unmerge is already running");
		return;
	}
	D.run = 2;
	D.unmerge_waiter = cli->fd;
	D.unmerge_deadline = sp_now_ms() + unmerge_timeout_ms;
	for (struct client *c = D.clients; c; c = c->next) {
		if (c->agent && sp_send(c->fd, SP_UNMERGE, NULL, 0) == 0)
			c->unmerge_pending = true;
	}
	log_info("run = 2: unmerging everything");
	unmerge_check(false);
}

static void handle_set(struct client *cli, const struct sp_set *s)
{
	char err[124];
	int r;

	if (!strcmp(s->name, "run") && s->value == 2) {
		unmerge_start(cli);
		return;
	}
	r = knob_set(s->name, s->value, err, sizeof(err));
	if (r < 0)
		send_error(cli->fd, -r, err);
	else
		sp_send(cli->fd, SP_END, NULL, 0);
}

static int ro_pool_fd(void)
{
	char path[64];

	snprintf(path, sizeof(path), "/proc/self/fd/%d", D.pool.fd);
	return open(path, O_RDONLY | O_CLOEXEC);
}

static int handle_hello(struct client *c, const struct sp_hello *h)
{
	struct sp_welcome w = { .pool_bytes = D.pool.bytes,
				.daemon_pid = getpid() };
	char path[64];
	int fd, r;

	(void)h->pid;	/* SO_PEERCRED is the truth */
	memcpy(c->comm, h->comm, sizeof(c->comm));
	c->comm[sizeof(c->comm) - 1] = 0;
	c->safety = h->safety;
	snprintf(path, sizeof(path), "/proc/%d/pagemap", (int)c->pid);
	c->pagemap = open(path, O_RDONLY | O_CLOEXEC);
	if (c->pagemap < 0) {
		log_warn("cannot read %s", path);
		send_error(c->fd, errno, "daemon cannot read this process");
		return -1;
	}
	/* for pages shared after fork: see sp_read_pages */
	snprintf(path, sizeof(path), "/proc/%d/mem", (int)c->pid);
	c->mem = open(path, O_RDONLY | O_CLOEXEC);
	fd = ro_pool_fd();
	if (fd < 0)
		return -1;
	r = sp_send_fd(c->fd, SP_WELCOME, &w, sizeof(w), fd);
	close(fd);
	if (r < 0)
		return -1;
	c->agent = true;
	log_info("pid %d (%s) joined%s", (int)c->pid, c->comm,
		 c->safety == SP_SAFETY_MOVE ? ""
		 : " merging by write-protection, without the pinned-page "
		   "check");
	return 0;
}

/* Returns -1 when the client must go. */
static int handle_msg(struct client *c, const struct sp_msg *m)
{
	switch (m->type) {
	case SP_HELLO:
		return c->agent ? -1 : handle_hello(c, m->u.hello);
	case SP_REG:
		if (c->agent && client_reg(&D, c, m->u.range->start,
					   m->u.range->len) < 0)
			log_warnx("pid %d: bad range", (int)c->pid);
		return 0;
	case SP_UNREG:
		if (c->agent)
			client_unreg(&D, c, m->u.range->start,
				     m->u.range->start + m->u.range->len);
		return 0;
	case SP_MERGE_DONE:
		c->done_ms = sp_now_ms();
		client_done(&D, c, m);
		return 0;
	case SP_UNMERGE_DONE:
		c->figs = *m->u.figs;
		c->unmerge_pending = false;
		unmerge_check(false);
		return 0;
	case SP_STATUS_REQ:
		send_status(c);
		return 0;
	case SP_SET:
		handle_set(c, m->u.set);
		return 0;
	default:
		return -1;
	}
}

static void client_free(struct client *c)
{
	struct client **p = &D.clients;

	while (*p != c)
		p = &(*p)->next;
	*p = c->next;
	client_drop_batches(&D, c);
	client_unreg(&D, c, 0, UINT64_MAX);
	if (c->agent)
		log_info("pid %d (%s) left", (int)c->pid, c->comm);
	if (D.unmerge_waiter == c->fd)
		D.unmerge_waiter = -1;
	close(c->fd);
	if (c->pagemap >= 0)
		close(c->pagemap);
	if (c->mem >= 0)
		close(c->mem);
	free(c->r);
	free(c);
	unmerge_check(false);
}

static void client_read(struct client *c)
{
	static uint64_t buf[SP_MSG_MAX / 8];
	struct sp_msg m;
	ssize_t n = sp_recv(c->fd, buf, sizeof(buf), NULL);
	int r;

	if (n <= 0) {
		client_free(c);
		return;
	}
	r = sp_decode(buf, (size_t)n, &m);
	if (r < 0) {
		log_warnx("pid %d: bad message (%s)", (int)c->pid,
			  r == -EPROTO ? "protocol version" : "malformed");
		send_error(c->fd, -r, "bad message");
		client_free(c);
		return;
	}
	if (handle_msg(c, &m) < 0)
		client_free(c);
}

static void accept_client(void)
{
	struct ucred cr;
	socklen_t len = sizeof(cr);
	struct timeval tv = { 1, 0 };
	struct client *c;
	int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC), n = 0;

	if (fd < 0)
		return;
	for (c = D.clients; c; c = c->next)
		n++;
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) < 0 ||
	    (cr.uid != 0 && cr.uid != geteuid()) || n >= MAX_CLIENTS) {
		send_error(fd, EPERM, "not allowed: other user, or too many");
		close(fd);
		return;
	}
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		return;
	}
	c->fd = fd;
	c->pid = cr.pid;
	c->uid = cr.uid;
	c->id = ++D.next_id;
	c->pagemap = -1;
	c->mem = -1;
	c->next = D.clients;
	D.clients = c;
}

static int autostart;		/* --autostart: started by samepage(1) */

static int open_socket(void)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char lock[128];
	int fd;

	if (sp_mkdir_parent(sock_path) < 0) {
		log_warn("cannot create the directory of %s", sock_path);
		return -1;
	}
	snprintf(lock, sizeof(lock), "%s.lock", sock_path);
	fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0 || flock(fd, LOCK_EX | LOCK_NB) < 0) {
		/* started by samepage(1) for a program, and another program's
		 * start won: that daemon serves both, nothing to say */
		if (!autostart)
			log_warnx("another samepaged is running on %s",
				  sock_path);
		return -2;
	}
	/* fd stays open, and locked, for the daemon's life */
	unlink(sock_path);	/* stale: we hold the lock */
	strcpy(sa.sun_path, sock_path);
	listen_fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (listen_fd < 0 ||
	    bind(listen_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    chmod(sock_path, 0660) < 0 || listen(listen_fd, 64) < 0) {
		log_warn("cannot listen on %s", sock_path);
		return -1;
	}
	return 0;
}

static void on_signal(int sig)
{
	(void)sig;
	quit = 1;
}

/* The last scan tick found every agent busy: wait for an answer. */
static bool stalled;
/* Longest wait for an answer before scanning again anyway. */
static const int stalled_wait_ms = 50;

static int poll_once(void)
{
	static struct pollfd pfd[MAX_CLIENTS + 1];
	static struct client *who[MAX_CLIENTS + 1];
	int n = 1, timeout = 1000, agents = 0;
	bool scanning = D.run == 1;

	pfd[0] = (struct pollfd){ listen_fd, POLLIN, 0 };
	for (struct client *c = D.clients; c; c = c->next) {
		pfd[n] = (struct pollfd){ c->fd, POLLIN, 0 };
		who[n++] = c;
		agents += c->agent;
	}
	if (agents)
		last_agent_ms = sp_now_ms();
	if (scanning && agents)
		timeout = (int)D.sleep_millisecs;
	if (scanning && agents && stalled && timeout < stalled_wait_ms)
		timeout = stalled_wait_ms;	/* a MERGE_DONE wakes us */
	if (poll(pfd, (nfds_t)n, timeout) < 0)
		return errno == EINTR ? 0 : -1;
	if (pfd[0].revents)
		accept_client();
	for (int i = 1; i < n; i++) {
		if (!pfd[i].revents)
			continue;
		/* a client freed earlier in this loop is never revisited:
		 * client_read frees only the client it is given */
		client_read(who[i]);
	}
	return agents;
}

static void main_loop(void)
{
	uint64_t next_scan = 0;

	while (!quit) {
		int agents = poll_once();
		uint64_t now = sp_now_ms();

		if (agents < 0) {
			log_warn("poll");
			break;
		}
		if (D.run == 1 && now >= next_scan) {
			stalled = scan_tick(&D);
			next_scan = now + D.sleep_millisecs;
		}
		if (D.unmerge_waiter >= 0 && now > D.unmerge_deadline)
			unmerge_check(true);
		if (idle_exit_s >= 0 && !agents &&
		    now - last_agent_ms >= (uint64_t)idle_exit_s * 1000) {
			log_info("no clients for %lds: leaving", idle_exit_s);
			break;
		}
	}
}

static void apply_option(const char *kv)
{
	const char *eq = strchr(kv, '=');
	char name[32], err[124], *end;
	long long v;

	if (!eq || eq - kv >= (long)sizeof(name))
		usage();
	memcpy(name, kv, (size_t)(eq - kv));
	name[eq - kv] = 0;
	v = strtoll(eq + 1, &end, 10);
	if (!eq[1] || *end || (!strcmp(name, "run") && v == 2) ||
	    knob_set(name, v, err, sizeof(err)) < 0) {
		fprintf(stderr, "samepaged: %s\n",
			*end || !eq[1] ? "value must be a number" : err);
		exit(2);
	}
}

static void daemonize(void)
{
	pid_t pid = fork();
	int fd;

	if (pid < 0) {
		log_warn("fork");
		exit(1);
	}
	if (pid > 0)
		_exit(0);
	setsid();
	if (chdir("/") < 0)
		exit(1);
	fd = open("/dev/null", O_RDWR);
	if (fd >= 0) {
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
	}
}

int main(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "autostart", no_argument, NULL, 'A' },
		{ "foreground", no_argument, NULL, 'f' },
		{ "help", no_argument, NULL, 'h' },
		{ "idle-exit", required_argument, NULL, 'i' },
		{ "set", required_argument, NULL, 'o' },
		{ "socket", required_argument, NULL, 's' },
		{ "verbose", no_argument, NULL, 'v' },
		{ NULL, 0, NULL, 0 },
	};
	int ch, foreground = 0, verbose = 0, r;
	uint64_t pool_bytes;

	while ((ch = getopt_long(argc, argv, "dfhi:o:s:v", lo, NULL)) != -1) {
		switch (ch) {
		case 'A': autostart = 1; break;
		case 'd': case 'f': foreground = 1; break;
		case 'i': idle_exit_s = atol(optarg); break;
		case 'o': apply_option(optarg); break;
		case 's': snprintf(sock_path, sizeof(sock_path), "%s", optarg);
			break;
		case 'v': verbose = 1; break;
		case 'h':
			printf("usage: samepaged [-dfv] [-i idle-seconds] "
			       "[-o knob=value] [-s socket]\n"
			       "knobs: pages_to_scan, sleep_millisecs, run, "
			       "use_zero_pages\nSee samepaged(8).\n");
			return 0;
		default: usage();
		}
	}
	if (optind != argc)
		usage();
	log_init(LOG_TO_STDERR, verbose, "samepaged");
	if (!sock_path[0] && sp_default_socket(sock_path, sizeof(sock_path)))
		usage();
	r = open_socket();
	if (r < 0)
		return r == -2 ? 3 : 1;
	pool_bytes = (uint64_t)sysconf(_SC_PHYS_PAGES) * SP_PAGE;
	if (scan_init(&D, pool_bytes) < 0) {
		log_warn("cannot set up the pool");
		return 1;
	}
	signal(SIGPIPE, SIG_IGN);
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	if (!foreground) {
		daemonize();
		log_init(LOG_TO_SYSLOG, verbose, "samepaged");
	}
	log_info("listening on %s (pid %d)", sock_path, (int)getpid());
	last_agent_ms = sp_now_ms();
	main_loop();
	unlink(sock_path);
	return 0;
}
