//! SIGINT, SIGTERM and SIGHUP (what a closed terminal or SSH session sends; left ignored
//! under `nohup`). The handler only records the signal and wakes a watcher thread;
//! what happens next depends on what the process is doing:
//! - while training ([`hand_to_training`]'s guard lives), the loop notices the signal after the current
//!   step, writes a checkpoint and returns [`crate::TrainerError::Interrupted`], so the
//!   process exits with 128 + the signal;
//! - otherwise the watcher removes the files being written
//!   ([`checkpoints::pending::abandon_all`]) and exits with 128 + the signal at once, as
//!   the default action would have, but without leaving a temporary file behind.

use std::io::Read;
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Once;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

static PENDING: AtomicI32 = AtomicI32::new(0);
/// How many training loops have taken signals over (several run at once only in tests).
static TRAINING: AtomicUsize = AtomicUsize::new(0);
/// How many waits on a reward or client program are under way ([`waiting_on_program`]).
static WAITING: AtomicUsize = AtomicUsize::new(0);
/// How many signals the watcher has acted on (or let be): so a test knows when it has.
static SEEN: AtomicUsize = AtomicUsize::new(0);
/// The write end of the watcher's socket, or -1.
static WAKE: AtomicI32 = AtomicI32::new(-1);
static INSTALL: Once = Once::new();

/// Installs the handlers and the watcher once per process; the CLI calls it before any
/// command runs. Only an atomic store and a `write` run in the handler, both
/// async-signal-safe.
pub fn install() {
    INSTALL.call_once(|| {
        let Ok((mut watcher, waker)) = UnixStream::pair() else {
            // Without the socket the signals keep their default action.
            return;
        };
        WAKE.store(waker.into_raw_fd(), Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut byte = [0u8];
                while watcher.read_exact(&mut byte).is_ok() {
                    if TRAINING.load(Ordering::SeqCst) == 0 {
                        exit_on(i32::from(byte[0]));
                    }
                    if WAITING.load(Ordering::SeqCst) > 0 {
                        exit_waiting(i32::from(byte[0]));
                    }
                    SEEN.fetch_add(1, Ordering::SeqCst);
                }
            });
        if spawned.is_err() {
            return;
        }
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // `nohup` ignores SIGHUP so that a run outlives its terminal: kept so.
            if signal == libc::SIGHUP && ignored(signal) {
                continue;
            }
            // SAFETY: the action stores into an atomic and writes one byte to a socket; it
            // allocates and locks nothing.
            let _ = unsafe {
                signal_hook_registry::register(signal, move || {
                    PENDING.store(signal, Ordering::SeqCst);
                    wake(signal);
                })
            };
        }
    });
}

/// Whether `signal` is ignored (set so by whoever started the process).
fn ignored(signal: i32) -> bool {
    // SAFETY: reads the current action into a zeroed local; changes nothing.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

/// Tells the watcher about `signal`; async-signal-safe.
fn wake(signal: i32) {
    let fd = WAKE.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = signal as u8;
        // SAFETY: writes one byte from a live local to a socket this module owns.
        unsafe { libc::write(fd, (&raw const byte).cast(), 1) };
    }
}

/// While the returned guard lives, a signal stops training after the current step (see
/// [`take`]) instead of ending the process. A signal that arrived before has already
/// ended it; one that the loop did not take (it came during the final save) is handled
/// as outside training once the guard is dropped.
#[must_use = "signals go back to ending the process when the guard is dropped"]
pub fn hand_to_training() -> TrainingSignals {
    install();
    TRAINING.fetch_add(1, Ordering::SeqCst);
    TrainingSignals(())
}

/// See [`hand_to_training`].
pub struct TrainingSignals(());

impl Drop for TrainingSignals {
    fn drop(&mut self) {
        if TRAINING.fetch_sub(1, Ordering::SeqCst) == 1 {
            let pending = PENDING.load(Ordering::SeqCst);
            if pending != 0 {
                wake(pending);
            }
        }
    }
}

/// While the returned guard lives (hearth waits on a reward or client program, up to its
/// `timeout_s`), a stop signal that arrives ends the process at once, the program with it,
/// instead of after the step, which may be minutes away: the run resumes from its last
/// checkpoint. A signal that came earlier in the step is left to the step's end, as always
/// (a prompt program answers in milliseconds, and the step then writes its checkpoint); a
/// second one while a slow program keeps hearth waiting ends it.
pub fn waiting_on_program() -> WaitingOnProgram {
    WAITING.fetch_add(1, Ordering::SeqCst);
    WaitingOnProgram(())
}

/// See [`waiting_on_program`].
pub struct WaitingOnProgram(());

impl Drop for WaitingOnProgram {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// [`exit_on`] for a training run stopped while it waited on a program.
fn exit_waiting(signal: i32) -> ! {
    checkpoints::pending::abandon_all();
    crate::jsonl_process::kill_all();
    eprintln!(
        "stopped by {} while waiting for a reward or client program; --resume continues from \
         the last checkpoint (or starts over if none was written)",
        name(signal)
    );
    std::process::exit(128 + signal)
}

/// Leaves nothing half-written and exits the way a shell reports a signal. Exits without
/// the process's exit handlers: other threads are still computing (a model answering, say),
/// and a library's handler tearing down what they use killed the process by a signal
/// instead of the 130 a shell expects (seen once in a clean-clone run of the eval test).
fn exit_on(signal: i32) -> ! {
    checkpoints::pending::abandon_all();
    crate::jsonl_process::kill_all();
    eprintln!("stopped by {}", name(signal));
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // SAFETY: `_exit` ends the process at once; nothing after it runs.
    unsafe { libc::_exit(128 + signal) }
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
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Which scene [`child`] plays, in a process of its own: signals reach the whole
    /// process, and this test binary's other tests train.
    const SCENE: &str = "HEARTH_SIGNALS_SCENE";

    /// In training, a stop signal that came before hearth began waiting on a program is
    /// left to the step's end (the loop takes it); one that comes during the wait ends the
    /// process at once with 128 + the signal.
    #[test]
    fn a_signal_ends_a_wait_on_a_program_only_if_it_comes_during_the_wait() {
        if let Some(scene) = std::env::var_os(SCENE) {
            child(scene.to_str().unwrap_or_default());
            return;
        }
        let run = |scene: &str| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "signals::tests::a_signal_ends_a_wait_on_a_program_only_if_it_comes_during_the_wait",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(SCENE, scene)
                .output()
                .unwrap()
        };
        let before = run("before");
        let out = String::from_utf8_lossy(&before.stdout);
        assert!(before.status.success(), "{before:?}");
        assert!(out.contains("left to the step: SIGTERM"), "{out}");
        let during = run("during");
        let err = String::from_utf8_lossy(&during.stderr);
        assert_eq!(
            during.status.code(),
            Some(128 + libc::SIGTERM),
            "{during:?}"
        );
        assert!(err.contains("stopped by SIGTERM while waiting"), "{err}");
        assert!(!String::from_utf8_lossy(&during.stdout).contains("still running"));
    }

    fn child(scene: &str) {
        let _training = hand_to_training();
        // Until the watcher has acted on the signal.
        let raise_and_settle = || {
            let seen = SEEN.load(Ordering::SeqCst);
            // SAFETY: sends this process a signal whose handler is installed above.
            unsafe { libc::raise(libc::SIGTERM) };
            let start = Instant::now();
            while SEEN.load(Ordering::SeqCst) == seen && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        if scene == "before" {
            raise_and_settle();
            let waiting = waiting_on_program();
            std::thread::sleep(Duration::from_millis(200));
            drop(waiting);
            println!("left to the step: {}", take().map_or("none", name));
        } else {
            let _waiting = waiting_on_program();
            raise_and_settle();
            println!("still running");
        }
    }
}
