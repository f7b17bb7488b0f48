/* Work split over an OpenMP team: in a torch process the team is torch's own warm intra-op pool (the
 * libraries link libgomp, which resolves to torch's by the same soname). Included by the
 * libraries' sources; engine/native_masks.py hashes this header with each source. */
#ifndef ENGINE_TEAM_H
#define ENGINE_TEAM_H

#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* How many of `threads` to use for n units of work: none that would get fewer than `grain` units
 * (too little work to pay a thread), and at least one. */
static inline int team_size(int threads, int64_t n, int64_t grain) {
    if ((int64_t)threads * grain > n) threads = (int)(n / grain);
    return threads < 1 ? 1 : threads;
}

/* Inside a parallel region: this thread's contiguous share [*begin, *end) of [0, n). */
static inline void team_share(int64_t n, int64_t *begin, int64_t *end) {
    int team = 1, me = 0;
#ifdef _OPENMP
    team = omp_get_num_threads();
    me = omp_get_thread_num();
#endif
    *begin = n * me / team;
    *end = n * (me + 1) / team;
}

#endif
