//! A reward computed by any program: hearth starts it once, without a shell, and for each
//! batch writes one JSON object per completion to its stdin —
//! `{"id": n, "prompt": [{"role", "content"}…], "completion": "…", …extra columns}` — and
//! reads one line per completion from its stdout, in order: a number, `null` (does not
//! apply), or an object with a `reward` field. The program runs locally; nothing leaves
//! the machine unless the program sends it.

use serde_json::{Value, json};

use super::{Reward, Sample};
use crate::Result;
use crate::jsonl_process::JsonLinesProcess;

pub struct CommandReward {
    name: String,
    process: JsonLinesProcess,
}

impl CommandReward {
    pub fn spawn(name: String, argv: Vec<String>, timeout_s: f64) -> Result<Self> {
        Ok(Self {
            name,
            process: JsonLinesProcess::spawn("reward command", argv, timeout_s)?,
        })
    }

    /// Answer line `line`'s reward.
    fn parse(process: &JsonLinesProcess, line: usize, text: &str) -> Result<Option<f64>> {
        let fail = |msg: &str| process.fail_at(line, msg);
        let v: Value = serde_json::from_str(text.trim())
            .map_err(|e| process.fail_at(line, format!("not JSON ({e})")))?;
        let reward = match &v {
            // A misspelt or missing key is no "does not apply": that is `null`, said so.
            Value::Object(o) => o.get("reward").cloned().ok_or_else(|| {
                fail("an object without a `reward` field (write {\"reward\": x}, or null where the reward does not apply)")
            })?,
            other => other.clone(),
        };
        match reward {
            Value::Null => Ok(None),
            Value::Number(n) => n
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| fail("the reward is not a finite number")),
            _ => Err(fail(
                "expected a number, null, or an object with a numeric `reward` field",
            )),
        }
    }
}

impl Reward for CommandReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn finish(&mut self) -> Result<()> {
        self.process.close()
    }

    fn score(&mut self, samples: &[Sample<'_>]) -> Result<Vec<Option<f64>>> {
        let questions: Vec<Value> = samples
            .iter()
            .enumerate()
            .map(|(id, s)| {
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
                line
            })
            .collect();
        self.process.ask_parsed(&questions, Self::parse)
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
        // An answer that arrives over several reads is one line: the part searched for its
        // end already is not searched again (long answers took quadratic time).
        let mut slow = CommandReward::spawn(
            "cmd".into(),
            sh("read l; printf '1'; sleep 0.1; printf '    '; sleep 0.1; printf '2\\n'"),
            10.0,
        )
        .unwrap();
        let e = slow.score(&[s("x")]).unwrap_err().to_string();
        assert!(e.contains("answer line 1") && e.contains("not JSON"), "{e}");
        let mut split = CommandReward::spawn(
            "cmd".into(),
            sh("read l; printf '1'; sleep 0.1; printf '2'; sleep 0.1; printf '\\n'"),
            10.0,
        )
        .unwrap();
        assert_eq!(split.score(&[s("x")]).unwrap(), vec![Some(12.0)]);
        // An object whose key is not `reward` is an error, not a reward that does not
        // apply (every reward was silently 0, and nothing was learned).
        let mut misnamed =
            CommandReward::spawn("cmd".into(), sh(r#"read l; echo '{"score": 1}'"#), 10.0).unwrap();
        let e = misnamed.score(&[s("x")]).unwrap_err().to_string();
        assert!(
            e.contains("answer line 1") && e.contains("without a `reward` field"),
            "{e}"
        );
        // After an answer it refused, the program's later lines are no second error
        // (closing it printed one, so the run failed with two lines).
        let mut chatty = CommandReward::spawn(
            "cmd".into(),
            sh(r#"read l; echo '{"score": 1}'; sleep 0.2; echo extra"#),
            10.0,
        )
        .unwrap();
        assert!(chatty.score(&[s("x")]).is_err());
        std::thread::sleep(std::time::Duration::from_millis(400));
        assert!(chatty.finish().is_ok());

        // Two lines per question, or a line before the first: the answers read were
        // shifted. The batch fails if the extra line is there by the time its answers
        // are, else the next batch does, instead of scoring with them. Where the extra
        // line shows first depends on timing, so each script lists where it may show.
        for (script, lines) in [
            ("while read l; do echo 1; echo 2; done", &[3][..]),
            ("echo 5; while read l; do echo 1; done", &[1, 3][..]),
        ] {
            let mut chatty = CommandReward::spawn("cmd".into(), sh(script), 10.0).unwrap();
            let e = match chatty.score(&[s("x"), s("y")]) {
                Err(e) => e,
                Ok(_) => {
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    chatty.score(&[s("z")]).unwrap_err()
                }
            }
            .to_string();
            assert!(
                lines
                    .iter()
                    .any(|l| e.contains(&format!("(answer line {l})")))
                    && e.contains("no question asked for"),
                "{script}: {e}"
            );
        }

        let mut quits = CommandReward::spawn("cmd".into(), sh("read l; echo 1"), 10.0).unwrap();
        let e = quits.score(&[s("x"), s("y")]).unwrap_err().to_string();
        assert!(e.contains("exited before answering every question"), "{e}");

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
