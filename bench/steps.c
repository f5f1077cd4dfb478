/*
 * steps.c - the agent's system calls for merging one page, timed one by
 * one in a single process.  Not a comparison with KSM (bench/run is):
 * it says where the time of a single-page merge goes.
 *
 *   tests/bin/steps [PAGES [STRIDE [pfn | G]]]
 *
 * Maps PAGES private anonymous pages of distinct content, copies every
 * STRIDE-th one into a memfd "pool", then merges each of those the way
 * merge.c does a short run: register, UFFDIO_MOVE out, one kernel copy
 * of the moved page and of the pool page to compare, a move of nothing
 * (is the hole ours), mmap of the pool page, the new mapping read back
 * (faulted in) and compared with the saved page, wake (no unregister:
 * the pool mapping replaced the registered one).  With "pfn" as a third
 * argument the check is the one merge.c makes for longer runs instead:
 * populate and compare the pagemap frames of the mapping and the pool.
 * With a number G as the third argument, pages go G at a time, as
 * merge.c's merge_group takes single pages: each step for every page
 * of the group before the next, and the two copies (to compare, and to
 * read back) one call for the group.
 * Prints microseconds per merge for each step and CPU per merge; checks
 * every byte at the end.  Needs root for the PFN check.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
struct uffdio_move {
	__u64 dst, src, len, mode;
	__s64 move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, 0x05, struct uffdio_move)
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
#endif
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

#define PG 4096UL
#define SCRATCH 1024UL		/* pages; the last one stays empty */
#define PFN(e) ((e) & ((1ULL << 55) - 1))
#define MAXG 64			/* pages in a group at most */

enum { REG, MOVE, COPY, HOLE, MMAP, CHECK, WAKE, NSTEP };
static const char *const name[NSTEP] = {
	"register", "move out", "kernel copy", "hole check", "mmap pool",
	"check", "wake",
};

static double us(clockid_t c)
{
	struct timespec t;

	clock_gettime(c, &t);
	return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static uint64_t pagemap_at(int fd, const void *p)
{
	uint64_t e = 0;

	if (pread(fd, &e, 8, (off_t)((uintptr_t)p / PG * 8)) != 8)
		die("pagemap");
	return e;
}

/* The same steps, g pages at a time (merge.c, merge_group). */
static void merge_groups(int u, int fd, uint8_t *mem, uint8_t *pool,
			 uint8_t *scr, size_t nd, size_t stride, size_t g,
			 double *acc)
{
	uint8_t *buf = malloc(2 * g * PG), *slot[MAXG];
	struct iovec l[2 * MAXG], r[2 * MAXG];
	size_t used = 0;
	double t;

	if (!buf)
		die("malloc");
	for (size_t k0 = 0; k0 < nd; k0 += g) {
		size_t n = nd - k0 < g ? nd - k0 : g, j;

		if (used + n > SCRATCH - 1) {
			madvise(scr, (SCRATCH - 1) * PG, MADV_DONTNEED);
			used = 0;
		}
		for (j = 0; j < n; j++) {
			uintptr_t ad = (uintptr_t)mem + (k0 + j) * stride * PG;
			struct uffdio_register rg = {
				.range = { ad, PG },
				.mode = UFFDIO_REGISTER_MODE_MISSING,
			};
			struct uffdio_move mv = {
				.src = ad, .len = PG,
				.mode = UFFDIO_MOVE_MODE_DONTWAKE,
			};

			slot[j] = scr + used++ * PG;
			mv.dst = (uintptr_t)slot[j];
			t = us(CLOCK_MONOTONIC);
			if (ioctl(u, UFFDIO_REGISTER, &rg) < 0)
				die(name[REG]);
			acc[REG] += us(CLOCK_MONOTONIC) - t;
			t = us(CLOCK_MONOTONIC);
			if (ioctl(u, UFFDIO_MOVE, &mv) < 0)
				die(name[MOVE]);
			acc[MOVE] += us(CLOCK_MONOTONIC) - t;
			l[2 * j] = (struct iovec){ buf + 2 * j * PG, PG };
			l[2 * j + 1] = (struct iovec){ buf + (2 * j + 1) * PG, PG };
			r[2 * j] = (struct iovec){ slot[j], PG };
			r[2 * j + 1] = (struct iovec){
				pool + (k0 + j) * PG, PG };
		}
		t = us(CLOCK_MONOTONIC);
		if (process_vm_readv(getpid(), l, 2 * n, r, 2 * n, 0) !=
		    (ssize_t)(2 * n * PG))
			die(name[COPY]);
		for (j = 0; j < n; j++)
			if (memcmp(buf + 2 * j * PG, buf + (2 * j + 1) * PG, PG))
				die(name[COPY]);
		acc[COPY] += us(CLOCK_MONOTONIC) - t;
		for (j = 0; j < n; j++) {
			uintptr_t ad = (uintptr_t)mem + (k0 + j) * stride * PG;
			struct uffdio_move nothing = {
				.dst = ad,
				.src = (uintptr_t)scr + (SCRATCH - 1) * PG,
				.len = PG,
				.mode = UFFDIO_MOVE_MODE_DONTWAKE |
					UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES,
			};

			t = us(CLOCK_MONOTONIC);
			if (ioctl(u, UFFDIO_MOVE, &nothing) < 0)
				die(name[HOLE]);
			acc[HOLE] += us(CLOCK_MONOTONIC) - t;
			t = us(CLOCK_MONOTONIC);
			if (syscall(SYS_mmap, ad, PG, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_FIXED, fd,
				    (k0 + j) * PG) != (long)ad)
				die(name[MMAP]);
			acc[MMAP] += us(CLOCK_MONOTONIC) - t;
			l[j] = (struct iovec){ buf + j * PG, PG };
			r[j] = (struct iovec){ (void *)ad, PG };
		}
		t = us(CLOCK_MONOTONIC);
		if (process_vm_readv(getpid(), l, n, r, n, 0) !=
		    (ssize_t)(n * PG))
			die(name[CHECK]);
		for (j = 0; j < n; j++)
			if (memcmp(buf + j * PG, slot[j], PG))
				die(name[CHECK]);
		acc[CHECK] += us(CLOCK_MONOTONIC) - t;
		for (j = 0; j < n; j++) {
			struct uffdio_range w = {
				(uintptr_t)mem + (k0 + j) * stride * PG, PG };

			t = us(CLOCK_MONOTONIC);
			if (ioctl(u, UFFDIO_WAKE, &w) < 0)
				die(name[WAKE]);
			acc[WAKE] += us(CLOCK_MONOTONIC) - t;
		}
	}
	free(buf);
}

int main(int argc, char **argv)
{
	size_t np = argc > 1 ? strtoul(argv[1], NULL, 0) : 16384;
	size_t stride = argc > 2 ? strtoul(argv[2], NULL, 0) : 4;
	int pfn = argc > 3 && strcmp(argv[3], "pfn") == 0;
	size_t group = argc > 3 && !pfn ? strtoul(argv[3], NULL, 0) : 0;
	size_t nd = np / stride, used = 0;
	double acc[NSTEP] = { 0 }, t, t0, c0;
	struct uffdio_api api = { .api = UFFD_API,
				  .features = UFFD_FEATURE_MOVE };
	uint8_t *mem, *pool, *scr, *cmp;
	int fd, pm, u;

	if (!stride || !nd || group > MAXG)
		return 2;
	mem = mmap(NULL, np * PG, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	scr = mmap(NULL, SCRATCH * PG, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	cmp = malloc(3 * PG);
	fd = memfd_create("steps-pool", 0);
	if (mem == MAP_FAILED || scr == MAP_FAILED || !cmp || fd < 0 ||
	    ftruncate(fd, (off_t)(nd * PG)) < 0)
		die("setup");
	for (size_t i = 0; i < np; i++)
		memset(mem + i * PG, (int)(i % 251) + 1, PG);
	for (size_t k = 0; k < nd; k++)
		if (pwrite(fd, mem + k * stride * PG, PG, (off_t)(k * PG)) !=
		    (ssize_t)PG)
			die("pool");
	pool = mmap(NULL, nd * PG, PROT_READ, MAP_SHARED, fd, 0);
	pm = open("/proc/self/pagemap", O_RDONLY);
	u = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (pool == MAP_FAILED || pm < 0 || u < 0 ||
	    ioctl(u, UFFDIO_API, &api) < 0)
		die("userfaultfd");
	struct uffdio_register sr = {
		.range = { (uintptr_t)scr, SCRATCH * PG },
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};
	if (ioctl(u, UFFDIO_REGISTER, &sr) < 0)
		die("register scratch");

	c0 = us(CLOCK_PROCESS_CPUTIME_ID);
	t0 = us(CLOCK_MONOTONIC);
	if (group)
		merge_groups(u, fd, mem, pool, scr, nd, stride, group, acc);
	for (size_t k = 0; !group && k < nd; k++) {
		uintptr_t ad = (uintptr_t)mem + k * stride * PG;
		uint8_t *slot = scr + (used++ % (SCRATCH - 1)) * PG;
		struct uffdio_range r = { ad, PG };
		struct uffdio_register rg = {
			.range = r, .mode = UFFDIO_REGISTER_MODE_MISSING,
		};
		struct uffdio_move mv = { .dst = (uintptr_t)slot, .src = ad,
					  .len = PG,
					  .mode = UFFDIO_MOVE_MODE_DONTWAKE };
		struct uffdio_move nothing = {
			.dst = ad, .src = (uintptr_t)scr + (SCRATCH - 1) * PG,
			.len = PG, .mode = UFFDIO_MOVE_MODE_DONTWAKE |
					   UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES,
		};
		struct iovec l = { cmp, 2 * PG },
			     s[2] = { { slot, PG }, { pool + k * PG, PG } };
		struct iovec lb = { cmp + 2 * PG, PG }, sb = { (void *)ad, PG };
		int step = 0;

		if (used % (SCRATCH - 1) == 0)
			madvise(scr, (SCRATCH - 1) * PG, MADV_DONTNEED);
#define STEP(call)                                              \
	do {                                                    \
		t = us(CLOCK_MONOTONIC);                        \
		if (!(call))                                    \
			die(name[step]);                        \
		acc[step++] += us(CLOCK_MONOTONIC) - t;         \
	} while (0)
		STEP(ioctl(u, UFFDIO_REGISTER, &rg) == 0);
		STEP(ioctl(u, UFFDIO_MOVE, &mv) == 0);
		STEP(process_vm_readv(getpid(), &l, 1, s, 2, 0) ==
			     (ssize_t)(2 * PG) &&
		     memcmp(cmp, cmp + PG, PG) == 0);
		STEP(ioctl(u, UFFDIO_MOVE, &nothing) == 0);
		STEP(syscall(SYS_mmap, ad, PG, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_FIXED, fd, k * PG) == (long)ad);
		if (pfn)
			STEP(madvise((void *)ad, PG, MADV_POPULATE_READ) == 0 &&
			     PFN(pagemap_at(pm, (void *)ad)) ==
				     PFN(pagemap_at(pm, pool + k * PG)));
		else
			STEP(process_vm_readv(getpid(), &lb, 1, &sb, 1, 0) ==
				     (ssize_t)PG &&
			     memcmp(cmp + 2 * PG, slot, PG) == 0);
		STEP(ioctl(u, UFFDIO_WAKE, &r) == 0);
#undef STEP
	}
	t = us(CLOCK_MONOTONIC) - t0;
	printf("%zu single-page merges: %.1f us each, %.1f us of CPU\n", nd,
	       t / (double)nd,
	       (us(CLOCK_PROCESS_CPUTIME_ID) - c0) / (double)nd);
	for (int i = 0; i < NSTEP; i++)
		printf("  %-12s %6.2f us\n", name[i], acc[i] / (double)nd);
	for (size_t i = 0; i < np; i++)
		for (size_t b = 0; b < PG; b += 512)
			if (mem[i * PG + b] != (uint8_t)(i % 251 + 1)) {
				printf("page %zu changed\n", i);
				return 1;
			}
	return 0;
}
