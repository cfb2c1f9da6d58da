//! An external program that answers JSON lines: hearth starts it once, without a shell,
//! writes one JSON object per question to its stdin and reads one line per question from
//! its stdout, in order. The command reward and the session client both speak this way.
//! A reader thread lets a silent program time out instead of hanging the run, and every
//! failure names the program and the answer line it stopped at.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

use serde_json::Value;

use crate::{Result, TrainerError};

pub struct JsonLinesProcess {
    /// What the program is to the run ("reward command", "client command"), for errors.
    role: &'static str,
    argv: Vec<String>,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
    timeout: Duration,
    /// Answers read so far, for error messages.
    line: usize,
}

impl JsonLinesProcess {
    pub fn spawn(role: &'static str, argv: Vec<String>, timeout_s: f64) -> Result<Self> {
        let program = argv
            .first()
            .ok_or_else(|| TrainerError::Input(format!("{role}: the command is empty")))?;
        let mut child = Command::new(program)
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| TrainerError::Input(format!("cannot start `{program}`: {e}")))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| TrainerError::Input(format!("`{program}`: no stdout pipe")))?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            role,
            argv,
            child,
            stdin,
            lines,
            timeout: Duration::from_secs_f64(timeout_s.max(0.001)),
            line: 0,
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

    /// Writes `questions`, one line each, and reads one answer line per question; the
    /// timeout applies to each answer.
    ///
    /// A line waiting before the questions are written answers nothing asked: the program
    /// wrote more than one line for some question (or a line unasked). Every answer since
    /// then belongs to another question than the one it was read for, so that is an error,
    /// found at the next question after the extra line arrives.
    pub fn ask(&mut self, questions: &[Value]) -> Result<Vec<String>> {
        if let Ok(extra) = self.lines.try_recv() {
            let what = match extra {
                Ok(_) => "a line no question asked for",
                Err(_) => "unreadable output no question asked for",
            };
            return Err(self.fail_at(
                self.line + 1,
                format!(
                    "it wrote {what}, so its answers no longer line up with the questions; \
                     write exactly one line per question to stdout (logs go to stderr)"
                ),
            ));
        }
        let mut request = String::new();
        for q in questions {
            request.push_str(&q.to_string());
            request.push('\n');
        }
        let written = match self.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(request.as_bytes())
                .and_then(|()| stdin.flush()),
            None => Err(std::io::Error::other("stdin closed")),
        };
        if let Err(e) = written {
            return Err(self.fail(format!("cannot write to it ({e}); did it exit?")));
        }
        let mut out = Vec::with_capacity(questions.len());
        for _ in questions {
            self.line += 1;
            match self.lines.recv_timeout(self.timeout) {
                Ok(Ok(t)) => out.push(t),
                Ok(Err(e)) => return Err(self.fail(format!("reading its output: {e}"))),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.fail(format!(
                        "no answer within {:.0} s",
                        self.timeout.as_secs_f64()
                    )));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.fail("it exited before answering every question"));
                }
            }
        }
        Ok(out)
    }
}

impl Drop for JsonLinesProcess {
    fn drop(&mut self) {
        // Closing stdin asks the program to finish; kill it if it lingers.
        self.stdin.take();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
