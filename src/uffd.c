/*
 * uffd.c - userfaultfd: open it and wrap the ioctls samepage uses.
 *
 * The installed headers predate UFFDIO_MOVE (Linux 6.8), so its ABI is
 * defined here behind #ifndef.  Nothing here decides anything; merge.c
 * does.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sp.h"

#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#define _UFFDIO_MOVE (0x05)
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
struct uffdio_move {
	__u64 dst;
	__u64 src;
	__u64 len;
	__u64 mode;
	__s64 move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif

static int uffd_new(void)
{
	int dev, fd;

	/* Kernel-mode faults (read(2) into a page being merged, O_DIRECT)
	 * must block like user faults, so never UFFD_USER_MODE_ONLY. */
	dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev >= 0) {
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		close(dev);
		if (fd >= 0)
			return fd;
	}
	fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	return fd < 0 ? -errno : fd;
}

/*
 * Open a userfaultfd with the features samepage uses, as far as the
 * kernel has them; *caps says which.  no_move: leave UFFDIO_MOVE out,
 * as on a kernel without it (SAMEPAGE_FAULT=nomove, for the tests).
 */
int uffd_open(struct uffd_caps *caps, bool no_move)
{
	struct uffdio_api api = { .api = UFFD_API };
	int fd = uffd_new();

	if (fd < 0)
		return fd;
	/* First ask what the kernel has, then enable what we use. */
	if (ioctl(fd, UFFDIO_API, &api) < 0) {
		int err = -errno;

		close(fd);
		return err;
	}
	caps->move = !no_move && (api.features & UFFD_FEATURE_MOVE);
	caps->shmem_wp = (api.features & UFFD_FEATURE_WP_HUGETLBFS_SHMEM) != 0;
	caps->anon_wp = (api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP) != 0;
	close(fd);
	fd = uffd_new();
	if (fd < 0)
		return fd;
	api.api = UFFD_API;
	api.features = (caps->move ? UFFD_FEATURE_MOVE : 0) |
		       (caps->shmem_wp ? UFFD_FEATURE_WP_HUGETLBFS_SHMEM : 0);
	if (ioctl(fd, UFFDIO_API, &api) < 0) {
		int err = -errno;

		close(fd);
		return err;
	}
	return fd;
}

/* mode: UFFDIO_REGISTER_MODE_MISSING and/or _WP (on shmem too, 5.19) */
int uffd_register(int uffd, uintptr_t s, size_t len, unsigned mode)
{
	struct uffdio_register r = {
		.range = { s, len },
		.mode = mode,
	};

	return ioctl(uffd, UFFDIO_REGISTER, &r) < 0 ? -errno : 0;
}

/* Make every write to [s, s + len) wait in the kernel until woken. */
int uffd_writeprotect(int uffd, uintptr_t s, size_t len)
{
	struct uffdio_writeprotect w = {
		.range = { s, len },
		.mode = UFFDIO_WRITEPROTECT_MODE_WP,
	};

	return ioctl(uffd, UFFDIO_WRITEPROTECT, &w) < 0 ? -errno : 0;
}

int uffd_unregister(int uffd, uintptr_t s, size_t len)
{
	struct uffdio_range r = { s, len };

	return ioctl(uffd, UFFDIO_UNREGISTER, &r) < 0 ? -errno : 0;
}

int uffd_wake(int uffd, uintptr_t s, size_t len)
{
	struct uffdio_range r = { s, len };

	return ioctl(uffd, UFFDIO_WAKE, &r) < 0 ? -errno : 0;
}

int uffd_move(int uffd, uintptr_t dst, uintptr_t src, size_t len,
	      size_t *moved)
{
	struct uffdio_move m = {
		.dst = dst, .src = src, .len = len,
		.mode = UFFDIO_MOVE_MODE_DONTWAKE,
	};
	int r = ioctl(uffd, UFFDIO_MOVE, &m);

	*moved = m.move > 0 ? (size_t)m.move : 0;
	if (r < 0)
		return -errno;
	*moved = len;
	return 0;
}

int uffd_zeropage(int uffd, uintptr_t s, size_t len)
{
	struct uffdio_zeropage z = {
		.range = { s, len },
		.mode = UFFDIO_ZEROPAGE_MODE_DONTWAKE,
	};

	return ioctl(uffd, UFFDIO_ZEROPAGE, &z) < 0 ? -errno : 0;
}

int uffd_copy(int uffd, uintptr_t dst, uintptr_t src, size_t len)
{
	struct uffdio_copy c = {
		.dst = dst, .src = src, .len = len,
		.mode = UFFDIO_COPY_MODE_DONTWAKE,
	};

	return ioctl(uffd, UFFDIO_COPY, &c) < 0 ? -errno : 0;
}

/*
 * Is [dst, dst + len) empty and in one VMA registered with this
 * userfaultfd?  A move of nothing (from hole, an empty registered range,
 * holes allowed) checks exactly that: 0 if so; -EINVAL where the VMA is
 * not ours (or the range crosses a VMA boundary), -ENOENT where nothing
 * is mapped, -EEXIST where a page is present.
 */
int uffd_is_hole(int uffd, uintptr_t dst, uintptr_t hole, size_t len)
{
	struct uffdio_move m = {
		.dst = dst, .src = hole, .len = len,
		.mode = UFFDIO_MOVE_MODE_DONTWAKE |
			UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES,
	};

	return ioctl(uffd, UFFDIO_MOVE, &m) < 0 ? -errno : 0;
}
