// avx2only: run a program with every x86 extension above AVX2 + FMA hidden from it, natively.
//
//   LD_PRELOAD=kernels/build/libavx2only.so python -m ...      (or: kernels/avx2only CMD...)
//
// Why: the build machines of this project have been AMD EPYC Zen 3 (AVX2 and FMA only) on some
// days and Intel Xeons with AVX-512 VNNI, AVX-VNNI and AMX on others. onnxruntime (MLAS and
// cpuinfo), numpy and our kernel library all choose their code by asking the CPUID instruction.
// On a CPU with CPUID faulting (/proc/cpuinfo flag `cpuid_fault`), Linux's
// arch_prctl(ARCH_SET_CPUID, 0) makes every CPUID in this process trap (SIGSEGV); this library
// answers it by running the real CPUID with faulting briefly off and clearing the AVX-512, VNNI,
// AMX and related feature bits. Everything then takes the AVX2 code path it would take on an
// AVX2-only CPU, at native speed (qemu-user's EPYC-Milan model checks correctness too, but its
// timings mean nothing). It is a measurement tool: the cores are still this machine's cores
// (their caches, clocks and port layout), so figures are "AVX2 code paths on <this CPU>", never
// "an AVX2-only machine".
//
// What it cannot hide: CPUIDs executed before it loads (the dynamic loader's and glibc's own
// CPU probe, so glibc's string functions may still use AVX-512) and code that reads XCR0 alone.
// It sets GREENROUTE_CPUID_MASK=avx2, so models/runtime/host.py (every bench table, the
// manifest, pytest's header) lists the hidden flags as hidden. GREENROUTE_AVX2ONLY_QUIET=1
// silences its one-line banner on stderr.
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef ARCH_GET_CPUID
#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012
#endif

static long arch_prctl_(int code, unsigned long arg) { return syscall(SYS_arch_prctl, code, arg); }

static void real_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

// Bits cleared, by (leaf, subleaf, register). Leaf 7.0: EBX AVX512F 16, DQ 17, IFMA 21, PF 26,
// ER 27, CD 28, BW 30, VL 31; ECX VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14;
// EDX 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512-FP16 23, AMX-TILE 24,
// AMX-INT8 25. Leaf 7.1: EAX AVX-VNNI 4, AVX512-BF16 5, AVX-IFMA 23; EDX AVX-VNNI-INT8 4,
// AVX-NE-CONVERT 5, AVX-VNNI-INT16 10. Leaf 1 and the rest are left alone (AVX, AVX2, FMA, F16C,
// BMI stay), as are XSAVE's state sizes.
static void mask(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (leaf == 7 && sub == 0) {
        r[1] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) |
                  (1u << 30) | (1u << 31));
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) |
                  (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        r[0] &= ~((1u << 4) | (1u << 5) | (1u << 23));
        r[3] &= ~((1u << 4) | (1u << 5) | (1u << 10));
    } else if (leaf == 0x1d || leaf == 0x1e) {  // AMX tile and TMUL information
        r[0] = r[1] = r[2] = r[3] = 0;
    }
}

static void on_segv(int sig, siginfo_t *info, void *ctx_) {
    ucontext_t *ctx = (ucontext_t *)ctx_;
    greg_t *g = ctx->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)g[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) {  // not CPUID: a real fault, die as we would have
        signal(sig, SIG_DFL);
        (void)info;
        return;  // re-executes the faulting instruction with the default action
    }
    uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX], r[4];
    arch_prctl_(ARCH_SET_CPUID, 1);
    real_cpuid(leaf, sub, r);
    arch_prctl_(ARCH_SET_CPUID, 0);
    mask(leaf, sub, r);
    g[REG_RAX] = r[0];
    g[REG_RBX] = r[1];
    g[REG_RCX] = r[2];
    g[REG_RDX] = r[3];
    g[REG_RIP] += 2;
}

__attribute__((constructor)) static void avx2only_init(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    const char *quiet = getenv("GREENROUTE_AVX2ONLY_QUIET");
    if (sigaction(SIGSEGV, &sa, NULL) != 0 || arch_prctl_(ARCH_SET_CPUID, 0) != 0) {
        fprintf(stderr, "avx2only: this CPU or kernel has no CPUID faulting; nothing is hidden\n");
        _exit(97);  // never measure the wrong thing quietly
    }
    setenv("GREENROUTE_CPUID_MASK", "avx2", 1);  // models/runtime/host.py reports the mask
    if (!(quiet && *quiet == '1'))
        fprintf(stderr, "avx2only: CPUID masked (no AVX-512, VNNI, AMX) in pid %d\n", getpid());
}
