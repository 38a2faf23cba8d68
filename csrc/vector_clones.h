// LOCALSGD_VECTOR_CLONES: the CPU kernels' hot loops are compiled twice, for AVX2 and for any x86-64, and
// the dynamic loader picks one per machine (GCC's target_clones, an ifunc), so that one wheel runs
// everywhere and vectorizes 8 floats wide where it can. Both clones give the same bits: "avx2" does not
// enable FMA, so no multiply-add is contracted, and every other operation is IEEE-exact on both.
// Elsewhere (other compilers or architectures, and under AddressSanitizer, whose start-up an ifunc
// resolver would precede) the loops are compiled once, for the build's target.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    !defined(__SANITIZE_ADDRESS__)
#define LOCALSGD_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LOCALSGD_VECTOR_CLONES
#endif
