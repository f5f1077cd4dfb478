/* test_scan.c - the scanner's order: a pass takes the clients in turn, a
 * chunk each; a client with its batches all out is passed in the turn,
 * and the scan waits only when every client the pass has left is so; a
 * pass ends once every client is done, or left out after being busy for
 * sp_busy_skip_ms (and the next pass starts it where it stopped).
 *
 * The clients are this process itself, three times over: three regions
 * of its own memory, read through its own pagemap, each client's
 * batches sent down a socket pair of its own. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include <linux/userfaultfd.h>

#include "sp.h"

enum { NCLIENTS = 3, NPAGES = 2048 };

static struct daemon d;
static struct client cl[NCLIENTS];
static uint8_t *mem[NCLIENTS];
static int peer[NCLIENTS];	/* the other end of each client's socket */

/* Client id for the NPAGES pages at addr in process pid, its batches
 * sent down a socket pair whose other end goes to *other; put at the
 * head of the scanner's list.  0, or -1. */
static int open_client(struct client *c, int id, pid_t pid, uint8_t *addr,
		       int *other)
{
	char path[64];
	int sv[2];

	memset(c, 0, sizeof(*c));
	if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) < 0)
		return -1;
	c->fd = sv[0];
	*other = sv[1];
	c->id = id;
	c->pid = pid;
	c->agent = true;
	snprintf(path, sizeof(path), "/proc/%d/pagemap", (int)pid);
	c->pagemap = open(path, O_RDONLY);
	snprintf(path, sizeof(path), "/proc/%d/mem", (int)pid);
	c->mem = open(path, O_RDONLY);
	if (c->pagemap < 0 || c->mem < 0 ||
	    client_reg(&d, c, (uintptr_t)addr, NPAGES * SP_PAGE) < 0)
		return -1;
	c->next = d.clients;
	d.clients = c;
	return 0;
}

static void close_client(struct client *c, int other)
{
	client_drop_batches(&d, c);
	client_unreg(&d, c, 0, UINT64_MAX);
	free(c->r);
	close(c->fd);
	close(other);
	close(c->pagemap);
	close(c->mem);
}

/* Page p of every client holds the same bytes: every page of a client
 * pairs with the page at the same place in each other client. */
static int setup(void **state)
{
	(void)state;
	memset(&d, 0, sizeof(d));
	d.pages_to_scan = 100000;
	if (scan_init(&d, 64 << 20) < 0)
		return -1;
	for (int k = NCLIENTS - 1; k >= 0; k--) {
		mem[k] = mmap(NULL, NPAGES * SP_PAGE, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (mem[k] == MAP_FAILED)
			return -1;
		for (uint64_t p = 0; p < NPAGES; p++) {
			memset(mem[k] + p * SP_PAGE, 0x5a, SP_PAGE);
			memcpy(mem[k] + p * SP_PAGE, &p, sizeof(p));
		}
		if (open_client(&cl[k], k + 1, getpid(), mem[k], &peer[k]) < 0)
			return -1;
	}
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	for (int k = 0; k < NCLIENTS; k++) {
		close_client(&cl[k], peer[k]);
		munmap(mem[k], NPAGES * SP_PAGE);
	}
	free(d.ut.v);
	free(d.pool.s);
	free(d.pool.ix);
	free(d.pool.freelist);
	munmap(d.pool.base, d.pool.bytes);
	close(d.pool.fd);
	close(d.pool.pagemap);
	if (d.kpageflags >= 0)
		close(d.kpageflags);
	free(d.buf);
	free(d.cmp);
	return 0;
}

/* Pages of client k the scanner has read. */
static uint64_t seen(int k)
{
	uint64_t n = 0;

	for (uint64_t p = 0; p < NPAGES; p++)
		n += cl[k].r[0].st[p].flags & PS_SEEN;
	return n;
}

/* Pages of client k planned for merging (in batches sent). */
static uint64_t planned(int k)
{
	uint64_t n = 0;

	for (struct batch *b = cl[k].inflight; b; b = b->next)
		for (uint32_t i = 0; i < b->nitems; i++)
			n += b->items[i].npages;
	return n;
}

/* Page p of client k holds bytes of its own: nothing pairs. */
static void make_unique(void)
{
	for (int k = 0; k < NCLIENTS; k++)
		for (uint64_t p = 0; p < NPAGES; p++)
			mem[k][p * SP_PAGE + 8] = (uint8_t)(k + 1);
}

/* Pages p of clients 2 and 3 made alike again, with new bytes. */
static void rewrite_alike(void)
{
	for (int k = 1; k < NCLIENTS; k++)
		for (uint64_t p = 0; p < NPAGES; p++) {
			memset(mem[k] + p * SP_PAGE, 0xa5, SP_PAGE);
			memcpy(mem[k] + p * SP_PAGE, &p, sizeof(p));
		}
}

/* A chunk of each client in turn, not one client's pages first. */
static void pass_takes_clients_in_turn(void **state)
{
	(void)state;
	d.pages_to_scan = 1024;		/* two chunks of 512 */
	assert_false(scan_tick(&d));
	assert_int_equal(seen(0), 512);
	assert_int_equal(seen(1), 512);
	assert_int_equal(seen(2), 0);
	assert_false(scan_tick(&d));
	assert_int_equal(seen(2), 512);
	assert_int_equal(seen(0), 1024);
	/* the pass ends only once all three are done: twelve chunks, two
	 * a tick */
	for (int t = 0; t < 4; t++) {
		assert_int_equal(d.full_scans, 0);
		assert_false(scan_tick(&d));
	}
	for (int k = 0; k < NCLIENTS; k++)
		assert_int_equal(seen(k), NPAGES);
	assert_int_equal(d.full_scans, 0);
	assert_false(scan_tick(&d));
	assert_int_equal(d.full_scans, 1);
}

/*
 * Client 1 with all its batches out: the others are scanned, and pair
 * with each other meanwhile, at first sight; the scan waits (stalled)
 * only once they are done and client 1 is all the pass has left.
 */
static void busy_client_does_not_hold_up_the_others(void **state)
{
	(void)state;
	cl[0].ninflight = SP_MAX_INFLIGHT;
	assert_true(scan_tick(&d));
	assert_int_equal(seen(0), 0);
	assert_int_equal(seen(1), NPAGES);
	assert_int_equal(seen(2), NPAGES);
	assert_int_equal(d.full_scans, 0);	/* client 1 still to do */
	assert_int_equal(planned(1), NPAGES);	/* 2 and 3: every page */
	assert_int_equal(planned(2), NPAGES);
	assert_true(scan_tick(&d));		/* and still busy */
	cl[0].ninflight = 0;
	d.pages_to_scan = NPAGES;
	assert_false(scan_tick(&d));	/* client 1, all of it */
	assert_int_equal(seen(0), NPAGES);
	assert_int_equal(d.full_scans, 0);
	assert_int_equal(planned(0), NPAGES);	/* onto the pool's pages */
}

/* Every client with its batches out: nothing is read, the scan waits. */
static void all_busy_waits(void **state)
{
	(void)state;
	for (int k = 0; k < NCLIENTS; k++)
		cl[k].ninflight = SP_MAX_INFLIGHT;
	assert_true(scan_tick(&d));
	assert_true(scan_tick(&d));
	assert_int_equal(d.pages_scanned, 0);
	assert_int_equal(d.full_scans, 0);
	for (int k = 0; k < NCLIENTS; k++)
		cl[k].ninflight = 0;
}

/*
 * A client busy for sp_busy_skip_ms is left out of the pass, which ends
 * without it; the next pass starts it where it stopped, not from its
 * first page.
 */
static void stuck_client_is_left_out_and_resumed(void **state)
{
	(void)state;
	d.pages_to_scan = 512;
	assert_false(scan_tick(&d));	/* client 1's first chunk */
	assert_int_equal(seen(0), 512);
	cl[0].ninflight = SP_MAX_INFLIGHT;
	d.pages_to_scan = 100000;
	assert_true(scan_tick(&d));	/* the others, then a wait */
	assert_int_equal(d.full_scans, 0);
	cl[0].busy_since = sp_now_ms() - sp_busy_skip_ms - 1;
	assert_false(scan_tick(&d));	/* left out: the pass ends */
	assert_true(d.full_scans >= 1);
	assert_int_equal(seen(0), 512);
	cl[0].ninflight = 0;
	for (int k = 0; k < NCLIENTS; k++)	/* forget what was seen */
		for (uint64_t p = 0; p < NPAGES; p++)
			cl[k].r[0].st[p].flags &= ~(uint32_t)PS_SEEN;
	d.pages_to_scan = 512;
	while (seen(0) == 0)
		assert_false(scan_tick(&d));
	/* on from page 512, where it stopped */
	assert_int_equal(cl[0].r[0].st[511].flags & PS_SEEN, 0);
	assert_int_equal(cl[0].r[0].st[512].flags & PS_SEEN, PS_SEEN);
}

/*
 * Programs come and go mid-pass: one that joins is scanned in the pass
 * under way (the pass ends only once it is done too), and one that goes
 * leaves nothing for the pass to wait for.
 */
static void clients_join_and_leave_mid_pass(void **state)
{
	struct client *third = d.clients;	/* cl[0] heads the list */

	(void)state;
	make_unique();		/* the order alone: no batches out */
	SP_ASSERT(third == &cl[0] && cl[0].next == &cl[1]);
	d.clients = &cl[1];			/* clients 2 and 3 only */
	d.pages_to_scan = 1024;
	assert_false(scan_tick(&d));		/* 2 and 3, a chunk each */
	assert_int_equal(seen(1), 512);
	assert_int_equal(seen(2), 512);
	third->next = d.clients;		/* client 1 joins */
	d.clients = third;
	for (int t = 0; t < 6; t++) {		/* 10 chunks left, 2 a tick */
		assert_int_equal(d.full_scans, 0);
		assert_false(scan_tick(&d));
	}
	assert_int_equal(seen(0), NPAGES);
	assert_int_equal(seen(1), NPAGES);
	assert_int_equal(seen(2), NPAGES);
	/* the second pass: client 2 goes after a chunk of each */
	d.pages_to_scan = 3 * 512;
	assert_false(scan_tick(&d));
	assert_int_equal(d.full_scans, 1);
	third->next = &cl[2];			/* unlink client 2 */
	d.pages_to_scan = 100000;
	assert_false(scan_tick(&d));		/* 1 and 3 to the end */
	assert_int_equal(d.full_scans, 2);
	cl[0].next = &cl[1];			/* as teardown expects */
}

/*
 * A page the scanner sees for the first time is a candidate at once.
 * One seen to change since the last pass is being written to: it pairs
 * with nothing until its hash holds still a pass (pages_volatile counts
 * it), as in KSM, whose checksum must hold still before a page enters
 * its unstable tree.
 */
static void a_page_seen_changing_waits_a_pass(void **state)
{
	(void)state;
	make_unique();
	d.pages_to_scan = NCLIENTS * NPAGES;	/* a pass a tick */
	assert_false(scan_tick(&d));
	for (int k = 0; k < NCLIENTS; k++) {
		assert_int_equal(seen(k), NPAGES);
		assert_int_equal(planned(k), 0);	/* nothing alike */
	}
	rewrite_alike();
	assert_false(scan_tick(&d));	/* the second pass */
	assert_int_equal(d.full_scans, 1);
	for (int k = 0; k < NCLIENTS; k++)
		assert_int_equal(planned(k), 0);	/* changed: they wait */
	assert_false(scan_tick(&d));	/* the third: held still */
	assert_int_equal(d.full_scans, 2);
	assert_int_equal(d.pages_volatile, 2 * NPAGES);
	assert_int_equal(planned(0), 0);
	assert_int_equal(planned(1), NPAGES);
	assert_int_equal(planned(2), NPAGES);
}

/* The frames of client 1's first n pages (0 where PFNs are hidden). */
static void frames_of(uint64_t *pfn, size_t n)
{
	uint64_t pm[512];

	SP_ASSERT(n <= 512);
	assert_int_equal(sp_pagemap_read(cl[0].pagemap, (uintptr_t)mem[0], n,
					 pm), 0);
	for (size_t i = 0; i < n; i++)
		pfn[i] = PM_PFN(pm[i]);
}

/*
 * Client 1's first chunk goes into the unstable table, then it forks.
 * The child's copy of that chunk is one frame with the parent's: nothing
 * to save.  The table's entries were put while the parent's pages were
 * its own, so the scanner must look again: nothing pairs, and the
 * parent's pages keep their frames (a read with process_vm_readv would
 * have pinned them and given the parent copies of its own).
 */
static void pages_shared_since_fork_do_not_pair(void **state)
{
	uint64_t before[512], after[512];
	struct client ch;
	int other;
	pid_t pid;

	(void)state;
	make_unique();
	d.clients = &cl[0];
	cl[0].next = NULL;
	d.pages_to_scan = 512;
	assert_false(scan_tick(&d));	/* the parent's first chunk */
	assert_int_equal(seen(0), 512);
	assert_int_equal(d.full_scans, 0);	/* its entries still there */
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {		/* gone with the test, failed or not */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		close(1);
		close(2);
		pause();
		_exit(0);
	}
	frames_of(before, 512);
	if (!before[0]) {
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		cl[0].next = &cl[1];
		skip();		/* PFNs hidden: not root */
	}
	/* the child's copy, a client of its own */
	assert_int_equal(open_client(&ch, 9, pid, mem[0], &other), 0);
	assert_false(scan_tick(&d));	/* the child's first chunk */
	assert_int_equal(ch.r[0].st[0].flags & PS_SEEN, PS_SEEN);
	frames_of(after, 512);
	for (int i = 0; i < 512; i++)
		assert_int_equal(after[i], before[i]);
	assert_int_equal(planned(0), 0);
	assert_null(ch.inflight);
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	close_client(&ch, other);
	d.clients = &cl[0];
	cl[0].next = &cl[1];		/* as teardown expects */
}

/*
 * With use_zero_pages=0 a page of zeros pairs as any other, unless it is
 * one of the kernel's zero pages (it costs nothing, and is not the
 * program's own).  Client 1's page of zeros goes into the unstable table
 * while it is its own; then it becomes the kernel's zero page (dropped,
 * and mapped again by UFFDIO_ZEROPAGE), one the daemon does not know by
 * its frame number, before client 2's page of zeros comes to pair with
 * it.  The pair is refused: the check made of the
 * page in hand (zeros_of_its_own) holds for the other page too.
 */
static void a_zero_page_of_the_kernels_does_not_pair(void **state)
{
	struct uffd_caps caps;
	uint64_t pm;
	int uffd;

	(void)state;
	make_unique();
	memset(mem[0], 0, SP_PAGE);
	memset(mem[1], 0, SP_PAGE);
	d.clients = &cl[0];
	cl[0].next = NULL;
	d.pages_to_scan = 512;
	assert_false(scan_tick(&d));	/* client 1's first chunk */
	assert_int_equal(seen(0), 512);
	assert_int_equal(planned(0), 0);
	uffd = uffd_open(&caps, false);
	if (uffd < 0) {
		cl[0].next = &cl[1];
		skip();		/* no userfaultfd */
	}
	assert_int_equal(madvise(mem[0], SP_PAGE, MADV_DONTNEED), 0);
	assert_int_equal(uffd_register(uffd, (uintptr_t)mem[0], SP_PAGE,
				       UFFDIO_REGISTER_MODE_MISSING), 0);
	assert_int_equal(uffd_zeropage(uffd, (uintptr_t)mem[0], SP_PAGE), 0);
	assert_int_equal(sp_pagemap_read(cl[0].pagemap, (uintptr_t)mem[0], 1,
					 &pm), 0);
	assert_true(pm & PM_PRESENT);
	assert_false(pm & PM_EXCL);
	if (!PM_PFN(pm) || d.kpageflags < 0) {
		close(uffd);
		cl[0].next = &cl[1];
		skip();		/* frames hidden: not root */
	}
	/* a frame of zeros the daemon does not know by its number, as
	 * the huge zero page of a THP range */
	d.zero_pfn = 0;
	cl[0].next = &cl[1];
	cl[1].next = NULL;
	d.clients = &cl[0];
	assert_false(scan_tick(&d));	/* client 2's first chunk */
	assert_int_equal(seen(1), 512);
	assert_int_equal(planned(0), 0);
	assert_int_equal(planned(1), 0);
	uffd_unregister(uffd, (uintptr_t)mem[0], SP_PAGE);
	close(uffd);
	cl[1].next = &cl[2];		/* as teardown expects */
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(pass_takes_clients_in_turn,
						setup, teardown),
		cmocka_unit_test_setup_teardown(
			busy_client_does_not_hold_up_the_others, setup,
			teardown),
		cmocka_unit_test_setup_teardown(all_busy_waits, setup,
						teardown),
		cmocka_unit_test_setup_teardown(
			stuck_client_is_left_out_and_resumed, setup, teardown),
		cmocka_unit_test_setup_teardown(
			clients_join_and_leave_mid_pass, setup, teardown),
		cmocka_unit_test_setup_teardown(
			a_page_seen_changing_waits_a_pass, setup, teardown),
		cmocka_unit_test_setup_teardown(
			pages_shared_since_fork_do_not_pair, setup, teardown),
		cmocka_unit_test_setup_teardown(
			a_zero_page_of_the_kernels_does_not_pair, setup,
			teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
