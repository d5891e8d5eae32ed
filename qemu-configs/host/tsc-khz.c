// SPDX-License-Identifier: MIT
/*
 * tsc-khz - print this host's TSC rate in kHz, measured.
 *
 * Under TCG, QEMU's guest TSC reads the host's TSC, so a TCG guest that cannot
 * calibrate its TSC (microvm has no HPET or ACPI PM timer, and PIT calibration
 * under TCG fails now and then) is told this rate with tsc_early_khz=.  It is
 * measured against CLOCK_MONOTONIC_RAW rather than read from /proc/cpuinfo's
 * "cpu MHz", which on hosts with frequency scaling is the core clock, not the TSC.
 *
 * Output: one line, the rate in kHz.  Where CPUID does not report an
 * invariant TSC (many VMs hide the bit even when the TSC is constant) it says
 * so on stderr and measures anyway.
 */
#include <cpuid.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>
#include <x86intrin.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC_RAW, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int invariant_tsc(void)
{
	unsigned int a, b, c, d;

	/* CPUID 0x80000007 EDX bit 8: invariant TSC */
	if (!__get_cpuid(0x80000007, &a, &b, &c, &d))
		return 0;
	return (d >> 8) & 1;
}

int main(void)
{
	double best = 0;

	if (!invariant_tsc())
		fprintf(stderr, "tsc-khz: CPUID reports no invariant TSC; "
			"the rate measured now is used\n");
	/* three 50 ms windows; keep the median to shrug off one preempted window */
	double r[3];
	for (int i = 0; i < 3; i++) {
		double t0 = now();
		uint64_t c0 = __rdtsc();
		double t1;

		do
			t1 = now();
		while (t1 - t0 < 0.05);
		r[i] = (__rdtsc() - c0) / (t1 - t0) / 1000.0;
	}
	for (int i = 0; i < 3; i++) {
		int below = 0, above = 0;

		for (int j = 0; j < 3; j++) {
			below += r[j] < r[i];
			above += r[j] > r[i];
		}
		if (below <= 1 && above <= 1)
			best = r[i];
	}
	printf("%.0f\n", best);
	return 0;
}
