/* CLONES: one AVX-512, one AVX2 and one generic copy of a vectorised loop, the CPU's best picked when
 * the library loads (gcc on x86-64; a plain function elsewhere). Included by keep_mask.c, gelu.c and
 * adamw_rows.c; engine/native_masks.py hashes this header with each source, so a change rebuilds them. */
#ifndef ENGINE_CLONES_H
#define ENGINE_CLONES_H

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#endif
