/*
 * util.c - small helpers: pagemap, socket paths, packet I/O.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "sp.h"

int sp_pagemap_read(int fd, uintptr_t addr, size_t npages, uint64_t *out)
{
	size_t want = npages * sizeof(uint64_t), got = 0;
	off_t off = (off_t)(addr >> SP_PAGE_SHIFT) * 8;

	while (got < want) {
		ssize_t n = pread(fd, (char *)out + got, want - got,
				  off + (off_t)got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO;
		got += (size_t)n;
	}
	return 0;
}

/*
 * Read the n pages at addr[i] of process pid into buf + i * SP_PAGE, and
 * say in ok[i] which were read; returns how many.  process_vm_readv pins
 * what it reads, and the kernel makes a page it pins the process's own
 * first: a page shared after fork (or merged by kernel KSM) would be
 * copied in the target, doubling the memory it reads (measured: pagemap's
 * exclusive bit set after one process_vm_readv).  So pages pm[i] shows
 * not mapped exclusively are read through mem, the process's
 * /proc/PID/mem, which takes a plain reference and copies nothing.
 * Consecutive pages are one piece of the read: the kernel takes the
 * program's mmap lock once per piece, and the agent, mapping pool pages
 * meanwhile, waits for it each time (scattered at full speed, two runs
 * each: 2.5 and 2.8 s to 95% against 3.2 and 3.6 with a piece a page).
 */
size_t sp_read_pages(pid_t pid, int mem, const uintptr_t *addr,
		     const uint64_t *pm, size_t n, uint8_t *buf, uint8_t *ok)
{
	struct iovec lio[SP_ITEM_PAGES], rio[SP_ITEM_PAGES];
	size_t nl = 0, got = 0, k, j, done;
	ssize_t r;

	SP_ASSERT(n <= SP_ITEM_PAGES);
	for (k = 0; k < n; k++) {
		ok[k] = 0;
		if (!(pm[k] & PM_EXCL))
			continue;
		if (nl && (uint8_t *)lio[nl - 1].iov_base + lio[nl - 1].iov_len ==
				  buf + k * SP_PAGE &&
		    (uintptr_t)rio[nl - 1].iov_base + rio[nl - 1].iov_len ==
			    addr[k]) {
			lio[nl - 1].iov_len += SP_PAGE;
			rio[nl - 1].iov_len += SP_PAGE;
			continue;
		}
		lio[nl] = (struct iovec){ buf + k * SP_PAGE, SP_PAGE };
		rio[nl] = (struct iovec){ (void *)addr[k], SP_PAGE };
		nl++;
	}
	r = nl ? process_vm_readv(pid, lio, nl, rio, nl, 0) : 0;
	done = r > 0 ? (size_t)r / SP_PAGE : 0;	/* the first done of nl */
	for (k = 0; k < n; k = j) {
		size_t m;

		j = k + 1;
		if (pm[k] & PM_EXCL) {
			if (done) {
				ok[k] = 1;
				done--;
			}
			continue;
		}
		/* consecutive shared pages in one read; it stops short at a
		 * page it cannot read, and the next read starts after it */
		while (j < n && !(pm[j] & PM_EXCL) &&
		       addr[j] == addr[j - 1] + SP_PAGE)
			j++;
		r = mem >= 0 ? pread(mem, buf + k * SP_PAGE, (j - k) * SP_PAGE,
				     (off_t)addr[k])
			     : -1;
		m = r > 0 ? (size_t)r / SP_PAGE : 0;
		memset(ok + k, 1, m);
		if (k + m < j)
			j = k + m + 1;
	}
	for (k = 0; k < n; k++)
		got += ok[k];
	return got;
}

#ifndef PROCMAP_QUERY		/* Linux 6.11; older headers lack it */
struct procmap_query {
	uint64_t size, query_flags, query_addr;
	uint64_t vma_start, vma_end, vma_flags, vma_page_size, vma_offset;
	uint64_t inode;
	uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
	uint64_t vma_name_addr, build_id_addr;
};
#define PROCMAP_QUERY _IOWR('f', 17, struct procmap_query)
#define PROCMAP_QUERY_VMA_READABLE 0x01
#define PROCMAP_QUERY_VMA_WRITABLE 0x02
#define PROCMAP_QUERY_VMA_EXECUTABLE 0x04
#define PROCMAP_QUERY_VMA_SHARED 0x08
#endif

/*
 * Ask the kernel (PROCMAP_QUERY on an open /proc/PID/maps) for the
 * mapping holding addr.  *prot gets its PROT_* bits; -EOPNOTSUPP on
 * kernels before 6.11, -ENOENT if nothing is mapped there.
 */
int sp_vma_query(int mapsfd, uintptr_t addr, struct sp_vma *v)
{
	struct procmap_query q = {
		.size = sizeof(q), .query_addr = addr,
	};

	if (ioctl(mapsfd, PROCMAP_QUERY, &q) < 0)
		return errno == ENOTTY || errno == EINVAL ? -EOPNOTSUPP
							  : -errno;
	v->start = q.vma_start;
	v->end = q.vma_end;
	v->prot = (q.vma_flags & PROCMAP_QUERY_VMA_READABLE ? PROT_READ : 0) |
		  (q.vma_flags & PROCMAP_QUERY_VMA_WRITABLE ? PROT_WRITE : 0) |
		  (q.vma_flags & PROCMAP_QUERY_VMA_EXECUTABLE ? PROT_EXEC : 0);
	v->shared = (q.vma_flags & PROCMAP_QUERY_VMA_SHARED) != 0;
	v->file = q.inode || q.dev_major || q.dev_minor;
	v->inode = q.inode;
	return 0;
}

int sp_default_socket(char *buf, size_t len)
{
	const char *env = getenv("SAMEPAGE_SOCKET");
	const char *rt = getenv("XDG_RUNTIME_DIR");
	int n;

	if (env && *env)
		n = snprintf(buf, len, "%s", env);
	else if (geteuid() == 0)
		n = snprintf(buf, len, "/run/samepage/samepaged.sock");
	else if (rt && *rt)
		n = snprintf(buf, len, "%s/samepage/samepaged.sock", rt);
	else
		n = snprintf(buf, len, "/tmp/samepage-%u/samepaged.sock",
			     (unsigned)geteuid());
	return (n < 0 || (size_t)n >= len) ? -ENAMETOOLONG : 0;
}

int sp_mkdir_parent(const char *path)
{
	char dir[256];
	char *slash;

	if (snprintf(dir, sizeof(dir), "%s", path) >= (int)sizeof(dir))
		return -ENAMETOOLONG;
	slash = strrchr(dir, '/');
	if (!slash || slash == dir)
		return 0;
	*slash = 0;
	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

int sp_send_fd(int fd, int type, const void *payload, size_t plen,
	       int passfd)
{
	/* Header and payload as they are, one packet: no copy into a
	 * buffer of SP_MSG_MAX on the stack, which a program's thread with
	 * a small stack (this runs in its interposed calls) cannot hold. */
	struct sp_hdr h;
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov[2] = { { &h, sizeof(h) },
				{ (void *)(uintptr_t)payload, plen } };
	struct msghdr mh = { 0 };
	int n = sp_header(&h, type, plen);

	if (n < 0)
		return n;
	mh.msg_iov = iov;
	mh.msg_iovlen = plen ? 2 : 1;
	if (passfd >= 0) {
		struct cmsghdr *c;

		memset(cbuf, 0, sizeof(cbuf));
		mh.msg_control = cbuf;
		mh.msg_controllen = sizeof(cbuf);
		c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &passfd, sizeof(int));
	}
	for (;;) {
		ssize_t r = sendmsg(fd, &mh, MSG_NOSIGNAL);
		if (r >= 0)
			return 0;
		if (errno != EINTR)
			return -errno;
	}
}

int sp_send(int fd, int type, const void *payload, size_t plen)
{
	return sp_send_fd(fd, type, payload, plen, -1);
}

ssize_t sp_recv(int fd, void *buf, size_t cap, int *fdp)
{
	return sp_recv_flags(fd, buf, cap, fdp, 0);
}

ssize_t sp_recv_flags(int fd, void *buf, size_t cap, int *fdp, int flags)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { buf, cap };
	struct msghdr mh = { 0 };
	struct cmsghdr *c;
	ssize_t n;

	if (fdp)
		*fdp = -1;
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	mh.msg_control = cbuf;
	mh.msg_controllen = sizeof(cbuf);
	do
		n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC | flags);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	for (c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
			int got;

			memcpy(&got, CMSG_DATA(c), sizeof(int));
			if (fdp && *fdp < 0)
				*fdp = got;
			else
				close(got);
		}
	}
	if (mh.msg_flags & MSG_TRUNC)
		return -EMSGSIZE;
	return n;
}

int sp_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd;

	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int err = -errno;

		close(fd);
		return err;
	}
	return fd;
}

bool sp_page_is_zero(const void *p)
{
	const uint64_t *w = p;
	size_t i;

	for (i = 0; i < SP_PAGE / 8; i += 8) {
		if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] |
		    w[i + 5] | w[i + 6] | w[i + 7])
			return false;
	}
	return true;
}

uint64_t sp_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/*
 * The kernel's count of mappings of process pid (0: this one): the lines
 * of its /proc/PID/maps.  -errno if that cannot be read.  The buffer is
 * static, so that a program thread with a small stack may count (the
 * agent counts under its lock; the daemon has one thread).
 */
long sp_count_maps(pid_t pid)
{
	static char buf[65536];
	char path[64];
	ssize_t got;
	long n = 0;
	int fd;

	if (pid)
		snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
	else
		snprintf(path, sizeof(path), "/proc/self/maps");
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	while ((got = read(fd, buf, sizeof(buf))) > 0)
		for (char *p = buf; (p = memchr(p, '\n', (size_t)(buf + got - p)));
		     p++)
			n++;
	if (got < 0)
		n = -errno;
	close(fd);
	return n;
}

int sp_max_map_count(void)
{
	FILE *f = fopen("/proc/sys/vm/max_map_count", "re");
	int v = 65530;

	if (f) {
		if (fscanf(f, "%d", &v) != 1)
			v = 65530;
		fclose(f);
	}
	return v;
}
