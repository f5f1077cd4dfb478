/*
 * fds.c - the agent's descriptors, kept out of the program's way.
 *
 * The agent holds eight descriptors while it runs: the daemon's socket,
 * the userfaultfd, the pool, pagemap, maps, mem and a wake-up pipe.  A
 * program may close descriptors it never opened: a daemon closes all it
 * inherited (close_range, closefrom, or close in a loop), and the numbers
 * then go to its own files.  The agent would then write to, read from or
 * close the program's files, and a userfaultfd closed under it
 * unregisters its ranges: a page the agent has moved out would read as
 * zeros.
 *
 * So the agent's descriptors are moved above fd_floor (below 1024, out of
 * select's way, above what programs usually reach), close, close_range
 * and closefrom leave them open while the program believes them closed,
 * and dup2 or dup3 onto one first moves it elsewhere.  Calls libc makes
 * internally (freopen's dup3, say) are not seen, and need not be: they
 * act on the program's own descriptors.
 */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "samepage.h"
#include "sp.h"

#ifndef CLOSE_RANGE_UNSHARE
#define CLOSE_RANGE_UNSHARE (1U << 1)
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

#define NOWN 12

static _Atomic int own_fd[NOWN] = { [0 ... NOWN - 1] = -1 };

/* Lowest number for the agent's descriptors. */
static int fd_floor(void)
{
	struct rlimit rl;
	rlim_t top = 1024;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < top)
		top = rl.rlim_cur;
	return top > 3 + 2 * NOWN ? (int)(top - 2 * NOWN) : 3;
}

static bool is_own(int fd)
{
	if (fd < 0)
		return false;
	for (int i = 0; i < NOWN; i++)
		if (atomic_load_explicit(&own_fd[i], memory_order_relaxed) ==
		    fd)
			return true;
	return false;
}

/* Is one of ours in [first, last]?  (Ours move only under the lock.) */
static bool own_in(unsigned first, unsigned last)
{
	for (int i = 0; i < NOWN; i++) {
		int f = atomic_load_explicit(&own_fd[i], memory_order_relaxed);

		if (f >= 0 && (unsigned)f >= first && (unsigned)f <= last)
			return true;
	}
	return false;
}

static int real_close(int fd)
{
	static void *_Atomic slot;
	int (*f)(int) = (int (*)(int))sp_next_sym(&slot, "close");

	return f ? f(fd) : (int)syscall(SYS_close, fd);
}

static int real_close_range(unsigned first, unsigned last, int flags)
{
	static void *_Atomic slot;
	int (*f)(unsigned, unsigned, int) = (int (*)(
		unsigned, unsigned, int))sp_next_sym(&slot, "close_range");

	return f ? f(first, last, flags)
		 : (int)syscall(SYS_close_range, first, last, flags);
}

static int real_dup3(int old, int new, int flags)
{
	static void *_Atomic slot;
	int (*f)(int, int, int) =
		(int (*)(int, int, int))sp_next_sym(&slot, "dup3");

	return f ? f(old, new, flags) : (int)syscall(SYS_dup3, old, new, flags);
}

static int real_dup2(int old, int new)
{
	static void *_Atomic slot;
	int (*f)(int, int) = (int (*)(int, int))sp_next_sym(&slot, "dup2");

	return f ? f(old, new) : (int)syscall(SYS_dup2, old, new);
}

/* A copy of fd at fd_floor or above, close-on-exec; fd itself if none
 * can be made. */
static int move_up(int fd)
{
	int n = fcntl(fd, F_DUPFD_CLOEXEC, fd_floor());

	if (n < 0)
		return fd;
	real_close(fd);
	return n;
}

int sp_fd_keep(int fd)
{
	if (fd < 0)
		return fd;
	if (fd < fd_floor())
		fd = move_up(fd);
	for (int i = 0; i < NOWN; i++) {
		int none = -1;

		if (atomic_compare_exchange_strong(&own_fd[i], &none, fd))
			break;
	}
	return fd;
}

void sp_fd_close(int *fd)
{
	if (*fd < 0)
		return;
	for (int i = 0; i < NOWN; i++) {
		int f = *fd;

		atomic_compare_exchange_strong(&own_fd[i], &f, -1);
	}
	real_close(*fd);
	*fd = -1;
}

SAMEPAGE_API int close(int fd)
{
	if (is_own(fd))
		return 0;	/* the program never had it */
	return real_close(fd);
}

SAMEPAGE_API int close_range(unsigned first, unsigned last, int flags)
{
	struct sp_agent *a = &sp_agent;
	unsigned lo = first;
	int r = 0, calls = 0;

	if ((flags & CLOSE_RANGE_CLOEXEC) || first > last ||
	    !own_in(first, last))
		return real_close_range(first, last, flags);
	agent_lock(a);	/* no descriptor moves meanwhile */
	while (lo <= last && r == 0) {
		unsigned hi = last;

		for (int i = 0; i < NOWN; i++) {
			int f = atomic_load(&own_fd[i]);

			if (f >= 0 && (unsigned)f >= lo && (unsigned)f <= hi)
				hi = (unsigned)f;
		}
		if (is_own((int)hi) && hi <= last) {
			if (hi > lo) {
				r = real_close_range(lo, hi - 1, flags);
				calls++;
			}
		} else {
			r = real_close_range(lo, hi, flags);
			calls++;
		}
		if (hi == ~0U)
			break;
		lo = hi + 1;
	}
	if (r == 0 && !calls && (flags & CLOSE_RANGE_UNSHARE))
		r = unshare(CLONE_FILES);
	pthread_mutex_unlock(&a->lock);
	return r;
}

SAMEPAGE_API void closefrom(int lowfd)
{
	if (lowfd < 0)
		lowfd = 0;
	close_range((unsigned)lowfd, ~0U, 0);
}

/*
 * Before the program's descriptor takes the number of one of ours: ours
 * moves.  With the agent lock held.  Not in a vfork child (another pid,
 * the parent's memory, its own descriptor table): the parent's numbers
 * must not change for a table they are not in.
 */
static int make_room(int fd)
{
	int n;

	if (!is_own(fd) || getpid() != sp_agent.pid)
		return 0;
	n = fcntl(fd, F_DUPFD_CLOEXEC, fd_floor());
	if (n < 0)
		return -1;	/* EMFILE, as dup2 may answer */
	for (int i = 0; i < NOWN; i++) {
		int f = fd;

		atomic_compare_exchange_strong(&own_fd[i], &f, n);
	}
	agent_fd_moved(&sp_agent, fd, n);
	return 0;
}

SAMEPAGE_API int dup2(int old, int new)
{
	struct sp_agent *a = &sp_agent;
	int r;

	if (!is_own(new) || old == new)
		return real_dup2(old, new);
	agent_lock(a);
	r = make_room(new);
	if (r == 0)
		r = real_dup2(old, new);
	pthread_mutex_unlock(&a->lock);
	return r;
}

SAMEPAGE_API int dup3(int old, int new, int flags)
{
	struct sp_agent *a = &sp_agent;
	int r;

	if (!is_own(new) || old == new)
		return real_dup3(old, new, flags);
	agent_lock(a);
	r = make_room(new);
	if (r == 0)
		r = real_dup3(old, new, flags);
	pthread_mutex_unlock(&a->lock);
	return r;
}
