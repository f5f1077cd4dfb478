/*
 * agent.c - the in-process agent: connect to samepaged, run the thread
 * that executes merge requests, and the public API of libsamepage.
 *
 * The agent thread does nothing but wait for the daemon: it scans no
 * memory.  A merge request is executed with the agent lock held (see
 * merge.c).  If the daemon goes away the thread ends; merged pages stay
 * valid because the kernel keeps the pool file alive for its mappings.
 */
#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <linux/userfaultfd.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/stat.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "samepage.h"
#include "sp.h"

struct sp_agent sp_agent = {
	.lock = PTHREAD_MUTEX_INITIALIZER,
	.sock = -1, .uffd = -1, .poolfd = -1, .pagemap = -1, .mapsfd = -1,
	.memfd = -1,
	.wakefd = { -1, -1 },
	.any_min = 0,
};

/* Mappings left to the program itself: 1/8 of vm.max_map_count. */
static const int map_reserve_div = 8;

/*
 * The real mmap/munmap/madvise: the next definition after ours (libc, or
 * a sanitizer's interceptor, which must see every mapping), else the raw
 * system call.
 */
void *sp_next_sym(void *_Atomic *slot, const char *name)
{
	void *f = atomic_load_explicit(slot, memory_order_acquire);

	if (!f) {
		f = dlsym(RTLD_NEXT, name);
		atomic_store_explicit(slot, f ? f : (void *)-1,
				      memory_order_release);
	}
	return f == (void *)-1 ? NULL : f;
}

void *sys_mmap(void *addr, size_t len, int prot, int flags, int fd,
	       off_t off)
{
	static void *_Atomic slot;
	void *(*f)(void *, size_t, int, int, int, off_t) =
		(void *(*)(void *, size_t, int, int, int, off_t))sp_next_sym(
			&slot, "mmap");

	if (f)
		return f(addr, len, prot, flags, fd, off);
	return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
}

int sys_munmap(void *addr, size_t len)
{
	static void *_Atomic slot;
	int (*f)(void *, size_t) =
		(int (*)(void *, size_t))sp_next_sym(&slot, "munmap");

	return f ? f(addr, len) : (int)syscall(SYS_munmap, addr, len);
}

int sys_madvise(void *addr, size_t len, int advice)
{
	static void *_Atomic slot;
	int (*f)(void *, size_t, int) =
		(int (*)(void *, size_t, int))sp_next_sym(&slot, "madvise");

	return f ? f(addr, len, advice)
		 : (int)syscall(SYS_madvise, addr, len, advice);
}

int sys_mlockall(int flags)
{
	static void *_Atomic slot;
	int (*f)(int) = (int (*)(int))sp_next_sym(&slot, "mlockall");

	return f ? f(flags) : (int)syscall(SYS_mlockall, flags);
}

/*
 * The agent's own mappings must never be faulted in wholesale.  The
 * scratch area is registered with userfaultfd: a fault on a hole there
 * waits for the agent, and the program's mlockall(2) would wait forever.
 * A read fault on the pool view allocates a page for each hole of the
 * pool file, which is as big as RAM.  mlockall(MCL_CURRENT) faults in
 * every mapping it locks; after mlockall(MCL_FUTURE) every new mapping
 * is locked and faulted in; mprotect(2) faults in a locked private
 * mapping it makes writable.  A PROT_NONE mapping is never faulted in,
 * nor is one unlocked or locked on fault (MLOCK_ONFAULT) by mprotect.
 * So the agent maps its own PROT_NONE and settles them (agent_settle);
 * and hides them (agent_hide_own) around mlockall.  A core dump reads
 * every page of a shared mapping, faulting in the pool view too (a core
 * file as big as RAM): they are left out of dumps.
 */
int agent_settle(void *p, size_t len, int prot, bool lock)
{
	if ((lock ? syscall(SYS_mlock2, p, len, MLOCK_ONFAULT)
		  : syscall(SYS_munlock, p, len)) < 0 ||
	    syscall(SYS_mprotect, p, len, prot) < 0)
		return -errno;
	return 0;
}

static void *own_map_at(void *at, size_t len, int prot, int flags, int fd,
			bool lock)
{
	void *p = sys_mmap(at, len, PROT_NONE, flags, fd, 0);
	int r;

	if (p == MAP_FAILED)
		return p;
	r = sys_madvise(p, len, MADV_DONTDUMP) < 0 ? -errno
						   : agent_settle(p, len, prot,
								  lock);
	if (r == 0)
		return p;
	sys_munmap(p, len);
	errno = -r;
	return MAP_FAILED;
}

static void *own_map(size_t len, int prot, int flags, int fd, bool lock)
{
	return own_map_at(NULL, len, prot, flags, fd, lock);
}

/*
 * The window for the agent's short-lived copies (merge.c, stage_map)
 * has a hole for a moment whenever a copy leaves it, until the hole is
 * reserved again.  The kernel places a mapping in the highest gap that
 * fits, from the top of the mmap area down (or from its base up, in the
 * legacy layout), so the window goes 256 GiB below where a mapping would
 * be placed now: no other thread's mmap comes down that far while there
 * is room above.  Where that address is taken, wherever the kernel puts
 * it.
 */
static void *map_stage(void)
{
	const uintptr_t below = (uintptr_t)256 << 30;
	int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
	void *probe = sys_mmap(NULL, SP_STAGE_MAP, PROT_NONE, flags, -1, 0);
	void *p;

	if (probe != MAP_FAILED) {
		sys_munmap(probe, SP_STAGE_MAP);
		if ((uintptr_t)probe > 2 * below) {
			p = own_map_at((void *)((uintptr_t)probe - below),
				       SP_STAGE_MAP, PROT_NONE,
				       flags | MAP_FIXED_NOREPLACE, -1, false);
			if (p == (void *)((uintptr_t)probe - below))
				return p;
			if (p != MAP_FAILED)	/* NOREPLACE taken as a hint */
				sys_munmap(p, SP_STAGE_MAP);
		}
	}
	return own_map(SP_STAGE_MAP, PROT_NONE, flags, -1, false);
}

/*
 * Around the program's mlockall: PROT_NONE, then back, unlocked (the
 * pool view) or locked on fault (scratch, once the program's memory is
 * locked: UFFDIO_MOVE moves only between two locked mappings or two
 * unlocked ones).
 */
void agent_hide_own(struct sp_agent *a, bool hide)
{
	struct { void *p; size_t len; int prot; bool lock; } own[] = {
		{ a->pool, a->pool_bytes, PROT_READ, false },
		{ a->scratch, SP_SCRATCH_MAP, PROT_READ | PROT_WRITE,
		  a->scratch_locked },
	};

	for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++) {
		if (!own[i].p)
			continue;
		if (hide)
			syscall(SYS_mprotect, own[i].p, own[i].len, PROT_NONE);
		else if (agent_settle(own[i].p, own[i].len, own[i].prot,
				      own[i].lock) < 0)
			log_warn("cannot restore the agent's mapping at %p",
				 own[i].p);
	}
}

void agent_notify(struct sp_agent *a, int type, uintptr_t s, uintptr_t e)
{
	struct sp_range r = { s, e - s };

	if (a->active && s < e && sp_send(a->sock, type, &r, sizeof(r)) < 0)
		log_debug("notify daemon failed");
}

/* The descriptors the agent keeps, out of the program's reach (fds.c);
 * the pool's is last. */
#define NFDS 8
static void agent_fds(struct sp_agent *a, int *f[NFDS])
{
	int *all[NFDS] = { &a->sock,   &a->uffd,  &a->pagemap,	 &a->mapsfd,
			   &a->memfd, &a->wakefd[0], &a->wakefd[1], &a->poolfd };

	memcpy(f, all, sizeof(all));
}

/* With the lock held: one of ours now has another number (fds.c). */
void agent_fd_moved(struct sp_agent *a, int from, int to)
{
	int *f[NFDS];

	agent_fds(a, f);
	for (size_t i = 0; i < NFDS; i++)
		if (*f[i] == from)
			*f[i] = to;
	/* the agent's poll may be waiting on the old number */
	if (a->wakefd[1] >= 0 && write(a->wakefd[1], "r", 1) < 0)
		log_debug("cannot wake the agent");
}

static void keep_fds(struct sp_agent *a)
{
	int *f[NFDS];

	agent_fds(a, f);
	for (size_t i = 0; i < NFDS; i++)
		*f[i] = sp_fd_keep(*f[i]);
}

/* All but the pool's, which stays for the pool mappings' sake until a
 * new daemon sends its own. */
static void close_fds(struct sp_agent *a)
{
	int *f[NFDS];

	agent_fds(a, f);
	for (size_t i = 0; i < NFDS - 1; i++)
		sp_fd_close(f[i]);
}

/*
 * The program's threads take the agent lock through agent_lock, and the
 * agent's thread lets them in between the items of a batch.  A batch
 * holds the lock for up to 64 items, and batches come back to back while
 * there is much to merge; glibc's mutex is not fair, and the agent's
 * thread, running, took it again before a woken waiter could: a program
 * thread's mmap and munmap waited up to 194 ms, against 0.4 ms with
 * merging off (memfill mmaplat, 40,000 single pages merging).
 */
void agent_lock(struct sp_agent *a)
{
	atomic_fetch_add(&a->waiters, 1);
	pthread_mutex_lock(&a->lock);
	atomic_fetch_sub(&a->waiters, 1);
}

/* Under the lock, between items: let waiting program threads in first.
 * Scratch is emptied first, so they find the agent as between batches
 * (fork, mlockall); only MERGE_DONE waits for the end of the batch. */
void agent_let_in(struct sp_agent *a)
{
	if (!atomic_load(&a->waiters))
		return;
	agent_release_scratch(a);
	pthread_mutex_unlock(&a->lock);
	/* until each has taken the lock (and counted itself out), 5 ms at
	 * most: a program that keeps calling must not stop merging */
	for (uint64_t t0 = sp_now_ms();
	     atomic_load(&a->waiters) && sp_now_ms() - t0 < 5;)
		sched_yield();
	pthread_mutex_lock(&a->lock);
}

static void handle_merge(struct sp_agent *a, const struct sp_msg *m)
{
	struct {
		struct sp_merge_done d;
		struct sp_item_result r[SP_BATCH_ITEMS];
	} out;
	uint32_t i, k, n = m->merge->nitems;
	const struct sp_item *outside;

	memset(&out, 0, sizeof(out));
	pthread_mutex_lock(&a->lock);
	/* single pages go in groups (merge.c, merge_group) */
	for (i = 0; i < n; i += k, agent_let_in(a)) {
		k = (uint32_t)agent_merge_items(a, &m->items[i], &out.r[i],
						n - i, &outside);
		if (outside && !a->warned_pool) {
			a->warned_pool = 1;
			log_warnx("daemon sent an item outside the pool "
				  "(slot %llu + %u, pool %llu pages); skipped",
				  (unsigned long long)outside->pgoff,
				  outside->npages,
				  (unsigned long long)(a->pool_bytes / SP_PAGE));
		}
	}
	agent_release_scratch(a);	/* (out of the twin's copy too) */
	agent_merge_again(a, m->items, out.r, m->merge->nitems);
	agent_release_scratch(a);
	agent_drop_view(a, false);	/* once a second: see merge.c */
	out.d.figs = a->figs;
	out.d.batch = m->merge->batch;
	out.d.nitems = m->merge->nitems;
	/* Sent under the lock, so the daemon hears of these merges before
	 * any munmap of the same pages that follows the batch.  One let in
	 * between its items may come first: the daemon skips pages it no
	 * longer knows (client_apply), and a page mapped and registered
	 * again there is seen as a page of the program's own (CoW broken)
	 * at the next scan. */
	sp_send(a->sock, SP_MERGE_DONE, &out,
		sizeof(out.d) + out.d.nitems * sizeof(out.r[0]));
	pthread_mutex_unlock(&a->lock);
}

static void handle_unmerge(struct sp_agent *a)
{
	struct sp_figs f;

	pthread_mutex_lock(&a->lock);
	agent_unmerge_all(a);
	f = a->figs;
	sp_send(a->sock, SP_UNMERGE_DONE, &f, sizeof(f));
	pthread_mutex_unlock(&a->lock);
}

/* How long to wait for the daemon: for ever, unless a sweep (merge-any)
 * or the pool view (merge.c, agent_drop_view) is due. */
static int poll_ms(const struct sp_agent *a, uint64_t now)
{
	uint64_t due = agent_view_due_ms(a);
	int ms = a->merge_any ? 1000 : -1;

	if (due != UINT64_MAX) {
		uint64_t left = due > now ? due - now + 1 : 0;

		if (ms < 0 || left < (uint64_t)ms)
			ms = (int)left;
	}
	return ms;
}

static void *agent_main(void *arg)
{
	struct sp_agent *a = arg;
	static uint64_t buf[SP_MSG_MAX / 8];
	struct pollfd pfd[2] = { { -1, POLLIN, 0 }, { -1, POLLIN, 0 } };

	a->tid = (pid_t)syscall(SYS_gettid);	/* read after a join */
	for (;;) {
		struct sp_msg m;
		ssize_t n;
		uint64_t now = sp_now_ms();
		char why;

		/* The numbers change when the program dup2s onto one (fds.c) */
		pthread_mutex_lock(&a->lock);
		pfd[0].fd = a->sock;
		pfd[1].fd = a->wakefd[0];
		pthread_mutex_unlock(&a->lock);

		if (a->merge_any && now >= a->sweep_at_ms) {
			pthread_mutex_lock(&a->lock);
			if (a->merge_any)
				agent_sweep_any(a);
			pthread_mutex_unlock(&a->lock);
		}
		/* pool pages left in the view since a batch (merge.c) */
		if (now >= agent_view_due_ms(a)) {
			pthread_mutex_lock(&a->lock);
			agent_drop_view(a, true);
			pthread_mutex_unlock(&a->lock);
		}
		if (poll(pfd, 2, poll_ms(a, now)) < 0 && errno != EINTR)
			break;
		if (pfd[1].revents) {
			/* from the pipe's number now (non-blocking) */
			pthread_mutex_lock(&a->lock);
			n = read(a->wakefd[0], &why, 1);
			pthread_mutex_unlock(&a->lock);
			if (n == 0 || (n == 1 && why == 'x'))
				return NULL;	/* samepage_shutdown() */
			if (n == 1 && why == 'p')
				return NULL;	/* agent_pause() */
			continue;	/* a descriptor moved */
		}
		if (!pfd[0].revents)
			continue;
		/* Under the lock, from the socket's number now: never from
		 * the program's file that took its old one. */
		pthread_mutex_lock(&a->lock);
		n = sp_recv_flags(a->sock, buf, sizeof(buf), NULL,
				  MSG_DONTWAIT);
		pthread_mutex_unlock(&a->lock);
		if (n == -EAGAIN)
			continue;
		if (n <= 0)
			break;
		if (sp_decode(buf, (size_t)n, &m) < 0) {
			log_warnx("bad message from daemon; disconnecting");
			break;
		}
		if (m.type == SP_MERGE)
			handle_merge(a, &m);
		else if (m.type == SP_UNMERGE)
			handle_unmerge(a);
	}
	pthread_mutex_lock(&a->lock);
	a->active = 0;
	sp_fd_close(&a->sock);
	pthread_mutex_unlock(&a->lock);
	log_warnx("daemon went away: merging stopped, merged memory stays "
		  "valid");
	return NULL;
}

static int hello(struct sp_agent *a)
{
	static uint64_t buf[SP_MSG_MAX / 8];
	struct sp_hello h = { .pid = getpid(), .safety = (uint32_t)a->safety };
	struct stat st;
	struct timeval tv = { 5, 0 };
	struct sp_msg m;
	ssize_t n;
	int fd, r;

	prctl(PR_GET_NAME, h.comm);
	setsockopt(a->sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	tv.tv_sec = 2;
	setsockopt(a->sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	r = sp_send(a->sock, SP_HELLO, &h, sizeof(h));
	if (r < 0)
		return r;
	n = sp_recv(a->sock, buf, sizeof(buf), &fd);
	if (n <= 0)
		return n ? (int)n : -ECONNRESET;
	if (sp_decode(buf, (size_t)n, &m) < 0 || m.type != SP_WELCOME ||
	    fd < 0) {
		if (m.type == SP_ERROR)
			log_warnx("daemon refused this process: %s",
				  m.u.error->msg);
		sp_fd_close(&fd);
		return -EPROTO;
	}
	tv.tv_sec = 0;
	setsockopt(a->sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	sp_fd_close(&a->poolfd);
	a->poolfd = fd;
	a->pool_ino = fstat(fd, &st) == 0 ? (uint64_t)st.st_ino : 0;
	a->pool_bytes = m.u.welcome->pool_bytes;
	a->daemon_pid = m.u.welcome->daemon_pid;
	return 0;
}

static int map_pool_and_scratch(struct sp_agent *a)
{
	size_t slen = SP_SCRATCH_MAP;

	if (a->pool)
		sys_munmap(a->pool, a->pool_bytes);
	a->pool = own_map(a->pool_bytes, PROT_READ,
			  MAP_SHARED | MAP_NORESERVE, a->poolfd, false);
	if (a->pool == MAP_FAILED) {
		a->pool = NULL;
		return -errno;
	}
	if (!a->scratch) {
		a->scratch = own_map(slen, PROT_READ | PROT_WRITE,
				     MAP_PRIVATE | MAP_ANONYMOUS |
					     MAP_NORESERVE,
				     -1, a->scratch_locked);
		if (a->scratch == MAP_FAILED) {
			a->scratch = NULL;
			return -errno;
		}
		sys_madvise(a->scratch, slen, MADV_NOHUGEPAGE);
	}
	if (!a->stage) {
		a->stage = map_stage();
		if (a->stage == MAP_FAILED) {
			a->stage = NULL;
			return -errno;
		}
	}
	if (!a->cmpbuf) {
		a->cmpbuf = sys_mmap(NULL, 2 * SP_CMP_PAGES * SP_PAGE,
				     PROT_READ | PROT_WRITE,
				     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (a->cmpbuf == MAP_FAILED) {
			a->cmpbuf = NULL;
			return -errno;
		}
		/* Empty in a twin (merge.c) or a child: fork leaves the
		 * pages of a MADV_WIPEONFORK mapping alone, where it would
		 * write-protect them, and each of the 128 would cost a
		 * fault on the next comparison after every twin.  The child
		 * still has the mapping, so its agent can go on using it. */
		sys_madvise(a->cmpbuf, 2 * SP_CMP_PAGES * SP_PAGE,
			    MADV_WIPEONFORK);
	}
	sys_madvise(a->scratch, slen, MADV_DONTNEED);
	a->scratch_used = 0;
	return uffd_register(a->uffd, (uintptr_t)a->scratch, slen,
			     UFFDIO_REGISTER_MODE_MISSING);
}

static void add_own(struct sp_agent *a, uintptr_t s, uintptr_t e)
{
	if (a->nown < sizeof(a->own) / sizeof(a->own[0]) && s < e) {
		a->own[a->nown][0] = s & ~(SP_PAGE - 1);
		a->own[a->nown][1] = (e + SP_PAGE - 1) & ~(SP_PAGE - 1);
		a->nown++;
	}
}

/* This library's loaded segments (its .bss is anonymous memory). */
static int own_segments(struct dl_phdr_info *info, size_t size, void *arg)
{
	struct sp_agent *a = arg;
	uintptr_t me = (uintptr_t)&sp_agent;
	bool mine = false;

	(void)size;
	for (int i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t s = info->dlpi_addr + ph->p_vaddr;

		if (ph->p_type == PT_LOAD && me >= s && me < s + ph->p_memsz)
			mine = true;
	}
	for (int i = 0; mine && i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t s = info->dlpi_addr + ph->p_vaddr;

		if (ph->p_type == PT_LOAD)
			add_own(a, s, s + ph->p_memsz);
	}
	return mine;
}

/* What the agent itself touches while merging (see struct sp_agent). */
static void find_own(struct sp_agent *a)
{
	pthread_attr_t attr;
	void *stack;
	size_t size;

	a->nown = 0;
	dl_iterate_phdr(own_segments, a);
	if (pthread_getattr_np(a->thread, &attr) == 0) {
		if (pthread_attr_getstack(&attr, &stack, &size) == 0)
			add_own(a, (uintptr_t)stack, (uintptr_t)stack + size);
		pthread_attr_destroy(&attr);
	}
}

bool agent_owns(const struct sp_agent *a, uintptr_t s, uintptr_t e)
{
	uintptr_t t;
	size_t len;

	rg_storage(&a->regions, &t, &len);
	if ((s < t + len && e > t) ||
	    (a->scratch && s < (uintptr_t)a->scratch + SP_SCRATCH_MAP &&
	     e > (uintptr_t)a->scratch) ||
	    (a->cmpbuf && s < (uintptr_t)a->cmpbuf +
				      2 * SP_CMP_PAGES * SP_PAGE &&
	     e > (uintptr_t)a->cmpbuf) ||
	    (a->stage && s < (uintptr_t)a->stage + SP_STAGE_MAP &&
	     e > (uintptr_t)a->stage))
		return true;
	for (size_t i = 0; i < a->nown; i++)
		if (s < a->own[i][1] && e > a->own[i][0])
			return true;
	return false;
}

static void register_all(struct sp_agent *a)
{
	for (size_t i = 0; i < a->regions.n; i++)
		if (a->regions.v[i].flags & RG_MERGEABLE)
			agent_notify(a, SP_REG, a->regions.v[i].start,
				     a->regions.v[i].end);
}

/*
 * UFFDIO_MOVE (Linux 6.8) keeps writes out of a page while it is
 * compared and replaced, and refuses pages pinned for I/O.  Without it
 * the agent can write-protect the page instead, but cannot tell a pinned
 * one: what a device writes into it after the merge would be lost.  So
 * that fallback is used only when the user asks for it
 * (SAMEPAGE_NO_PIN_CHECK=1) and the status says so.
 */
static int open_uffd(struct sp_agent *a)
{
	struct uffd_caps caps = { 0 };
	const char *opt = getenv("SAMEPAGE_NO_PIN_CHECK");
	bool wp_ok = opt && !strcmp(opt, "1");
	int fd = uffd_open(&caps, agent_fault("nomove"));

	if (fd < 0) {
		errno = -fd;
		log_warn("cannot use /dev/userfaultfd, merging is off (run "
			 "as root, or: setfacl -m u:$USER:rw /dev/userfaultfd)");
		return fd;
	}
	if (!caps.move && (!wp_ok || !caps.anon_wp)) {
		close(fd);
		if (!wp_ok)
			log_warnx("this kernel lacks UFFDIO_MOVE (Linux 6.8 or "
				  "later is needed); merging is off (or set "
				  "SAMEPAGE_NO_PIN_CHECK=1 to merge by "
				  "write-protection, which cannot see pages "
				  "pinned for O_DIRECT, io_uring or device I/O)");
		else
			log_warnx("this kernel has neither UFFDIO_MOVE nor "
				  "userfaultfd write-protection (Linux 5.13); "
				  "merging is off");
		return -EOPNOTSUPP;
	}
	if (!caps.move)
		log_warnx("this kernel lacks UFFDIO_MOVE: merging by "
			  "write-protection, without the pinned-page check "
			  "(SAMEPAGE_NO_PIN_CHECK=1)");
	a->uffd = fd;
	a->safety = caps.move ? SP_SAFETY_MOVE : SP_SAFETY_WP;
	a->shmem_wp = caps.shmem_wp;
	return 0;
}

/*
 * The agent thread's stack, whatever the program's default: glibc sizes
 * a thread's stack by RLIMIT_STACK (or pthread_setattr_default_np), and
 * merging written pages again takes about 60 KiB of it (arrays of
 * AGAIN_PAGES, merge.c).  Only what is touched is memory, but for a
 * program under mlockall(2), where all of it is.
 */
static const size_t agent_stack = 1 << 20;

/*
 * The agent's thread blocks every signal.  A signal sent to the process
 * goes to any thread that does not block it: programs that block one in
 * their threads to take it with sigwait or signalfd (QEMU does so with
 * SIGIO and SIGALRM) would lose it to ours, or die of its default
 * action.  And a handler run here would wait forever on a page this
 * thread has moved out, or on the agent lock it holds.
 */
static int start_thread(struct sp_agent *a)
{
	sigset_t all, old;
	pthread_attr_t attr;
	int r;

	r = pthread_attr_init(&attr);
	if (r)
		return r;
	r = pthread_attr_setstacksize(&attr, agent_stack);
	if (!r) {
		sigfillset(&all);
		pthread_sigmask(SIG_SETMASK, &all, &old);
		r = pthread_create(&a->thread, &attr, agent_main, a);
		pthread_sigmask(SIG_SETMASK, &old, NULL);
	}
	pthread_attr_destroy(&attr);
	return r;
}

/* Start with the lock held.  Leaves the agent off on any failure. */
static int agent_start(struct sp_agent *a)
{
	int r, lim;

	a->tracking = 1;
	a->pid = getpid();
	agent_merge_init();
	r = open_uffd(a);
	if (r < 0)
		return r;
	a->pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	a->mapsfd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
	a->memfd = open("/proc/self/mem", O_RDWR | O_CLOEXEC);
	a->sock = sp_connect(a->sockpath);
	if (a->sock < 0) {
		r = a->sock;
		errno = -r;
		log_warn("no samepage daemon at %s, merging is off (start "
			 "one with 'samepaged', or use 'samepage run')",
			 a->sockpath);
		goto fail;
	}
	r = hello(a);
	if (r == 0)
		r = map_pool_and_scratch(a);
	if (r < 0) {
		errno = -r;
		log_warn("cannot join the daemon at %s", a->sockpath);
		goto fail;
	}
	lim = sp_max_map_count();
	a->map_limit = (uint64_t)lim;
	a->figs.map_budget = (uint64_t)(lim - lim / map_reserve_div);
	agent_recount_maps(a);
	if (pipe2(a->wakefd, O_CLOEXEC | O_NONBLOCK) < 0) {
		r = -EAGAIN;
		goto fail;
	}
	keep_fds(a);
	if (start_thread(a) != 0) {
		r = -EAGAIN;
		goto fail;
	}
	/* Visible in top -H and /proc/PID/task/TID/comm: CPU spent merging
	 * inside the program can be told from the program's own. */
	pthread_setname_np(a->thread, "samepage-agent");
	a->thread_started = 1;
	find_own(a);
	a->active = 1;
	register_all(a);
	if (a->merge_any)
		agent_sweep_any(a);	/* --all: what libc mapped already */
	return 0;
fail:
	close_fds(a);
	return r;
}

static void atfork_prepare(void)
{
	agent_lock(&sp_agent);
}

static void atfork_parent(void)
{
	pthread_mutex_unlock(&sp_agent.lock);
}

/* The child has the parent's regions but none of its connection: the
 * userfaultfd and pagemap descriptors still speak for the parent. */
static void atfork_child(void)
{
	struct sp_agent *a = &sp_agent;
	int was_active = a->active;

	a->active = 0;
	a->thread_started = 0;
	/* locks are not inherited */
	a->locked_all = a->def_locked = a->scratch_locked = 0;
	close_fds(a);
	if (was_active && !getenv("SAMEPAGE_NO_FORK_RESTART"))
		agent_start(a);
	pthread_mutex_unlock(&a->lock);
}

SAMEPAGE_API int samepage_init(const char *socket_path)
{
	struct sp_agent *a = &sp_agent;
	static int atfork_done;
	int r;

	agent_lock(a);
	if (a->active) {
		pthread_mutex_unlock(&a->lock);
		return 0;
	}
	if (socket_path)
		r = snprintf(a->sockpath, sizeof(a->sockpath), "%s",
			     socket_path) >= (int)sizeof(a->sockpath)
			    ? -ENAMETOOLONG : 0;
	else
		r = sp_default_socket(a->sockpath, sizeof(a->sockpath));
	if (r == 0)
		r = agent_start(a);
	if (!atfork_done) {
		pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
		atfork_done = 1;
	}
	pthread_mutex_unlock(&a->lock);
	return r;
}

SAMEPAGE_API void samepage_shutdown(void)
{
	struct sp_agent *a = &sp_agent;
	pthread_t t;
	int started;

	agent_lock(a);
	started = a->thread_started;
	t = a->thread;
	if (started && a->wakefd[1] >= 0 && write(a->wakefd[1], "x", 1) < 0)
		started = 0;
	a->thread_started = 0;
	pthread_mutex_unlock(&a->lock);
	if (started)
		pthread_join(t, NULL);
	agent_lock(a);
	a->active = 0;
	sp_fd_close(&a->sock);
	sp_fd_close(&a->wakefd[0]);
	sp_fd_close(&a->wakefd[1]);
	pthread_mutex_unlock(&a->lock);
}

/*
 * pthread_join returns once the kernel has cleared the thread's tid, a
 * little before the thread leaves its group: until then unshare still
 * counts it (test_unshare_user_namespace saw EINVAL).  So wait, 100 ms
 * at most, for /proc to stop listing it.
 */
static void wait_until_left(pid_t tid)
{
	char path[48];

	snprintf(path, sizeof(path), "/proc/self/task/%d", (int)tid);
	for (int i = 0; i < 2000 && access(path, F_OK) == 0; i++)
		usleep(50);
}

/*
 * unshare(CLONE_NEWUSER), and setns into a user or mount namespace, are
 * refused (EINVAL) to a process of more than one thread, which the
 * agent's makes of every program under samepage.  So the interposers
 * (interpose.c) stop the thread around such a call and start it again;
 * the connection, the userfaultfd and the regions stay, and messages
 * from the daemon wait in the socket meanwhile.  Returns whether the
 * thread was stopped.  Not under the lock: the thread takes it.
 */
bool agent_pause(struct sp_agent *a)
{
	pthread_t t;
	bool stop;

	agent_lock(a);
	stop = a->thread_started && a->wakefd[1] >= 0 &&
	       write(a->wakefd[1], "p", 1) == 1;
	t = a->thread;
	if (stop)
		a->thread_started = 0;
	pthread_mutex_unlock(&a->lock);
	if (stop) {
		pthread_join(t, NULL);
		wait_until_left(a->tid);
	}
	return stop;
}

void agent_resume(struct sp_agent *a)
{
	agent_lock(a);
	if (a->active && !a->thread_started && start_thread(a) == 0) {
		pthread_setname_np(a->thread, "samepage-agent");
		a->thread_started = 1;
	}
	pthread_mutex_unlock(&a->lock);
}

static void default_log(int level, const char *msg, void *arg SP_UNUSED)
{
	(void)level;
	(void)msg;
}

SAMEPAGE_API void samepage_set_log(samepage_log_fn fn, void *arg)
{
	log_set_fn(fn ? fn : default_log, arg);
}

SAMEPAGE_API int samepage_agent_stats(struct samepage_agent_stats *st)
{
	struct sp_agent *a = &sp_agent;

	if (!st)
		return -EINVAL;
	agent_lock(a);
	st->active = a->active;
	st->safety = a->safety;
	st->merged_pages = a->merged_pages;
	st->zero_pages = a->zero_pages;
	st->pinned_skipped = a->figs.pinned_skipped;
	st->changed_skipped = a->figs.changed_skipped;
	st->mappings = a->figs.mappings;
	st->map_budget = a->figs.map_budget;
	st->budget_refusals = a->figs.budget_refusals;
	pthread_mutex_unlock(&a->lock);
	return 0;
}
