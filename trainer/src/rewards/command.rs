//! A reward computed by any program: hearth starts it once, without a shell, and for each
//! batch writes one JSON object per completion to its stdin —
//! `{"id": n, "prompt": [{"role", "content"}…], "completion": "…", …extra columns}` — and
//! reads one line per completion from its stdout, in order: a number, `null` (does not
//! apply), or an object with a `reward` field. The program runs locally; nothing leaves
//! the machine unless the program sends it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

use serde_json::{Value, json};

use super::{Reward, Sample};
use crate::{Result, TrainerError};

pub struct CommandReward {
    name: String,
    argv: Vec<String>,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
    timeout: Duration,
    /// Answers read so far, for error messages.
    line: usize,
}

impl CommandReward {
    pub fn spawn(name: String, argv: Vec<String>, timeout_s: f64) -> Result<Self> {
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| TrainerError::Input(format!("cannot start `{}`: {e}", argv[0])))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| TrainerError::Input(format!("`{}`: no stdout pipe", argv[0])))?;
        // A reader thread, so a silent program times out instead of hanging the run.
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            name,
            argv,
            child,
            stdin,
            lines,
            timeout: Duration::from_secs_f64(timeout_s.max(0.001)),
            line: 0,
        })
    }

    fn fail(&self, msg: impl std::fmt::Display) -> TrainerError {
        TrainerError::Input(format!(
            "reward command `{}` (answer line {}): {msg}",
            self.argv.join(" "),
            self.line
        ))
    }

    fn parse(&self, text: &str) -> Result<Option<f64>> {
        let v: Value =
            serde_json::from_str(text.trim()).map_err(|e| self.fail(format!("not JSON ({e})")))?;
        let reward = match &v {
            Value::Object(o) => o.get("reward").cloned().unwrap_or(Value::Null),
            other => other.clone(),
        };
        match reward {
            Value::Null => Ok(None),
            Value::Number(n) => n
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.fail("the reward is not a finite number")),
            _ => {
                Err(self
                    .fail("expected a number, null, or an object with a numeric `reward` field"))
            }
        }
    }
}

impl Reward for CommandReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&mut self, samples: &[Sample<'_>]) -> Result<Vec<Option<f64>>> {
        let mut request = String::new();
        for (id, s) in samples.iter().enumerate() {
            let mut line = json!({
                "id": id,
                "prompt": s.prompt.iter()
                    .map(|m| json!({"role": m.role, "content": m.content}))
                    .collect::<Vec<_>>(),
                "completion": s.completion,
            });
            for (k, v) in s.extra {
                if line.get(k).is_none() {
                    line[k] = v.clone();
                }
            }
            request.push_str(&line.to_string());
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
        let mut out = Vec::with_capacity(samples.len());
        for _ in samples {
            self.line += 1;
            let text = match self.lines.recv_timeout(self.timeout) {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return Err(self.fail(format!("reading its output: {e}"))),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.fail(format!(
                        "no answer within {:.0} s",
                        self.timeout.as_secs_f64()
                    )));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.fail("it exited before answering every completion"));
                }
            };
            out.push(self.parse(&text)?);
        }
        Ok(out)
    }
}

impl Drop for CommandReward {
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

#[cfg(test)]
mod tests {
    use super::*;
    use data::Message;
    use serde_json::Map;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn scores_over_json_lines_and_names_bad_answers() {
        let extra = Map::new();
        let p = [Message::new("user", "hi")];
        let s = |c| Sample {
            prompt: &p,
            completion: c,
            extra: &extra,
        };
        // Answers with each line's completion length: a number, an object, then null.
        let script = r#"while IFS= read -r line; do
            case "$line" in
              *'"completion":"aaa"'*) echo 3 ;;
              *'"completion":"bb"'*) echo '{"reward": 2}' ;;
              *) echo null ;;
            esac
          done"#;
        let mut r = CommandReward::spawn("cmd".into(), sh(script), 10.0).unwrap();
        assert_eq!(
            r.score(&[s("aaa"), s("bb"), s("")]).unwrap(),
            vec![Some(3.0), Some(2.0), None]
        );
        // The process persists across batches.
        assert_eq!(r.score(&[s("bb")]).unwrap(), vec![Some(2.0)]);

        let mut bad = CommandReward::spawn("cmd".into(), sh("read l; echo oops"), 10.0).unwrap();
        let e = bad.score(&[s("x")]).unwrap_err().to_string();
        assert!(e.contains("answer line 1") && e.contains("not JSON"), "{e}");

        let mut quits = CommandReward::spawn("cmd".into(), sh("read l; echo 1"), 10.0).unwrap();
        let e = quits.score(&[s("x"), s("y")]).unwrap_err().to_string();
        assert!(e.contains("exited before answering"), "{e}");

        let mut silent = CommandReward::spawn("cmd".into(), sh("sleep 5"), 0.2).unwrap();
        let e = silent.score(&[s("x")]).unwrap_err().to_string();
        assert!(e.contains("no answer within"), "{e}");

        let e = CommandReward::spawn("cmd".into(), vec!["/no/such/scorer".into()], 1.0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot start `/no/such/scorer`"), "{e}");
    }
}
