//! An external program that answers JSON lines: hearth starts it once, without a shell,
//! writes one JSON object per question to its stdin and reads one line per question from
//! its stdout, in order. The command reward and the session client both speak this way.
//!
//! Both pipes are non-blocking and one `poll` loop feeds the questions while it collects
//! the answers, so every wait is bounded by the timeout: a program that stops reading (a
//! request can be far larger than a pipe's buffer) or stops answering fails the step
//! instead of hanging the run where no signal can stop it. The program runs in its own
//! process group, so what it started (a shell script's children) is killed with it. Every
//! failure names the program and the answer line it stopped at.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Result, TrainerError};

/// The longest answer line taken: output beyond it without a newline is a broken program,
/// not an answer, and holding it would only grow memory until the timeout.
const MAX_LINE_BYTES: usize = 64 << 20;
/// Bytes read from stdout at a time.
const CHUNK: usize = 64 << 10;
/// How long a program may take to exit once its stdin is closed: its own timeout, but at
/// least enough to flush and exit (an interpreter's teardown), and at most a short wait at
/// the end of a run for a program that ignores the end of its input.
const EXIT_GRACE_MIN: Duration = Duration::from_secs(1);
const EXIT_GRACE_MAX: Duration = Duration::from_secs(10);

pub struct JsonLinesProcess {
    /// What the program is to the run ("reward command", "client command"), for errors.
    role: &'static str,
    argv: Vec<String>,
    child: Child,
    /// `None` once closed, or once the program was killed after a timeout.
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    /// Output read but not yet taken as answers.
    pending: Vec<u8>,
    /// How much of `pending` is known to hold no newline: a long answer arrives in many
    /// reads, and each is searched once, not the whole line again every time.
    scanned: usize,
    /// Whether stdout has reached its end.
    eof: bool,
    timeout: Duration,
    /// Answers read so far, for error messages.
    line: usize,
    /// An error was already returned: the run stops on it, so closing reports nothing more.
    failed: bool,
    /// The program was reaped: its process group must not be signalled again, as its id
    /// may belong to another process by now.
    closed: bool,
}

impl JsonLinesProcess {
    pub fn spawn(role: &'static str, argv: Vec<String>, timeout_s: f64) -> Result<Self> {
        let program = argv
            .first()
            .ok_or_else(|| TrainerError::Input(format!("{role}: the command is empty")))?;
        let mut command = Command::new(program);
        command
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0);
        // A hearth killed outright (SIGKILL, the OOM killer) cannot kill the program's
        // group as it does on every other way out: the kernel ends the program then, so
        // it is not left running, adopted by init. (Programs it started itself are its
        // own to end when their input closes.)
        #[cfg(target_os = "linux")]
        {
            // SAFETY: between fork and exec only `prctl` and `getppid`, both
            // async-signal-safe, run; nothing is allocated.
            let parent = std::process::id() as libc::pid_t;
            unsafe {
                command.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // hearth died before the request took: nothing would kill this one.
                    if libc::getppid() != parent {
                        return Err(std::io::ErrorKind::BrokenPipe.into());
                    }
                    Ok(())
                })
            };
        }
        let mut child = command
            .spawn()
            .map_err(|e| TrainerError::Input(format!("cannot start `{program}`: {e}")))?;
        let pipes = match (child.stdin.take(), child.stdout.take()) {
            (Some(stdin), Some(stdout)) => nonblocking(&stdin)
                .and_then(|()| nonblocking(&stdout))
                .map(|()| (stdin, stdout)),
            _ => Err(std::io::Error::other("no pipe to it")),
        };
        let (stdin, stdout) = match pipes {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: signals the group of a child not yet reaped, so the id is ours.
                unsafe { libc::kill(-pid_of(&child), libc::SIGKILL) };
                let _ = child.wait();
                return Err(TrainerError::Input(format!(
                    "{role} `{}`: cannot set up its pipes: {e}",
                    argv.join(" ")
                )));
            }
        };
        live_groups(|g| g.push(pid_of(&child)));
        Ok(Self {
            role,
            argv,
            child,
            stdin: Some(stdin),
            stdout,
            pending: Vec::new(),
            scanned: 0,
            eof: false,
            timeout: Duration::from_secs_f64(timeout_s.max(0.001)),
            line: 0,
            failed: false,
            closed: false,
        })
    }

    /// An error naming the program and the answer line reached.
    pub fn fail(&self, msg: impl std::fmt::Display) -> TrainerError {
        self.fail_at(self.line, msg)
    }

    /// An error naming the program and answer line `line` (counted from 1 over the run).
    pub fn fail_at(&self, line: usize, msg: impl std::fmt::Display) -> TrainerError {
        TrainerError::Input(format!(
            "{} `{}` (answer line {line}): {msg}",
            self.role,
            self.argv.join(" "),
        ))
    }

    /// Answer lines read so far.
    pub fn answered(&self) -> usize {
        self.line
    }

    /// Writes `questions`, one line each, and reads one answer line per question. The
    /// program must make progress within the timeout, each time: take more of its input
    /// or give the next answer. When it does not, it is killed (with what it started) and
    /// the error says which it failed to do.
    ///
    /// Output beyond the answers asked for, seen before the questions are written or by
    /// the time the last answer is read, answers nothing asked: the program wrote more than
    /// one line for some question (or a line unasked), so the answers read no longer
    /// belong to the questions they were read for, and that is an error for this request.
    /// Output that comes later is caught at the next request, or by [`Self::close`].
    pub fn ask(&mut self, questions: &[Value]) -> Result<Vec<String>> {
        let result = self.exchange(questions);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    /// [`Self::ask`], each answer read by `parse(self, line, text)`. An answer it refuses
    /// fails the request as the program's own faults do: its later output is then not
    /// reported a second time when it is closed, so the error is one line.
    pub fn ask_parsed<T>(
        &mut self,
        questions: &[Value],
        parse: impl Fn(&Self, usize, &str) -> Result<T>,
    ) -> Result<Vec<T>> {
        let answers = self.ask(questions)?;
        let first = self.line + 1 - answers.len();
        let parsed: Result<Vec<T>> = answers
            .iter()
            .enumerate()
            .map(|(i, a)| parse(self, first + i, a))
            .collect();
        if parsed.is_err() {
            self.failed = true;
        }
        parsed
    }

    fn exchange(&mut self, questions: &[Value]) -> Result<Vec<String>> {
        if self.stdin.is_none() {
            return Err(self.fail_at(
                self.line + 1,
                "it is no longer running (stopped after an earlier failure)",
            ));
        }
        let mut scratch = vec![0; CHUNK];
        self.read_into_pending(&mut scratch)
            .map_err(|e| self.fail_at(self.line + 1, format!("reading its output: {e}")))?;
        if !self.pending.is_empty() {
            return Err(self.surplus());
        }
        let mut request = String::new();
        for q in questions {
            request.push_str(&q.to_string());
            request.push('\n');
        }
        let request = request.as_bytes();
        let mut written = 0;
        let mut out = Vec::with_capacity(questions.len());
        let mut deadline = Instant::now() + self.timeout;
        // A stop signal during the wait stops the run now, not up to `timeout_s` later.
        let _waiting = crate::signals::waiting_on_program();
        loop {
            let before = out.len();
            self.take_lines(questions.len(), &mut out)?;
            if out.len() > before {
                deadline = Instant::now() + self.timeout;
            }
            if out.len() == questions.len() && written == request.len() {
                // Output already in the pipe has arrived as surely as output read.
                self.read_into_pending(&mut scratch)
                    .map_err(|e| self.fail_at(self.line + 1, format!("reading its output: {e}")))?;
                if !self.pending.is_empty() {
                    return Err(self.surplus());
                }
                return Ok(out);
            }
            if self.eof && out.len() < questions.len() {
                return Err(
                    self.fail_at(self.line + 1, "it exited before answering every question")
                );
            }
            if self.pending.len() > MAX_LINE_BYTES {
                return Err(self.fail_at(
                    self.line + 1,
                    format!(
                        "an answer line longer than {} MiB; write one line per question",
                        MAX_LINE_BYTES >> 20
                    ),
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                let what = if written < request.len() {
                    "did not read its input"
                } else {
                    "no answer"
                };
                self.kill();
                return Err(self.fail_at(
                    self.line + 1,
                    format!("{what} within {} s", seconds(self.timeout)),
                ));
            }
            let stdin = self.stdin.as_ref().map_or(-1, AsRawFd::as_raw_fd);
            let mut fds = [
                pollfd(stdin, written < request.len(), libc::POLLOUT),
                pollfd(self.stdout.as_raw_fd(), !self.eof, libc::POLLIN),
            ];
            wait(&mut fds, deadline - now)
                .map_err(|e| self.fail_at(self.line + 1, format!("waiting for it: {e}")))?;
            if fds[0].revents != 0 {
                let result = match self.stdin.as_mut() {
                    Some(stdin) => stdin.write(&request[written..]),
                    None => Err(std::io::Error::other("stdin closed")),
                };
                match result {
                    Ok(n) => {
                        written += n;
                        deadline = Instant::now() + self.timeout;
                    }
                    Err(e) if retry(&e) => {}
                    Err(e) => {
                        return Err(self.fail_at(
                            self.line + 1,
                            format!(
                                "cannot write to its stdin ({e}): it exited or closed its input"
                            ),
                        ));
                    }
                }
            }
            if fds[1].revents != 0 {
                self.read_into_pending(&mut scratch)
                    .map_err(|e| self.fail_at(self.line + 1, format!("reading its output: {e}")))?;
            }
        }
    }

    /// Moves complete lines from `pending` to `out`, up to `want` in all; at the end of
    /// the output an unterminated last line counts too, as `BufRead::lines` would have it.
    fn take_lines(&mut self, want: usize, out: &mut Vec<String>) -> Result<()> {
        let mut start = 0;
        while out.len() < want && start < self.pending.len() {
            let from = start.max(self.scanned);
            let end = match self.pending[from..].iter().position(|&b| b == b'\n') {
                Some(i) => from + i,
                None if self.eof => self.pending.len(),
                None => {
                    self.scanned = self.pending.len();
                    break;
                }
            };
            let mut line = &self.pending[start..end];
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            let text = std::str::from_utf8(line).map_err(|_| {
                self.fail_at(self.line + 1, "reading its output: the answer is not UTF-8")
            })?;
            out.push(text.to_owned());
            self.line += 1;
            start = (end + 1).min(self.pending.len());
        }
        self.pending.drain(..start);
        self.scanned = self.scanned.saturating_sub(start);
        Ok(())
    }

    /// Reads what the program has written so far (one read: a program that never stops
    /// writing cannot keep hearth here), noting the end of its output.
    fn read_into_pending(&mut self, scratch: &mut [u8]) -> std::io::Result<()> {
        if let Some(n) = read_once(&mut self.stdout, scratch, &mut self.eof)? {
            self.pending.extend_from_slice(&scratch[..n]);
        }
        Ok(())
    }

    /// The error for output no question asked for, at the answer line it would have been.
    fn surplus(&self) -> TrainerError {
        self.fail_at(
            self.line + 1,
            "it wrote a line no question asked for, so its answers no longer line up with \
             the questions; write exactly one line per question to stdout (logs go to stderr)",
        )
    }

    /// Kills the program and whatever it started, unless it was already reaped.
    fn kill(&mut self) {
        self.stdin = None;
        if !self.closed {
            // SAFETY: the group's leader is our child and not yet reaped (`closed` is
            // false), so no other process can hold this group id.
            unsafe { libc::kill(-pid_of(&self.child), libc::SIGKILL) };
        }
    }

    /// Ends the program: closes its stdin, which asks it to finish, and gives it its
    /// timeout (within 1 to 10 s) to exit on its own, so a program that writes a summary
    /// at the end of its input is not cut short; then kills its process group, so nothing
    /// it started outlives it. Output after the last answer is an error (unless an earlier
    /// error was returned): the program wrote more lines than it was asked for, so some
    /// answers taken belonged to other questions, on the last request as on any other.
    /// Dropping the process closes it too, printing that error since it cannot return it.
    pub fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.stdin = None;
        let mut scratch = vec![0; CHUNK];
        // Only whether there was output matters now, so what is read is not kept.
        let mut extra = !self.pending.is_empty();
        let mut unreadable = None;
        let deadline = Instant::now() + self.timeout.clamp(EXIT_GRACE_MIN, EXIT_GRACE_MAX);
        loop {
            if self.exited() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // Short waits: the program's exit wakes no poll, and a child it started may
            // hold stdout open after it exits.
            let mut fds = [pollfd(self.stdout.as_raw_fd(), !self.eof, libc::POLLIN)];
            let _ = wait(&mut fds, (deadline - now).min(Duration::from_millis(10)));
            if fds[0].revents != 0 {
                match read_once(&mut self.stdout, &mut scratch, &mut self.eof) {
                    Ok(Some(n)) => extra |= n > 0,
                    Ok(None) => {}
                    Err(e) => {
                        unreadable = Some(e);
                        self.eof = true;
                    }
                }
            }
        }
        self.kill();
        let pid = pid_of(&self.child);
        live_groups(|g| g.retain(|&p| p != pid));
        let _ = self.child.wait();
        self.closed = true;
        // What its group wrote before it was killed is in the pipe (a bounded read: an
        // escaped descendant may still be writing).
        for _ in 0..16 {
            match read_once(&mut self.stdout, &mut scratch, &mut self.eof) {
                Ok(Some(n)) if n > 0 => extra = true,
                _ => break,
            }
        }
        if self.failed {
            return Ok(());
        }
        if let Some(e) = unreadable {
            return Err(self.fail_at(self.line + 1, format!("reading its output: {e}")));
        }
        if extra {
            return Err(self.fail_at(
                self.line + 1,
                "it wrote a line no question asked for, so its answers did not all line up \
                 with the questions; write exactly one line per question to stdout (logs go \
                 to stderr)",
            ));
        }
        Ok(())
    }

    /// Whether the program has exited, leaving it unreaped so its process group id stays
    /// ours to signal.
    fn exited(&self) -> bool {
        // SAFETY: `waitid` writes into a zeroed `siginfo_t` we own; `WNOWAIT` leaves the
        // child for `Child::wait` to reap.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            r != 0 || info.si_pid() != 0
        }
    }
}

/// The process groups of programs still running: a stop signal outside training ends
/// hearth with `process::exit`, which runs no `Drop`, and a program in a group of its own
/// gets no Ctrl-C from the terminal.
static LIVE_GROUPS: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

fn live_groups(f: impl FnOnce(&mut Vec<i32>)) {
    if let Ok(mut g) = LIVE_GROUPS.lock() {
        f(&mut g);
    }
}

/// Kills every program still running, and what each started. For the signal watcher on
/// its way out.
pub fn kill_all() {
    kill_listed(&LIVE_GROUPS, std::time::Duration::from_secs(1));
}

/// Kills the groups in `list`; whether it could. A thread that holds the list for a moment
/// (registering or reaping a program) is waited for, up to `patience`: giving up at once
/// would leave every program alive. A lock held longer (by a thread stopped inside it) is
/// given up on rather than hanging a process on its way out; a poisoned list is still read.
fn kill_listed(list: &std::sync::Mutex<Vec<i32>>, patience: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match list.try_lock() {
            Ok(groups) => {
                kill_groups(&groups);
                return true;
            }
            Err(std::sync::TryLockError::Poisoned(p)) => {
                kill_groups(&p.into_inner());
                return true;
            }
            Err(std::sync::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(std::sync::TryLockError::WouldBlock) => return false,
        }
    }
}

fn kill_groups(groups: &[i32]) {
    for &pid in groups {
        // SAFETY: signals groups whose leaders this process started and has not reaped
        // (reaping removes them from the list first).
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
}

impl Drop for JsonLinesProcess {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            eprintln!("{e}");
        }
    }
}

/// The child's process id, which is also its process group's.
fn pid_of(child: &Child) -> libc::pid_t {
    libc::pid_t::try_from(child.id()).unwrap_or(libc::pid_t::MAX)
}

/// Sets `O_NONBLOCK` on hearth's end of a pipe (the program's end is unaffected).
fn nonblocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: `fcntl` on a descriptor the caller owns, with integer arguments only.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A `poll` entry for `fd` waiting for `events`, or one poll ignores (`fd` -1).
fn pollfd(fd: i32, active: bool, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: if active { fd } else { -1 },
        events,
        revents: 0,
    }
}

/// Waits up to `timeout` for an event on `fds`; a signal ends the wait early (the caller
/// looks at its clock and waits again).
fn wait(fds: &mut [libc::pollfd], timeout: Duration) -> std::io::Result<()> {
    // Rounded up, so a wait never ends just before its deadline and spins.
    let ms = libc::c_int::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
    let n = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
    // SAFETY: `fds` is a live, exclusively borrowed slice of `n` entries.
    if unsafe { libc::poll(fds.as_mut_ptr(), n, ms) } < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// One non-blocking read: `Some(n)` bytes (0 at the end, which sets `eof`), or `None`
/// when nothing is there yet.
fn read_once(
    stdout: &mut ChildStdout,
    scratch: &mut [u8],
    eof: &mut bool,
) -> std::io::Result<Option<usize>> {
    if *eof {
        return Ok(Some(0));
    }
    match stdout.read(scratch) {
        Ok(0) => {
            *eof = true;
            Ok(Some(0))
        }
        Ok(n) => Ok(Some(n)),
        Err(e) if retry(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether an I/O error only means "not now".
fn retry(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

/// Seconds as a message shows them: 0.3 as 0.3, not rounded to 0.
fn seconds(d: Duration) -> String {
    crate::recipe::shown(d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;
    use std::sync::mpsc::channel;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    /// Runs `f` on a thread and fails the test, instead of hanging it, when `f` has not
    /// returned within 30 s (a generous bound: each call here should take a few seconds).
    fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("hung: did not return within 30 s")
    }

    /// Waits (up to 10 s) for the pid a script wrote to `file`.
    fn pid_in(file: &Path) -> u32 {
        for _ in 0..1000 {
            if let Ok(text) = std::fs::read_to_string(file)
                && let Ok(pid) = text.trim().parse()
            {
                return pid;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no pid in {}", file.display());
    }

    /// Whether process `pid` is gone (or a zombie nobody reaped yet) within 10 s.
    fn gone(pid: u32) -> bool {
        for _ in 0..1000 {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return true,
                // The state follows the command name in parentheses.
                Ok(stat) if stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z')) => {
                    return true;
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        false
    }

    #[test]
    fn answers_in_order_while_a_large_request_is_still_being_read() {
        // Three 200 KiB questions, far more than a pipe holds: the program reads one, takes
        // a second, answers with its length. The whole request takes longer than the
        // timeout, but the program keeps making progress, so it is not cut off.
        let script = r#"while IFS= read -r l; do sleep 1; echo "${#l}"; done"#;
        let answers = bounded(move || {
            let mut p = JsonLinesProcess::spawn("reward command", sh(script), 2.5).unwrap();
            let qs: Vec<Value> = (1..=3).map(|i| json!("x".repeat(i * 200_000))).collect();
            let first = p.ask(&qs).unwrap();
            let second = p.ask(&[json!("ab")]).unwrap();
            assert_eq!(p.answered(), 4);
            p.close().unwrap();
            (first, second)
        });
        assert_eq!(answers.0, ["200002", "400002", "600002"]);
        assert_eq!(answers.1, ["4"]);
    }

    #[test]
    fn a_program_that_never_reads_times_out_and_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 1000 & echo $! > '{}'; wait", pidfile.display());
        let mut p = JsonLinesProcess::spawn("reward command", sh(&script), 0.3).unwrap();
        let child = pid_in(&pidfile);
        let (e, p) = bounded(move || {
            // 1 MiB: the write itself blocks once the pipe is full.
            let e = p.ask(&[json!("x".repeat(1 << 20))]).unwrap_err();
            (e.to_string(), p)
        });
        assert!(
            e.starts_with("reward command `sh -c")
                && e.contains("(answer line 1): did not read its input within 0.3 s"),
            "{e}"
        );
        assert!(
            gone(child),
            "the program's child {child} outlived the timeout"
        );
        let e = bounded(move || {
            let mut p = p;
            p.ask(&[json!(1)]).unwrap_err().to_string()
        });
        assert!(e.contains("no longer running"), "{e}");
    }

    #[test]
    fn silence_and_early_exit_are_named() {
        let e = bounded(|| {
            let mut p = JsonLinesProcess::spawn("client command", sh("sleep 1000"), 0.3).unwrap();
            p.ask(&[json!(1)]).unwrap_err().to_string()
        });
        assert!(e.contains("(answer line 1): no answer within 0.3 s"), "{e}");

        let e = bounded(|| {
            let mut p =
                JsonLinesProcess::spawn("client command", sh("read l; echo 1"), 10.0).unwrap();
            p.ask(&[json!(1), json!(2)]).unwrap_err().to_string()
        });
        assert!(
            e.contains("(answer line 2): it exited before answering every question"),
            "{e}"
        );
    }

    #[test]
    fn a_line_beyond_the_answers_fails_the_request_it_came_with() {
        // Both lines arrive together (coreutils' printf writes its buffered output at
        // once), so the extra one is there by the time the answer is read: this request
        // fails, not the next.
        let script = r"while IFS= read -r l; do env printf '1\n2\n'; done";
        let e = bounded(move || {
            let mut p = JsonLinesProcess::spawn("reward command", sh(script), 10.0).unwrap();
            p.ask(&[json!(1)]).unwrap_err().to_string()
        });
        assert!(
            e.contains("(answer line 2): it wrote a line no question asked for"),
            "{e}"
        );
    }

    #[test]
    fn closing_catches_a_line_after_the_last_answer() {
        // The extra line comes only at the end of input: after the last request, where no
        // next question would notice it.
        let script = r"while IFS= read -r l; do echo 1; done; echo bye";
        let (answers, closed) = bounded(move || {
            let mut p = JsonLinesProcess::spawn("reward command", sh(script), 10.0).unwrap();
            let answers = p.ask(&[json!(1)]).unwrap();
            (answers, p.close().map_err(|e| e.to_string()))
        });
        assert_eq!(answers, ["1"]);
        let e = closed.unwrap_err();
        assert!(
            e.contains("(answer line 2): it wrote a line no question asked for"),
            "{e}"
        );

        let closed = bounded(|| {
            let mut p = JsonLinesProcess::spawn(
                "reward command",
                sh("while read l; do echo 1; done"),
                10.0,
            )
            .unwrap();
            p.ask(&[json!(1), json!(2)]).unwrap();
            p.close().map_err(|e| e.to_string())
        });
        assert_eq!(closed, Ok(()));
    }

    #[test]
    fn a_program_may_finish_after_its_input_ends() {
        // It takes a second after the end of its input to write what it keeps; being
        // dropped must not kill it before then.
        let dir = tempfile::tempdir().unwrap();
        let done = dir.path().join("done");
        let script = format!(
            "while IFS= read -r l; do echo 1; done; sleep 1; echo ok > '{}'",
            done.display()
        );
        bounded(move || {
            let mut p = JsonLinesProcess::spawn("reward command", sh(&script), 10.0).unwrap();
            p.ask(&[json!(1)]).unwrap();
        });
        assert_eq!(std::fs::read_to_string(&done).unwrap(), "ok\n");
    }

    #[test]
    fn dropping_kills_what_the_program_left_running() {
        let dir = tempfile::tempdir().unwrap();
        // One child the program leaves behind when it exits, and a program that ignores
        // the end of its input, waiting on another child.
        for script in [
            "sleep 1000 & echo $! > '{}'; while read l; do echo 1; done",
            "sleep 1000 & echo $! > '{}'; read l; echo 1; wait",
        ] {
            let pidfile = dir.path().join("pid");
            let _ = std::fs::remove_file(&pidfile);
            let script = script.replace("{}", &pidfile.display().to_string());
            let mut p = JsonLinesProcess::spawn("client command", sh(&script), 0.5).unwrap();
            let child = pid_in(&pidfile);
            bounded(move || {
                assert_eq!(p.ask(&[json!(1)]).unwrap(), ["1"]);
                drop(p);
            });
            assert!(gone(child), "{script}: its child {child} outlived it");
        }
    }

    /// What the signal watcher kills on its way out (where no `Drop` runs): every live
    /// program's group, children included, as registered; closing afterwards still works
    /// and unregisters it. (Only this test's group is killed: other tests run beside it.)
    #[test]
    fn live_programs_are_registered_and_killed_with_their_children() {
        let (mut p, child, leader) = waiting_on_a_child();
        assert!(live_groups_hold(leader));
        kill_groups(&[leader as i32]);
        assert!(gone(child) && gone(leader), "the group outlived kill_all");
        bounded(move || {
            let _ = p.close();
            assert!(!live_groups_hold(leader));
        });
    }

    /// A list held for a moment by another thread is waited for, not skipped; one held on
    /// and on is given up on within the patience, killing nothing.
    #[test]
    fn kill_listed_waits_out_a_brief_hold_and_gives_up_on_a_long_one() {
        let (mut p, child, leader) = waiting_on_a_child();
        let list = std::sync::Arc::new(std::sync::Mutex::new(vec![leader as i32]));
        let (held, release) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let holder = {
            let list = list.clone();
            std::thread::spawn(move || {
                let _guard = list.lock().unwrap();
                held.0.send(()).unwrap();
                let _ = release.1.recv();
            })
        };
        held.1.recv().unwrap();
        let started = std::time::Instant::now();
        assert!(!kill_listed(&list, std::time::Duration::from_millis(50)));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let alive = std::fs::read_to_string(format!("/proc/{child}/stat"))
            .is_ok_and(|stat| !stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z')));
        assert!(alive, "killed without the list");
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            release.0.send(()).unwrap();
        });
        assert!(kill_listed(&list, std::time::Duration::from_secs(10)));
        assert!(
            gone(child) && gone(leader),
            "the group outlived kill_listed"
        );
        holder.join().unwrap();
        releaser.join().unwrap();
        bounded(move || {
            let _ = p.close();
        });
    }

    /// A program waiting on a child of its own: the program, the child's pid and the
    /// program's (its group's leader).
    fn waiting_on_a_child() -> (JsonLinesProcess, u32, u32) {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 1000 & echo $! > '{}'; wait", pidfile.display());
        let p = JsonLinesProcess::spawn("reward command", sh(&script), 5.0).unwrap();
        let child = pid_in(&pidfile);
        let leader = p.child.id();
        (p, child, leader)
    }

    fn live_groups_hold(pid: u32) -> bool {
        LIVE_GROUPS.lock().unwrap().contains(&(pid as i32))
    }
}
