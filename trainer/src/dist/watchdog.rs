//! A thread that stops the process when a collective outlives its deadline. A collective
//! blocked on a rank that died cannot be interrupted from the thread that called it, and
//! neither MPI nor NCCL gives up on its own in every failure (a node lost, a launcher that
//! does not tear the job down), so a rank would otherwise wait forever.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

type Slot = Arc<(Mutex<Option<(Instant, String)>>, Condvar)>;

pub struct Watchdog {
    slot: Slot,
    timeout: Duration,
}

/// Disarms the watchdog when the collective returns.
pub struct Armed<'a>(&'a Watchdog);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.slot.0.lock() {
            *s = None;
        }
    }
}

impl Watchdog {
    /// `who` names this rank in the message (e.g. "rank 0 of 2").
    pub fn start(who: String, timeout: Duration) -> Self {
        let slot: Slot = Arc::new((Mutex::new(None), Condvar::new()));
        let watched = slot.clone();
        std::thread::spawn(move || {
            let (lock, wake) = &*watched;
            let Ok(mut guard) = lock.lock() else { return };
            loop {
                let wait = match &*guard {
                    None => Duration::from_secs(3600),
                    Some((deadline, what)) => {
                        let now = Instant::now();
                        if now >= *deadline {
                            eprintln!(
                                "error: {who}: {what} got no answer from the other ranks within {} s; a rank has probably died or hung (see its log), so this rank stops too",
                                timeout.as_secs_f64()
                            );
                            // The calling thread is stuck inside the collective: end the
                            // process from here, without unwinding into it.
                            unsafe { libc::_exit(super::PEER_LOST_EXIT) };
                        }
                        *deadline - now
                    }
                };
                guard = match wake.wait_timeout(guard, wait) {
                    Ok((g, _)) => g,
                    Err(_) => return,
                };
            }
        });
        Self { slot, timeout }
    }

    /// Starts the clock on `what`.
    pub fn arm(&self, what: &str) -> Armed<'_> {
        if let Ok(mut s) = self.slot.0.lock() {
            *s = Some((Instant::now() + self.timeout, what.to_string()));
        }
        self.slot.1.notify_one();
        Armed(self)
    }
}
