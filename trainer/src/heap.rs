//! The process heap's policy for tensor buffers on the CPU.
//!
//! A training step frees and allocates the same few-megabyte buffers every step
//! (activations, their gradients, a head chunk's logits). glibc's defaults hand such a
//! buffer back to the kernel on free (a private `mmap` above its threshold, or a trim of
//! the heap's top), so the next step's buffer of the same size is fresh memory: a page
//! fault and a page of zeros per 4 KiB. `perf` put that at about 9 % of a small LoRA step
//! (BENCHMARKS.md). Keeping freed buffers in the heap lets the next step reuse them.
//!
//! Buffers above [`MMAP_ABOVE`] still get their own mapping, so a model's weights loaded
//! through host memory (several GiB on the way to a GPU) go back to the kernel when freed,
//! and at most [`TRIM_ABOVE`] of free memory is kept at the top of a heap.

/// Allocations at least this large get their own mapping: glibc's own ceiling for its
/// dynamic threshold, fixed here so that it no longer starts at 128 KiB.
pub const MMAP_ABOVE: usize = 32 << 20;
/// The free memory a heap's top may hold before it is given back.
pub const TRIM_ABOVE: usize = 128 << 20;
/// How much more than asked a heap grows by, so that the next allocations find it ready.
pub const GROW_BY: usize = 64 << 20;

/// The environment variables by which a user tunes glibc's allocator themselves; any one of
/// them set means the user's settings stand and hearth sets none.
const USER_KNOBS: [&str; 5] = [
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
    "GLIBC_TUNABLES",
];

/// What [`keep_freed_buffers`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeapPolicy {
    /// The thresholds above are in force.
    Set,
    /// The user tuned the allocator through the environment; nothing was changed.
    UserSettings,
    /// Not glibc (musl, macOS, ...): nothing to set.
    Unsupported,
}

/// Whether the user's environment tunes the allocator, read through `var` so that tests
/// need not touch the process environment.
fn user_tuned(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    USER_KNOBS.iter().any(|k| var(k).is_some())
}

/// Sets the policy once, at the start of the process, before the first tensor exists.
pub fn keep_freed_buffers() -> HeapPolicy {
    if user_tuned(|k| std::env::var_os(k)) {
        return HeapPolicy::UserSettings;
    }
    set()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set() -> HeapPolicy {
    let knobs = [
        (libc::M_MMAP_THRESHOLD, MMAP_ABOVE),
        (libc::M_TRIM_THRESHOLD, TRIM_ABOVE),
        (libc::M_TOP_PAD, GROW_BY),
    ];
    for (knob, value) in knobs {
        // The values are constants well inside `c_int`.
        let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
        // SAFETY: `mallopt` only changes the allocator's parameters; glibc takes its own
        // lock, so it is sound at any time and from any thread.
        if unsafe { libc::mallopt(knob, value) } != 1 {
            return HeapPolicy::Unsupported;
        }
    }
    HeapPolicy::Set
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set() -> HeapPolicy {
    HeapPolicy::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_user_knob_leaves_the_allocator_alone() {
        assert!(!user_tuned(|_| None));
        for knob in USER_KNOBS {
            assert!(user_tuned(|k| (k == knob).then(|| "1".into())), "{knob}");
        }
        assert!(!user_tuned(|k| (k == "MALLOC_CHECK_").then(|| "1".into())));
    }

    /// Minor page faults of this thread so far.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn faults() -> i64 {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `getrusage` writes one `rusage` into the pointer it is given.
        let usage = unsafe {
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()), 0);
            usage.assume_init()
        };
        usage.ru_minflt
    }

    /// Page faults of writing a fresh buffer of `bytes` and freeing it, the second time, the
    /// fewest of three tries: the test binary's other threads allocate meanwhile and may take
    /// the freed block between two writes once, never three times running unless the policy
    /// fails.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn faults_of_a_second_buffer(bytes: usize) -> i64 {
        let write = || drop(std::hint::black_box(vec![1.0f32; bytes / 4]));
        (0..3)
            .map(|_| {
                write();
                let before = faults();
                write();
                faults() - before
            })
            .min()
            .unwrap_or(i64::MAX)
    }

    /// The policy's point: a step's buffer freed and allocated again is the same memory, no
    /// page faults (glibc's defaults fault on every 4 KiB page of it again); and its bound:
    /// a buffer past `MMAP_ABOVE` still goes back to the kernel when freed.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_freed_step_buffer_is_reused_without_page_faults() {
        if keep_freed_buffers() != HeapPolicy::Set {
            eprintln!("the allocator is tuned through the environment; nothing to check");
            return;
        }
        let step = 16 << 20;
        let faulted = faults_of_a_second_buffer(step);
        assert!(
            faulted < 64,
            "{faulted} page faults writing a reused {step}-byte buffer"
        );
        let weights = MMAP_ABOVE + (16 << 20);
        let faulted = faults_of_a_second_buffer(weights);
        let pages = i64::try_from(weights / 4096).unwrap_or(i64::MAX);
        assert!(
            faulted >= pages / 2,
            "{faulted} page faults: a {weights}-byte buffer was kept"
        );
    }
}
