//! Where the program's own thread runs: on one of rayon's workers.
//!
//! Why: every `cpu/` op and every OpenBLAS part goes through rayon. Called from a thread
//! outside the pool, each parallel op is injected into the pool: the caller sleeps on a
//! latch while a sleeping worker is woken for every part, and is woken again at the end.
//! A batch-1 decoding step makes some three hundred of them, and that wake-up traffic was
//! about a fifth of its profile (the kernel's scheduler and futex paths). From a worker,
//! the caller takes the first part itself and the others are stolen by workers that spin
//! briefly before sleeping, the way OpenMP runtimes keep theirs.

/// Runs `f` on a worker of a rayon pool of the default size (`RAYON_NUM_THREADS`, else
/// one thread per core), the pool every parallel op inside it then uses; on the calling
/// thread when no pool can be built. The workers get the main thread's usual 8 MiB stack,
/// not rayon's 2 MiB, since `f` is the whole program.
pub fn on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .thread_name(|i| format!("hearth-{i}"))
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `f` runs on a worker of a pool of the default size, and a parallel op inside it
    /// uses that pool.
    #[test]
    fn runs_on_a_worker_of_the_default_pool() {
        let outside = rayon::current_thread_index();
        assert_eq!(outside, None, "the test harness's thread is no worker");
        let (index, threads, parts) = on_workers(|| {
            use rayon::prelude::*;
            let parts: Vec<usize> = (0..64).into_par_iter().map(|i| i * 2).collect();
            (
                rayon::current_thread_index(),
                rayon::current_num_threads(),
                parts,
            )
        });
        assert!(index.is_some(), "f ran outside the pool");
        assert_eq!(
            threads,
            rayon::ThreadPoolBuilder::new()
                .build()
                .unwrap()
                .current_num_threads()
        );
        assert_eq!(parts, (0..64).map(|i| i * 2).collect::<Vec<_>>());
    }
}
