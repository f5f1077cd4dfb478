/*
 * qemu_guest.c - a bare multiboot guest for the QEMU test (test_qemu.py).
 *
 * QEMU loads it with -kernel and enters it in 32-bit protected mode,
 * paging off.  It fills guest RAM from 4 MiB up with pages that are
 * identical in every guest (60%), zero (20%) or unique to this guest
 * (20%), then checks every byte of it, pass after pass, for ever.  Each
 * pass also rewrites the "hot" pages (one in 61) of the identical and the
 * unique parts, so writes race the merging from the host.  The identical
 * hot pages get the same bytes in every guest on the same pass.
 * Every byte it reads is what it last wrote, or it says BAD and stops
 * QEMU.
 *
 * Serial port (COM1), out: "FILLED <first page> <pages> <identical>",
 * then "PASS <n>" after each pass, "COW" once a storm is done, "REWRITTEN"
 * once a rewrite is.  In: 'c' rewrites every identical page with bytes
 * of this guest's own (a copy-on-write storm); 'r' rewrites them with new
 * bytes, the same in every guest (they are duplicates again); 'q' stops
 * QEMU (isa-debug-exit, status 1).
 *
 * Built freestanding, -m32; no libc.
 */
#define PAGE 4096u
#define FIRST (0x400000u / PAGE)	/* pages below 4 MiB: this code */
#define HOT 61u				/* pages p % HOT == 0 are hot */
#define STORM (1u << 20)		/* generation flags: c and r */
#define REWRITE (1u << 21)

struct mbinfo {
	unsigned flags, mem_lower, mem_upper;
};

static unsigned salt;		/* this guest's, from the TSC */
static unsigned pass;
/* generation of each page: 0 as filled; otherwise the pass (or storm)
 * that last wrote it.  Room for 1 GiB of RAM; the rest is left out. */
static unsigned gen[1u << 18];

__asm__(".section .multiboot, \"a\"\n"
	".align 4\n"
	".long 0x1BADB002, 0x00000002, -(0x1BADB002 + 0x00000002)\n"
	".text\n"
	".globl _start\n"
	"_start:\n"
	"mov $stack_top, %esp\n"
	"push %ebx\n"
	"call kmain\n"
	"1: hlt\n"
	"jmp 1b\n"
	".bss\n"
	".align 16\n"
	".skip 16384\n"
	"stack_top:\n"
	".text\n");

static inline void outb(unsigned short port, unsigned char v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline unsigned char inb(unsigned short port)
{
	unsigned char v;

	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static void putch(char c)
{
	while (!(inb(0x3fd) & 0x20))	/* transmitter empty */
		;
	outb(0x3f8, (unsigned char)c);
}

static void puts_(const char *s)
{
	while (*s)
		putch(*s++);
}

static void putnum(unsigned v)
{
	char b[12];
	int i = 0;

	do
		b[i++] = (char)('0' + v % 10);
	while (v /= 10);
	while (i)
		putch(b[--i]);
}

static int getch(void)
{
	return (inb(0x3fd) & 1) ? inb(0x3f8) : -1;
}

static void quit(unsigned char code)
{
	outb(0xf4, code);	/* isa-debug-exit: QEMU exits (code << 1) | 1 */
	for (;;)
		__asm__ volatile("hlt");
}

/* What word i of page p holds, in generation g.  Identical pages do not
 * depend on the salt, unique ones and storms do. */
static unsigned word(unsigned p, unsigned i, unsigned g, unsigned s)
{
	unsigned x = p * 2654435761u ^ i * 40503u ^ g * 0x9e3779b9u ^ s;

	x ^= x >> 15;
	x *= 0x2c1b3c6du;
	x ^= x >> 12;
	return x;
}

enum { IDENT, ZERO, UNIQUE };
static unsigned npages, n_ident, n_zero;

static int kind(unsigned p)
{
	p -= FIRST;
	return p < n_ident ? IDENT : p < n_ident + n_zero ? ZERO : UNIQUE;
}

/* The salt of page p's bytes in generation g: storms and unique pages
 * are this guest's own; hot identical pages and rewrites have the same
 * bytes in every guest. */
static unsigned salt_of(unsigned p, unsigned g)
{
	return (kind(p) == UNIQUE || (g & STORM)) ? salt : 0;
}

static void write_page(unsigned p, unsigned g)
{
	volatile unsigned *w = (volatile unsigned *)(p * PAGE);
	unsigned s = salt_of(p, g);

	gen[p] = g;
	if (kind(p) == ZERO && !g) {
		for (unsigned i = 0; i < PAGE / 4; i++)
			w[i] = 0;
		return;
	}
	for (unsigned i = 0; i < PAGE / 4; i++)
		w[i] = word(p, i, g, s);
}

static void check_page(unsigned p)
{
	volatile unsigned *w = (volatile unsigned *)(p * PAGE);
	unsigned g = gen[p], s = salt_of(p, g);

	for (unsigned i = 0; i < PAGE / 4; i++) {
		unsigned want = (kind(p) == ZERO && !g) ? 0 : word(p, i, g, s);

		if (w[i] != want) {
			puts_("BAD page ");
			putnum(p);
			puts_(" word ");
			putnum(i);
			puts_(" pass ");
			putnum(pass);
			puts_("\n");
			quit(1);
		}
	}
}

void kmain(const struct mbinfo *mb);

void kmain(const struct mbinfo *mb)
{
	unsigned lo, hi, end;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	salt = (lo ^ hi * 2654435761u) | 1;
	end = (0x100000u + mb->mem_upper * 1024u) / PAGE;
	if (end > sizeof(gen) / sizeof(gen[0]))
		end = sizeof(gen) / sizeof(gen[0]);
	npages = end - FIRST;
	n_ident = npages / 10 * 6;
	n_zero = npages / 10 * 2;
	for (unsigned p = FIRST; p < end; p++)
		write_page(p, 0);
	puts_("FILLED ");
	putnum(FIRST);
	puts_(" ");
	putnum(npages);
	puts_(" ");
	putnum(n_ident);
	puts_("\n");
	for (pass = 1;; pass++) {
		int c = getch();

		if (c == 'q')
			quit(0);
		if (c == 'c' || c == 'r') {
			for (unsigned p = FIRST; p < FIRST + n_ident; p++)
				write_page(p, c == 'c' ? STORM + pass : REWRITE);
			puts_(c == 'c' ? "COW\n" : "REWRITTEN\n");
		}
		for (unsigned p = FIRST; p < end; p++) {
			if (p % HOT == 0 && kind(p) != ZERO)
				write_page(p, (gen[p] & STORM) ? gen[p] + 1
							       : pass);
			check_page(p);
		}
		puts_("PASS ");
		putnum(pass);
		puts_("\n");
	}
}
