/*
 * covshim.c - lets atheris keep its Python coverage in a process with gcc's ASan runtime.
 *
 * gcc's libasan defines weak stubs of the SanitizerCoverage callbacks
 * (__sanitizer_cov_8bit_counters_init, __sanitizer_cov_pcs_init, the cmp traces).  Preloaded
 * first, as ASan must be, they win over the libFuzzer linked into atheris's core module,
 * whose own calls to them go through the PLT: libFuzzer never hears of the counters atheris
 * registers for Python code and fuzzes blind ("no interesting inputs").  Preloaded before
 * libasan (with ASAN_OPTIONS=verify_asan_link_order=0), this library defines those
 * callbacks once more and forwards each to the definition inside atheris's core module,
 * found with dlsym on that module's handle.  fuzz/build_asan.py builds it with
 * ATHERIS_CORE set to that module's path.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef ATHERIS_CORE
#error "build with -DATHERIS_CORE='\"/path/to/atheris/core_with_libfuzzer...so\"'"
#endif

static void *core_symbol(const char *name)
{
    static void *core;
    if (!core)
        core = dlopen(ATHERIS_CORE, RTLD_NOW | RTLD_NOLOAD);
    if (!core)
        core = dlopen(ATHERIS_CORE, RTLD_NOW);
    void *p = core ? dlsym(core, name) : NULL;
    if (!p) {
        fprintf(stderr, "covshim: %s not found in %s: %s\n", name, ATHERIS_CORE, dlerror());
        abort();
    }
    return p;
}

#define FORWARD(name, params, args)                                          \
    void name params                                                         \
    {                                                                        \
        static void(*target) params;                                         \
        if (!target)                                                         \
            target = (void(*) params)core_symbol(#name);                     \
        target args;                                                         \
    }

FORWARD(__sanitizer_cov_8bit_counters_init, (uint8_t *start, uint8_t *stop), (start, stop))
FORWARD(__sanitizer_cov_pcs_init, (const uintptr_t *start, const uintptr_t *stop), (start, stop))
FORWARD(__sanitizer_cov_trace_cmp1, (uint8_t a, uint8_t b), (a, b))
FORWARD(__sanitizer_cov_trace_cmp2, (uint16_t a, uint16_t b), (a, b))
FORWARD(__sanitizer_cov_trace_cmp4, (uint32_t a, uint32_t b), (a, b))
FORWARD(__sanitizer_cov_trace_cmp8, (uint64_t a, uint64_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp1, (uint8_t a, uint8_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp2, (uint16_t a, uint16_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp4, (uint32_t a, uint32_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp8, (uint64_t a, uint64_t b), (a, b))
FORWARD(__sanitizer_cov_trace_switch, (uint64_t value, uint64_t *cases), (value, cases))
FORWARD(__sanitizer_cov_trace_div4, (uint32_t value), (value))
FORWARD(__sanitizer_cov_trace_div8, (uint64_t value), (value))
FORWARD(__sanitizer_cov_trace_gep, (uintptr_t index), (index))
FORWARD(__sanitizer_cov_trace_pc_indir, (uintptr_t callee), (callee))
