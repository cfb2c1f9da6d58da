//! SIGINT and SIGTERM during training: the handler only records the signal; the loop
//! notices it after the current step, writes a checkpoint and returns
//! [`crate::TrainerError::Interrupted`], so the process exits with 128 + the signal.

use std::sync::Once;
use std::sync::atomic::{AtomicI32, Ordering};

static PENDING: AtomicI32 = AtomicI32::new(0);
static INSTALL: Once = Once::new();

/// Installs the handlers once per process. Only an atomic store runs in the handler, which
/// is async-signal-safe.
pub fn install() {
    INSTALL.call_once(|| {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: the action only stores into an atomic; it allocates and locks nothing.
            let _ = unsafe {
                signal_hook_registry::register(signal, move || {
                    PENDING.store(signal, Ordering::SeqCst);
                })
            };
        }
    });
}

/// The signal received since the last [`take`], if any, clearing it.
pub fn take() -> Option<i32> {
    match PENDING.swap(0, Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The signal's conventional name.
pub fn name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}
