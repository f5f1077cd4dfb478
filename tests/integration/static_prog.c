/*
 * static_prog.c - a statically linked program that asks for merging:
 * `samepage run` cannot preload the agent into it and must say so.
 * Exits 5 when madvise answered (the kernel's), 1 if mmap failed.
 */
#include <stdio.h>
#include <sys/mman.h>

int main(void)
{
	size_t len = 1 << 20;
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return 1;
	printf("madvise %d\n", madvise(p, len, MADV_MERGEABLE));
	return 5;
}
