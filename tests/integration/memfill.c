/*
 * memfill.c - a program for integration tests to run under samepage.
 * It reads one command per line on stdin and answers one line on stdout
 * ("ok ..." or "err ...").  It knows nothing of samepage: it opts in with
 * madvise/prctl as any program would.
 *
 *   map N                 mmap N private anonymous pages (the region)
 *   mapshared N           the same, MAP_SHARED (KSM ignores these)
 *   maphuge N             the same, aligned to 2 MiB and given
 *                         MADV_HUGEPAGE, so that the kernel backs it
 *                         with transparent huge pages when it can
 *   mapmalloc N           the region from posix_memalign (malloc's mmap)
 *   freemalloc            free(3) it (glibc unmaps it itself)
 *   merge | unmerge       madvise(MADV_MERGEABLE / MADV_UNMERGEABLE)
 *   stackused ADVICE      madvise(ADVICE, a number) over the region on a
 *                         thread with a 64 KiB stack of this program's;
 *                         "ok BYTES": how much of that stack it used
 *   prctl V | getprctl    PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE
 *   dup2high LO HI        dup2 /dev/null onto every descriptor from LO to HI,
 *                         as a program placing its files at fixed numbers
 *   sigblock              block SIGUSR1 in this (the only) thread, send it
 *                         to the process and wait 200 ms: "ok" if it is
 *                         still pending, "err handled on thread TID" if
 *                         a handler ran on some other thread
 *   closefds              close_range(3, ~0U, 0), as a daemon that closes
 *                         every inherited descriptor does, then open
 *                         /dev/null and socket pairs into the freed
 *                         numbers and write to the sockets
 *   exec                  execve this program again, in the same process;
 *                         the new image answers "ok" (the region is gone)
 *   fill SEED FIRST N     page p gets pattern(SEED, p); SEED 0: zeros
 *   fillone SEED FIRST N  every page gets pattern(SEED, 0): one content
 *                         repeated, as memory a program filled with a
 *                         pattern; checkone verifies it
 *   check SEED FIRST N    verify; "ok" or "err bad PAGE"
 *   write P BYTE          one byte at the start of page P
 *   dontneed FIRST N      madvise(MADV_DONTNEED)
 *   dontdump FIRST N      madvise(MADV_DONTDUMP): splits the VMA
 *   mprotect FIRST N PROT mprotect(2), PROT as a number (1: read-only)
 *   hugepage FIRST N      madvise(MADV_HUGEPAGE), a flag samepage does
 *                         not track
 *   guard                 map a page right after the region, so that
 *                         growing it in place is impossible
 *   munmap FIRST N        unmap part of the region
 *   rawunmap FIRST N      the same with syscall(2), bypassing libc
 *   rawremap FIRST N      raw munmap, then a fresh anonymous mapping in
 *                         its place by raw mmap (free(3) and malloc(3)
 *                         do that, bypassing the interposers); "err
 *                         ERRNO" and what is in the way if that fails
 *   holewatch FIRST N MS  raw munmap, then watch the hole for MS ms:
 *                         nothing may be mapped into it but by this
 *                         program (the agent's own short-lived mappings
 *                         must stay out); then the hole is mapped again
 *                         (zeros).  "ok", or "err taken" and the
 *                         mapping seen there
 *   mremap N              move/resize the region; answers the address
 *   hammer T SECONDS [keep [PAUSE_US]]
 *                         T threads write, read back and restore words
 *                         in random pages; "ok WRITES LOST".  With keep,
 *                         a thread's word in a page keeps the last value
 *                         it wrote until the end, when each is checked
 *                         and then restored: a write lost any time
 *                         after it was read back counts too.  PAUSE_US
 *                         between writes leaves most pages unwritten
 *   rowrite T SECONDS FIRST N [PAUSE_US]
 *                         T threads try to write random pages of
 *                         [FIRST, FIRST + N), which should be read-only,
 *                         pausing up to PAUSE_US between tries; each try
 *                         must fault.  "ok TRIES WROTE"
 *   mkfile FILE           write FILE as big as the region, page p
 *                         holding pattern(7, p), and sync it
 *   direct T SECONDS FILE T threads O_DIRECT-read random pages of FILE
 *                         (thread i: pages i, i + T, ...) into the
 *                         same pages of the region (the device
 *                         writes them, pinned), check each and restore
 *                         it (pattern 1); "ok READS BAD"
 *   pin FIRST N           register pages as io_uring fixed buffers
 *   unpin                 unregister them (the pins are dropped)
 *   uread FILE FIRST      IORING_OP_READ_FIXED from FILE into page FIRST
 *                         of the pinned range, at the address it was
 *                         registered with (mremap does not change it)
 *   fork                  fork; the child answers "child PID" and keeps
 *                         serving on the same stdin/stdout is NOT done:
 *                         the child checks SEED 1 after 1.5 s, twice,
 *                         and exits 0 if intact (see tests)
 *   forkmap N [SEED]      fork; the child maps N fresh pages, fills
 *                         them with SEED (1 unless given; N 0: keeps
 *                         the region) and answers through the parent
 *                         "ok PID ADDR GETPRCTL"; it waits for "wait",
 *                         then checks its region for SEED and exits 0
 *                         if intact
 *   wait                  wait for the forked child: "ok STATUS"
 *   cmpfile FILE P        page P equals the first page of FILE
 *   mmapmany N            N more small mappings of the program's own
 *   heap N                N written pages of the program's own, not
 *                         opted in, from sbrk (as malloc's main arena)
 *   heapwrite             write one byte in each; "ok MICROSECONDS"
 *   mlockall FLAGS        mlockall(2), FLAGS as a number (3: MCL_CURRENT
 *                         | MCL_FUTURE); munlockall: munlockall(2)
 *   unshare [N]           unshare(CLONE_NEWUSER), which the kernel
 *                         allows only to a single-threaded process: in
 *                         N - 1 children, one after the other, then here
 *   mmaplat SECONDS       mmap and munmap one page in a loop (through
 *                         libc, so the interposers): "ok CALLS P50_US
 *                         P99_US MAX_US" of the pairs
 *   stats                 the agent's figures, if an agent is loaded
 *   addr                  the region's address
 *   quit
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <pthread.h>
#include <setjmp.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "samepage.h"

#define PG 4096UL
#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
#endif

static uint8_t *region;
static size_t npages;
static struct io_uring ring;
static int ring_up;
static size_t pin_first;	/* buffer i is page pin_first + i */
static uint8_t *pin_base;	/* the region when it was pinned */

static void pattern(uint8_t *p, unsigned seed, size_t page)
{
	uint64_t *w = (uint64_t *)p;
	uint64_t x = seed * 0x9E3779B97F4A7C15ULL + page * 0xBF58476D1CE4E5B9ULL;

	if (!seed) {
		memset(p, 0, PG);
		return;
	}
	for (size_t i = 0; i < PG / 8; i++) {
		x ^= x >> 31;
		x *= 0x94D049BB133111EBULL;
		w[i] = x + i;
	}
}

/* one: every page as page 0 */
static void fill_as(unsigned seed, size_t first, size_t n, bool one)
{
	for (size_t p = first; p < first + n; p++)
		pattern(region + p * PG, seed, one ? 0 : p);
}

static void fill(unsigned seed, size_t first, size_t n)
{
	fill_as(seed, first, n, false);
}

static long check_as(unsigned seed, size_t first, size_t n, bool one)
{
	uint8_t want[PG];

	for (size_t p = first; p < first + n; p++) {
		pattern(want, seed, one ? 0 : p);
		if (memcmp(want, region + p * PG, PG))
			return (long)p;
	}
	return -1;
}

static long check(unsigned seed, size_t first, size_t n)
{
	return check_as(seed, first, n, false);
}

struct hammer {
	pthread_t t;
	unsigned id;
	double until;
	uint64_t writes, lost;
	uint64_t *last, *orig;	/* keep: per page, 0 = not written */
	unsigned pause_us;
};

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Thread id owns words id, id + T, ...: no two threads share a word. */
static atomic_uint nthreads;

/* keep: thread id's word in page p is word id; stamps are never 0 */
static void hammer_keep(struct hammer *h, size_t p)
{
	volatile uint64_t *w = (volatile uint64_t *)(region + p * PG) + h->id;
	uint64_t v = ((uint64_t)(h->id + 1) << 48) + ++h->writes;

	if (!h->last[p])
		h->orig[p] = *w;
	*w = v;
	if (*w != v)
		h->lost++;
	h->last[p] = v;
}

static void hammer_settle(struct hammer *h)
{
	for (size_t p = 0; p < npages; p++) {
		volatile uint64_t *w =
			(volatile uint64_t *)(region + p * PG) + h->id;

		if (!h->last[p])
			continue;
		if (*w != h->last[p])
			h->lost++;
		*w = h->orig[p];
	}
	free(h->last);
	free(h->orig);
}

static void *hammer_main(void *arg)
{
	struct hammer *h = arg;
	uint64_t x = h->id * 7919 + 1, stamp = (uint64_t)h->id << 48;
	unsigned T = atomic_load(&nthreads);

	while (now() < h->until) {
		for (int k = 0; k < 1000; k++) {
			volatile uint64_t *w;
			uint64_t old, v = ++stamp;
			size_t p, word;

			x = x * 6364136223846793005ULL + 1442695040888963407ULL;
			p = (x >> 33) % npages;
			word = h->id + T * ((x >> 20) % (PG / 8 / T));
			if (h->last) {
				hammer_keep(h, p);
				if (h->pause_us)
					usleep(h->pause_us);
				continue;
			}
			w = (volatile uint64_t *)(region + p * PG) + word;
			old = *w;
			*w = v;
			if (*w != v)
				h->lost++;
			*w = old;
			if (*w != old)
				h->lost++;
			h->writes += 2;
		}
	}
	return NULL;
}

static void cmd_hammer(unsigned t, double secs, bool keep,
		       unsigned pause_us)
{
	struct hammer h[16];
	uint64_t writes = 0, lost = 0;

	if (t > 16)
		t = 16;
	atomic_store(&nthreads, t);
	for (unsigned i = 0; i < t; i++) {
		h[i] = (struct hammer){ .id = i, .until = now() + secs,
					.pause_us = pause_us };
		if (keep) {
			h[i].last = calloc(npages, sizeof(uint64_t));
			h[i].orig = calloc(npages, sizeof(uint64_t));
			if (!h[i].last || !h[i].orig) {
				printf("err nomem\n");
				exit(1);
			}
		}
		pthread_create(&h[i].t, NULL, hammer_main, &h[i]);
	}
	for (unsigned i = 0; i < t; i++) {
		pthread_join(h[i].t, NULL);
		if (keep)
			hammer_settle(&h[i]);
		writes += h[i].writes;
		lost += h[i].lost;
	}
	printf("ok %llu %llu\n", (unsigned long long)writes,
	       (unsigned long long)lost);
}

/* A forked child (under samepage again, its agent's thread running)
 * calls unshare(CLONE_NEWUSER): 0 or its errno. */
static int unshare_in_child(void)
{
	int st;
	pid_t pid = fork();

	if (pid == 0)
		_exit(unshare(CLONE_NEWUSER) == 0 ? 0 : errno);
	if (pid < 0 || waitpid(pid, &st, 0) != pid)
		return errno ? errno : ECHILD;
	return WIFEXITED(st) ? WEXITSTATUS(st) : EINTR;
}

static _Thread_local sigjmp_buf rowrite_jb;

static void rowrite_segv(int sig)
{
	(void)sig;
	siglongjmp(rowrite_jb, 1);
}

struct rowrite {
	pthread_t t;
	unsigned id;
	double until;
	size_t first, n;
	unsigned pause_us;
	uint64_t tries, wrote, seed;
};

static void *rowrite_main(void *arg)
{
	struct rowrite *r = arg;
	uint64_t *x = &r->seed;	/* not a local: siglongjmp comes back */

	*x = r->id * 104729 + 7;
	while (now() < r->until) {
		uint8_t *b;

		*x = *x * 6364136223846793005ULL + 1442695040888963407ULL;
		b = region + (r->first + (*x >> 33) % r->n) * PG +
		    (*x >> 20) % PG;
		r->tries++;
		if (r->pause_us)
			usleep((unsigned)(*x >> 40) % r->pause_us);
		if (sigsetjmp(rowrite_jb, 1) == 0) {
			/* must fault; atomic, or TSan takes the store it
			 * records before the fault for a race */
			__atomic_store_n(b, (uint8_t)~__atomic_load_n(
						    b, __ATOMIC_RELAXED),
					 __ATOMIC_RELAXED);
			r->wrote++;
		}
	}
	return NULL;
}

static void cmd_rowrite(unsigned t, double secs, size_t first, size_t n,
			unsigned pause_us)
{
	struct rowrite r[16];
	struct sigaction sa = { .sa_handler = rowrite_segv }, old;
	uint64_t tries = 0, wrote = 0;

	if (t > 16)
		t = 16;
	sigaction(SIGSEGV, &sa, &old);
	for (unsigned i = 0; i < t; i++) {
		r[i] = (struct rowrite){ .id = i, .until = now() + secs,
					 .first = first, .n = n,
					 .pause_us = pause_us };
		pthread_create(&r[i].t, NULL, rowrite_main, &r[i]);
	}
	for (unsigned i = 0; i < t; i++) {
		pthread_join(r[i].t, NULL);
		tries += r[i].tries;
		wrote += r[i].wrote;
	}
	sigaction(SIGSEGV, &old, NULL);
	printf("ok %llu %llu\n", (unsigned long long)tries,
	       (unsigned long long)wrote);
}

struct direct {
	pthread_t t;
	unsigned id, nt;
	int fd;
	double until;
	uint64_t reads, bad;
};

static void *direct_main(void *arg)
{
	struct direct *d = arg;
	uint64_t x = d->id * 104729 + 7;
	uint8_t want[PG];

	while (now() < d->until) {
		size_t p;
		uint8_t *pg;

		/* thread id takes pages id, id + T, ...: none shares a page */
		x = x * 6364136223846793005ULL + 1442695040888963407ULL;
		p = (x >> 33) % (npages / d->nt) * d->nt + d->id;
		pg = region + p * PG;
		pattern(want, 7, p);
		if (pread(d->fd, pg, PG, (off_t)(p * PG)) != (ssize_t)PG ||
		    memcmp(pg, want, PG) != 0)
			d->bad++;
		pattern(pg, 1, p);
		d->reads++;
	}
	return NULL;
}

static void cmd_mkfile(const char *file)
{
	uint8_t buf[PG];
	int fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	size_t p;

	if (fd < 0) {
		printf("err open %s\n", strerror(errno));
		return;
	}
	for (p = 0; p < npages; p++) {
		pattern(buf, 7, p);
		if (write(fd, buf, PG) != (ssize_t)PG)
			break;
	}
	printf(p == npages && fsync(fd) == 0 ? "ok\n" : "err write\n");
	close(fd);
}

static void cmd_direct(unsigned t, double secs, const char *file)
{
	struct direct d[16];
	uint64_t reads = 0, bad = 0;
	int fd = open(file, O_RDONLY | O_DIRECT);

	if (fd < 0) {
		printf("err odirect %s\n", strerror(errno));
		return;
	}
	if (t > 16)
		t = 16;
	for (unsigned i = 0; i < t; i++) {
		d[i] = (struct direct){ .id = i, .nt = t, .fd = fd,
					.until = now() + secs };
		pthread_create(&d[i].t, NULL, direct_main, &d[i]);
	}
	for (unsigned i = 0; i < t; i++) {
		pthread_join(d[i].t, NULL);
		reads += d[i].reads;
		bad += d[i].bad;
	}
	close(fd);
	printf("ok %llu %llu\n", (unsigned long long)reads,
	       (unsigned long long)bad);
}

static void cmd_pin(size_t first, size_t n)
{
	struct iovec *iov = calloc(n, sizeof(*iov));

	for (size_t i = 0; i < n; i++) {
		iov[i].iov_base = region + (first + i) * PG;
		iov[i].iov_len = PG;
	}
	if (!ring_up && io_uring_queue_init(8, &ring, 0) < 0) {
		printf("err uring\n");
		return;
	}
	ring_up = 1;
	pin_first = first;
	pin_base = region;
	int r = io_uring_register_buffers(&ring, iov, (unsigned)n);
	free(iov);
	if (r < 0)
		printf("err register %d\n", r);
	else
		printf("ok\n");
}

static void cmd_unpin(void)
{
	int r = ring_up ? io_uring_unregister_buffers(&ring) : -EBADF;

	if (r < 0)
		printf("err unregister %d\n", r);
	else
		printf("ok\n");
}

static void cmd_uread(const char *file, size_t page)
{
	struct io_uring_sqe *sqe;
	struct io_uring_cqe *cqe;
	int fd = open(file, O_RDONLY), r;

	if (fd < 0 || !ring_up) {
		printf("err open\n");
		return;
	}
	sqe = io_uring_get_sqe(&ring);
	io_uring_prep_read_fixed(sqe, fd, pin_base + page * PG, PG, 0,
				 (int)(page - pin_first));
	io_uring_submit(&ring);
	r = io_uring_wait_cqe(&ring, &cqe);
	if (r == 0) {
		r = cqe->res;
		io_uring_cqe_seen(&ring, cqe);
	}
	close(fd);
	printf(r == (int)PG ? "ok\n" : "err read %d\n", r);
}

static pid_t child;
static int child_go = -1;	/* forkmap: write end of the child's go pipe */

static void cmd_forkmap(size_t n, unsigned seed)
{
	int up[2], go[2];
	pid_t pid;

	if (pipe(up) || pipe(go)) {
		printf("err pipe\n");
		return;
	}
	pid = fork();
	if (pid == 0) {
		char msg[128], c;
		int len;

		close(up[0]);
		close(go[1]);
		if (n) {
			region = mmap(NULL, n * PG, PROT_READ | PROT_WRITE,
				      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (region == MAP_FAILED)
				_exit(2);
			npages = n;
			fill(seed, 0, n);
		}
		len = snprintf(msg, sizeof(msg), "%d %p %d", (int)getpid(),
			       (void *)region,
			       prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0));
		if (write(up[1], msg, (size_t)len) != len)
			_exit(2);
		close(up[1]);
		if (read(go[0], &c, 1) < 0)
			_exit(2);
		_exit(check(seed, 0, npages) < 0 ? 0 : 1);
	}
	close(up[1]);
	close(go[0]);
	if (pid < 0) {
		close(up[0]);
		close(go[1]);
		printf("err fork\n");
		return;
	}
	char msg[128] = "";
	ssize_t r = read(up[0], msg, sizeof(msg) - 1);

	close(up[0]);
	child = pid;
	child_go = go[1];
	if (r > 0)
		printf("ok %s\n", msg);
	else
		printf("err child\n");
}

static void cmd_fork(void)
{
	pid_t pid = fork();

	if (pid == 0) {
		long bad;

		sleep(2);
		bad = check(1, 0, npages);
		if (bad < 0) {
			sleep(2);
			bad = check(1, 0, npages);
		}
		_exit(bad < 0 ? 0 : 1);
	}
	child = pid;
	printf("ok %d\n", (int)pid);
}

static void cmd_wait(void)
{
	int st = -1;

	if (child_go >= 0) {
		close(child_go);	/* EOF: the forkmap child checks, exits */
		child_go = -1;
	}
	if (child <= 0 || waitpid(child, &st, 0) < 0)
		printf("err wait\n");
	else
		printf("ok %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : 128);
}

static void cmd_cmpfile(const char *file, size_t page)
{
	uint8_t buf[PG];
	int fd = open(file, O_RDONLY);

	if (fd < 0 || read(fd, buf, PG) != (ssize_t)PG)
		printf("err open\n");
	else
		printf(memcmp(buf, region + page * PG, PG) ? "err differ\n"
							     : "ok\n");
	if (fd >= 0)
		close(fd);
}

static void cmd_mmapmany(unsigned long n)
{
	for (unsigned long i = 0; i < n; i++) {
		/* alternate protections so the kernel cannot join them */
		void *p = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED || mprotect(p, PG, PROT_READ) < 0) {
			printf("err mmap %lu\n", i);
			return;
		}
	}
	printf("ok\n");
}

static uint8_t *heap;
static size_t heap_pages;

static void cmd_heap(size_t n)
{
	/* the break, as malloc's main arena grows: no mmap an agent sees */
	heap = sbrk((intptr_t)(n * PG));
	if (heap == (void *)-1) {
		heap = NULL;
		printf("err sbrk\n");
		return;
	}
	heap_pages = n;
	memset(heap, 7, n * PG);
	printf("ok\n");
}

static void cmd_heapwrite(void)
{
	double t0 = now();

	for (size_t i = 0; i < heap_pages; i++)
		((volatile uint8_t *)heap)[i * PG]++;
	printf("ok %.0f\n", (now() - t0) * 1e6);
}

static int cmp_dbl(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static void cmd_mmaplat(double seconds)
{
	size_t cap = 1 << 20, n = 0;
	double *lat = malloc(cap * sizeof(*lat)), until = now() + seconds;

	while (lat && n < cap && now() < until) {
		double t0 = now();
		void *p = mmap(NULL, PG, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (p == MAP_FAILED || munmap(p, PG) < 0)
			break;
		lat[n++] = (now() - t0) * 1e6;
	}
	if (!lat || !n) {
		printf("err mmap\n");
		free(lat);
		return;
	}
	qsort(lat, n, sizeof(*lat), cmp_dbl);
	printf("ok %zu %.0f %.0f %.0f\n", n, lat[n / 2], lat[n * 99 / 100],
	       lat[n - 1]);
	free(lat);
}

static void cmd_stats(void)
{
	int (*fn)(struct samepage_agent_stats *) =
		(int (*)(struct samepage_agent_stats *))dlsym(
			RTLD_DEFAULT, "samepage_agent_stats");
	struct samepage_agent_stats s;

	if (!fn || fn(&s) < 0) {
		printf("err no agent\n");
		return;
	}
	printf("ok active=%d merged=%llu zero=%llu pinned=%llu changed=%llu "
	       "mappings=%llu budget=%llu refused=%llu\n",
	       s.active, (unsigned long long)s.merged_pages,
	       (unsigned long long)s.zero_pages,
	       (unsigned long long)s.pinned_skipped,
	       (unsigned long long)s.changed_skipped,
	       (unsigned long long)s.mappings,
	       (unsigned long long)s.map_budget,
	       (unsigned long long)s.budget_refusals);
}

static atomic_int usr1_tid;

static void on_usr1(int sig)
{
	(void)sig;
	atomic_store(&usr1_tid, (int)syscall(SYS_gettid));
}

/*
 * A program that blocks a signal in all of its threads and takes it
 * with sigwait (or signalfd, as QEMU does) must get it there: no thread
 * samepage adds may take it instead.
 */
static void cmd_sigblock(void)
{
	struct sigaction sa = { .sa_handler = on_usr1 }, old;
	struct timespec nap = { 0, 200 * 1000 * 1000 }, none = { 0, 0 };
	sigset_t s, pend;
	int tid;

	sigemptyset(&s);
	sigaddset(&s, SIGUSR1);
	sigaction(SIGUSR1, &sa, &old);
	pthread_sigmask(SIG_BLOCK, &s, NULL);
	atomic_store(&usr1_tid, 0);
	kill(getpid(), SIGUSR1);	/* to the process, not this thread */
	nanosleep(&nap, NULL);
	tid = atomic_load(&usr1_tid);
	sigpending(&pend);
	if (tid)
		printf("err handled on thread %d\n", tid);
	else if (!sigismember(&pend, SIGUSR1) ||
		 sigtimedwait(&s, NULL, &none) != SIGUSR1)
		printf("err SIGUSR1 neither pending nor handled\n");
	else
		printf("ok\n");
	pthread_sigmask(SIG_UNBLOCK, &s, NULL);
	sigaction(SIGUSR1, &old, NULL);
}

static int reused[64];
static int nreused;

static void cmd_closefds(void)
{
	int sv[2];

	if (close_range(3, ~0U, 0) < 0) {
		printf("err close_range %s\n", strerror(errno));
		return;
	}
	nreused = 0;
	while (nreused + 3 <= 48) {
		reused[nreused++] = open("/dev/null", O_RDWR | O_CLOEXEC);
		if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
			break;
		reused[nreused++] = sv[0];
		reused[nreused++] = sv[1];
	}
	printf("ok\n");
}

/* The socket pairs of closefds carried nothing they were not sent. */
static void cmd_checkfds(void)
{
	char b[64];

	for (int i = 0; i + 2 < nreused; i += 3) {
		ssize_t n = recv(reused[i + 2], b, sizeof(b), MSG_DONTWAIT);

		if (n >= 0 || errno != EAGAIN) {
			printf("err fd %d received %zd bytes\n", reused[i + 2],
			       n);
			return;
		}
		n = recv(reused[i + 1], b, sizeof(b), MSG_DONTWAIT);
		if (n >= 0 || errno != EAGAIN) {
			printf("err fd %d received %zd bytes\n", reused[i + 1],
			       n);
			return;
		}
	}
	printf("ok\n");
}

static void cmd_dup2high(int lo, int hi)
{
	int nul = open("/dev/null", O_RDWR | O_CLOEXEC);

	for (int fd = lo; fd <= hi; fd++)
		if (dup2(nul, fd) != fd) {
			printf("err dup2 onto %d: %s\n", fd, strerror(errno));
			close(nul);
			return;
		}
	close(nul);
	printf("ok\n");
}

static void reply(int r)
{
	if (r < 0)
		printf("err %s\n", strerror(errno));
	else
		printf("ok\n");
}

/* Is anything mapped in [at, at + len)?  *s, *e: the first such.  With
 * print, every line of /proc/self/maps that overlaps is printed, each
 * after " | ". */
static bool maps_in(uintptr_t at, size_t len, bool print, unsigned long *s,
		    unsigned long *e)
{
	FILE *f = fopen("/proc/self/maps", "re");
	char l[512];
	bool hit = false;

	while (f && (print || !hit) && fgets(l, sizeof(l), f)) {
		unsigned long a, b;

		l[strcspn(l, "\n")] = 0;
		if (sscanf(l, "%lx-%lx", &a, &b) != 2 || b <= at ||
		    a >= at + len)
			continue;
		if (!hit) {
			*s = a;
			*e = b;
		}
		hit = true;
		if (print)
			printf(" | %s", l);
	}
	if (f)
		fclose(f);
	return hit;
}

/* "err ERRNO" and the lines of /proc/self/maps that overlap
 * [at, at + len), on one line */
static void err_with_maps(int e, uintptr_t at, size_t len)
{
	unsigned long s, t;

	printf("err %d", e);
	maps_in(at, len, true, &s, &t);
	printf("\n");
}

/* holewatch: 0 while [at, at + len) stays empty for ms, else 1 (*s, *e:
 * what came into it).  A look every 100 us. */
static int watch_hole(uintptr_t at, size_t len, unsigned ms,
		      unsigned long *s, unsigned long *e)
{
	struct timespec t0, t;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	do {
		if (maps_in(at, len, false, s, e))
			return 1;
		usleep(100);
		clock_gettime(CLOCK_MONOTONIC, &t);
	} while ((t.tv_sec - t0.tv_sec) * 1000 +
			 (t.tv_nsec - t0.tv_nsec) / 1000000 < (long)ms);
	return 0;
}

/* A fresh anonymous mapping at the hole [at, at + len), by raw mmap
 * (MAP_FIXED_NOREPLACE): EEXIST if anything came into the hole, which
 * in this program can only be the agent's. */
static long remap_hole(void *at, size_t len)
{
	return syscall(SYS_mmap, at, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
}

/* stackused: the thread's stack is painted first; what it used is the
 * part no longer painted, from its low end up. */
#define STACK_BYTES 65536
static int stack_advice;

static void *stack_advise(void *arg)
{
	(void)arg;
	return (void *)(intptr_t)(madvise(region, npages * PG, stack_advice) ?
				  -errno : 0);
}

static long stack_used(int advice)
{
	unsigned char *stk = aligned_alloc(PG, STACK_BYTES);
	pthread_attr_t at;
	pthread_t t;
	void *ret;
	size_t lo = 0;

	if (!stk)
		return -ENOMEM;
	memset(stk, 0xAA, STACK_BYTES);
	stack_advice = advice;
	pthread_attr_init(&at);
	pthread_attr_setstack(&at, stk, STACK_BYTES);
	if (pthread_create(&t, &at, stack_advise, NULL)) {
		free(stk);
		return -EAGAIN;
	}
	pthread_join(t, &ret);
	while (lo < STACK_BYTES && stk[lo] == 0xAA)
		lo++;
	free(stk);
	return ret ? (long)(intptr_t)ret : (long)(STACK_BYTES - lo);
}

int main(int argc, char **argv)
{
	char line[512], a1[256];
	unsigned long x, y, z, w, v;
	unsigned ms;
	double secs;
	int k;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc > 1 && !strcmp(argv[1], "--execd"))
		printf("ok\n");	/* the reply to "exec" */
	while (fgets(line, sizeof(line), stdin)) {
		if (sscanf(line, "maphuge %lu", &x) == 1) {
			const size_t huge = 2UL << 20;
			uint8_t *m = mmap(NULL, x * PG + huge,
					  PROT_READ | PROT_WRITE,
					  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

			if (m == MAP_FAILED) {
				printf("err\n");
				continue;
			}
			region = (uint8_t *)(((uintptr_t)m + huge - 1) &
					     ~(uintptr_t)(huge - 1));
			npages = x;
			if (madvise(region, x * PG, MADV_HUGEPAGE))
				printf("err %s\n", strerror(errno));
			else
				printf("ok %p\n", (void *)region);
		} else if (sscanf(line, "map %lu", &x) == 1 ||
		    sscanf(line, "mapshared %lu", &x) == 1) {
			int shared = line[3] == 's';

			region = mmap(NULL, x * PG, PROT_READ | PROT_WRITE,
				      (shared ? MAP_SHARED : MAP_PRIVATE) |
					      MAP_ANONYMOUS,
				      -1, 0);
			npages = x;
			printf(region == MAP_FAILED ? "err\n" : "ok %p\n",
			       (void *)region);
		} else if (sscanf(line, "mapmalloc %lu", &x) == 1) {
			void *m = NULL;

			if (posix_memalign(&m, PG, x * PG) == 0) {
				region = m;
				npages = x;
				printf("ok %p\n", m);
			} else {
				printf("err\n");
			}
		} else if (!strncmp(line, "freemalloc", 10)) {
			free(region);
			region = NULL;
			npages = 0;
			printf("ok\n");
		} else if (!strncmp(line, "merge", 5)) {
			reply(madvise(region, npages * PG, MADV_MERGEABLE));
		} else if (sscanf(line, "stackused %lu", &x) == 1) {
			long used = stack_used((int)x);

			if (used < 0)
				printf("err stack %ld\n", used);
			else
				printf("ok %ld\n", used);
		} else if (!strncmp(line, "unmerge", 7)) {
			reply(madvise(region, npages * PG, MADV_UNMERGEABLE));
		} else if (sscanf(line, "prctl %lu", &x) == 1) {
			reply(prctl(PR_SET_MEMORY_MERGE, x, 0, 0, 0));
		} else if (!strncmp(line, "getprctl", 8)) {
			printf("ok %d\n", prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0));
		} else if (sscanf(line, "fill %lu %lu %lu", &x, &y, &z) == 3) {
			fill((unsigned)x, y, z);
			printf("ok\n");
		} else if (sscanf(line, "fillone %lu %lu %lu", &x, &y, &z) == 3) {
			fill_as((unsigned)x, y, z, true);
			printf("ok\n");
		} else if (sscanf(line, "check %lu %lu %lu", &x, &y, &z) == 3 ||
			   sscanf(line, "checkone %lu %lu %lu", &x, &y, &z) == 3) {
			long bad = check_as((unsigned)x, y, z, line[5] == 'o');

			if (bad < 0)
				printf("ok\n");
			else
				printf("err bad %ld\n", bad);
		} else if (sscanf(line, "write %lu %lu", &x, &y) == 2) {
			region[x * PG] = (uint8_t)y;
			printf("ok\n");
		} else if (sscanf(line, "dontneed %lu %lu", &x, &y) == 2) {
			reply(madvise(region + x * PG, y * PG, MADV_DONTNEED));
		} else if (sscanf(line, "mprotect %lu %lu %lu", &x, &y, &z) ==
			   3) {
			reply(mprotect(region + x * PG, y * PG, (int)z));
		} else if (sscanf(line, "hugepage %lu %lu", &x, &y) == 2) {
			reply(madvise(region + x * PG, y * PG, MADV_HUGEPAGE));
		} else if (sscanf(line, "dontdump %lu %lu", &x, &y) == 2) {
			reply(madvise(region + x * PG, y * PG, MADV_DONTDUMP));
		} else if (!strncmp(line, "guard", 5)) {
			void *g = mmap(region + npages * PG, PG, PROT_READ,
				       MAP_PRIVATE | MAP_ANONYMOUS |
					       MAP_FIXED_NOREPLACE,
				       -1, 0);
			/* EEXIST: something is there already, as good */
			printf(g == region + npages * PG || errno == EEXIST
				       ? "ok\n" : "err\n");
		} else if (sscanf(line, "rawunmap %lu %lu", &x, &y) == 2) {
			reply((int)syscall(SYS_munmap, region + x * PG,
					   y * PG));
		} else if (sscanf(line, "rawremap %lu %lu", &x, &y) == 2) {
			void *at = region + x * PG;
			long m = syscall(SYS_munmap, at, y * PG) == 0
					 ? remap_hole(at, y * PG) : -1;

			if ((void *)m == at)
				printf("ok\n");
			else	/* what is in the way, for the test's report */
				err_with_maps(errno, (uintptr_t)at, y * PG);
		} else if (sscanf(line, "holewatch %lu %lu %u", &x, &y,
				  &ms) == 3) {
			void *at = region + x * PG;
			unsigned long s = 0, t = 0;
			long m = -1;
			int got = syscall(SYS_munmap, at, y * PG) == 0
					? watch_hole((uintptr_t)at, y * PG, ms,
						     &s, &t)
					: -errno;

			/* mapped again, so that the test can go on */
			if (got >= 0)
				m = remap_hole(at, y * PG);
			if (got < 0)
				printf("err munmap %d\n", -got);
			else if (got > 0)
				printf("err taken %#lx-%#lx in the hole "
				       "%#lx-%#lx\n", s, t, (unsigned long)at,
				       (unsigned long)at + y * PG);
			else if ((void *)m != at)
				err_with_maps(errno, (uintptr_t)at, y * PG);
			else
				printf("ok\n");
		} else if (sscanf(line, "mlockall %lu", &x) == 1) {
			reply(mlockall((int)x));
		} else if (!strncmp(line, "munlockall", 10)) {
			reply(munlockall());
		} else if (sscanf(line, "munmap %lu %lu", &x, &y) == 2) {
			reply(munmap(region + x * PG, y * PG));
		} else if (sscanf(line, "mremap %lu", &x) == 1) {
			void *p = mremap(region, npages * PG, x * PG,
					 MREMAP_MAYMOVE);
			if (p == MAP_FAILED) {
				printf("err mremap\n");
			} else {
				region = p;
				npages = x;
				printf("ok %p\n", p);
			}
		} else if ((k = sscanf(line, "hammer %lu %lu keep %lu", &x,
				       &y, &z)) >= 2) {
			cmd_hammer((unsigned)x, (double)y,
				   strstr(line, "keep") != NULL,
				   k == 3 ? (unsigned)z : 0);
		} else if ((k = sscanf(line, "rowrite %lu %lu %lu %lu %lu", &x,
				       &y, &z, &w, &v)) >= 4) {
			cmd_rowrite((unsigned)x, (double)y, z, w,
				    k == 5 ? (unsigned)v : 0);
		} else if (sscanf(line, "pin %lu %lu", &x, &y) == 2) {
			cmd_pin(x, y);
		} else if (!strncmp(line, "unpin", 5)) {
			cmd_unpin();
		} else if (sscanf(line, "mkfile %255s", a1) == 1) {
			cmd_mkfile(a1);
		} else if (sscanf(line, "direct %lu %lu %255s", &x, &y, a1) ==
			   3) {
			cmd_direct((unsigned)x, (double)y, a1);
		} else if (sscanf(line, "uread %255s %lu", a1, &x) == 2) {
			cmd_uread(a1, x);
		} else if ((k = sscanf(line, "forkmap %lu %lu", &x, &y)) >= 1) {
			cmd_forkmap(x, k == 2 ? (unsigned)y : 1);
		} else if (!strncmp(line, "fork", 4)) {
			cmd_fork();
		} else if (!strncmp(line, "wait", 4)) {
			cmd_wait();
		} else if (sscanf(line, "cmpfile %255s %lu", a1, &x) == 2) {
			cmd_cmpfile(a1, x);
		} else if (sscanf(line, "heap %lu", &x) == 1) {
			cmd_heap(x);
		} else if (!strncmp(line, "heapwrite", 9)) {
			cmd_heapwrite();
		} else if (sscanf(line, "mmapmany %lu", &x) == 1) {
			cmd_mmapmany(x);
		} else if (!strncmp(line, "unshare", 7)) {
			unsigned u = 0, times = 1;
			int e = 0;

			sscanf(line + 7, "%u", &times);
			while (u + 1 < times && !(e = unshare_in_child()))
				u++;
			if (!e && unshare(CLONE_NEWUSER) < 0)
				e = errno;
			if (!e)
				printf("ok\n");
			else
				printf("err %s, after %u of %u\n", strerror(e),
				       u, times);
		} else if (sscanf(line, "mmaplat %lf", &secs) == 1) {
			cmd_mmaplat(secs);
		} else if (!strncmp(line, "stats", 5)) {
			cmd_stats();
		} else if (!strncmp(line, "addr", 4)) {
			printf("ok %p\n", (void *)region);
		} else if (sscanf(line, "dup2high %lu %lu", &x, &y) == 2) {
			cmd_dup2high((int)x, (int)y);
		} else if (!strncmp(line, "closefds", 8)) {
			cmd_closefds();
		} else if (!strncmp(line, "checkfds", 8)) {
			cmd_checkfds();
		} else if (!strncmp(line, "sigblock", 8)) {
			cmd_sigblock();
		} else if (!strncmp(line, "exec", 4)) {
			/* the same program again, in this process */
			execl("/proc/self/exe", "memfill", "--execd", (char *)NULL);
			printf("err %s\n", strerror(errno));
		} else if (!strncmp(line, "quit", 4)) {
			break;
		} else {
			printf("err unknown command\n");
		}
	}
	return 0;
}
