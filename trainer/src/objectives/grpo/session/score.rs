//! One reward per session. Rules judge every counselor turn (against the dialogue before
//! it) and `aggregate` folds their scores; `crisis_safety` always takes the worst turn, so
//! a session with one unsafe reply carries that reply's penalty however long it is. A
//! reward model and a command judge the whole session once: the dialogue up to the
//! counselor's last turn is the prompt, that turn the completion.

use serde_json::{Map, Value};

use super::{Aggregate, SessionRecord};
use crate::Result;
use crate::rewards::{Column, Rewards, Sample};

/// Kinds that judge the whole session at once.
fn whole_session(kind: &str) -> bool {
    matches!(kind, "reward_model" | "command")
}

/// Each session's weighted reward, and each reward's score per session (its column, as
/// [`Rewards::score_columns`] gives for single turns). `kinds[k]` is reward `k`'s kind;
/// `extras[s]` session `s`'s row columns.
pub fn score_sessions(
    rewards: &mut Rewards,
    kinds: &[String],
    sessions: &[SessionRecord],
    extras: &[&Map<String, Value>],
    aggregate: Aggregate,
) -> Result<(Vec<f64>, Vec<Column>)> {
    let mut total = vec![0.0; sessions.len()];
    let mut columns = Vec::with_capacity(kinds.len());
    // Every counselor turn as a sample, and the session it belongs to.
    let mut turns: Vec<Sample<'_>> = Vec::new();
    let mut owner: Vec<usize> = Vec::new();
    // The whole session as one sample.
    let mut whole: Vec<Sample<'_>> = Vec::with_capacity(sessions.len());
    for (s, session) in sessions.iter().enumerate() {
        let mut last = None;
        for (prompt, completion) in session.counselor_turns() {
            let sample = Sample {
                prompt,
                completion,
                extra: extras[s],
            };
            turns.push(sample);
            owner.push(s);
            last = Some(sample);
        }
        whole.push(last.unwrap_or(Sample {
            prompt: &session.messages,
            completion: "",
            extra: extras[s],
        }));
    }
    for (w, kind) in rewards.0.iter_mut().zip(kinds) {
        let scores = if whole_session(kind) {
            w.scores(&whole)?
        } else {
            let per_turn = w.scores(&turns)?;
            let mut by_session: Vec<Vec<f64>> = vec![Vec::new(); sessions.len()];
            for (&s, score) in owner.iter().zip(&per_turn) {
                by_session[s].extend(*score);
            }
            let fold = if kind == "crisis_safety" {
                Aggregate::Min
            } else {
                aggregate
            };
            by_session.iter().map(|v| fold.fold(v)).collect()
        };
        w.add_to(&mut total, &scores);
        columns.push(scores);
    }
    Ok((total, columns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewards::{Reward, Weighted};
    use data::Message;

    /// Scores each turn by its word count, and remembers what it was asked.
    struct Words(&'static str);
    impl Reward for Words {
        fn name(&self) -> &str {
            self.0
        }
        fn score(&mut self, samples: &[Sample<'_>]) -> Result<Vec<Option<f64>>> {
            Ok(samples
                .iter()
                .map(|s| Some(s.completion.split_whitespace().count() as f64))
                .collect())
        }
    }

    fn session(turns: &[(&str, &str)]) -> SessionRecord {
        let mut messages = vec![Message::new("system", "Be kind.")];
        for (client, counselor) in turns {
            messages.push(Message::new("user", *client));
            messages.push(Message::new("assistant", *counselor));
        }
        SessionRecord {
            opening: 0,
            messages,
            first_new: 2,
            ids: Vec::new(),
            loss_mask: Vec::new(),
            truncated_turns: 0,
            client_tokens: 0,
            end: super::super::End::MaxTurns,
        }
    }

    #[test]
    fn turn_rewards_fold_by_aggregate_and_whole_session_rewards_see_it_once() {
        let s = [
            session(&[("hi", "one two"), ("more", "a b c d"), ("bye", "x")]),
            session(&[("hi", "w w w")]),
        ];
        let extra = Map::new();
        let extras = [&extra, &extra];
        for whole_kind in ["command", "reward_model"] {
            let kinds = ["length".to_string(), whole_kind.to_string()];
            for (agg, want) in [
                (Aggregate::Mean, [7.0 / 3.0, 3.0]),
                (Aggregate::Last, [1.0, 3.0]),
                (Aggregate::Min, [1.0, 3.0]),
                (Aggregate::Sum, [7.0, 3.0]),
            ] {
                let mut r = Rewards(vec![
                    Weighted {
                        reward: Box::new(Words("turns")),
                        weight: 1.0,
                    },
                    Weighted {
                        reward: Box::new(Words("whole")),
                        weight: 10.0,
                    },
                ]);
                let (total, columns) = score_sessions(&mut r, &kinds, &s, &extras, agg).unwrap();
                let m = r.metrics_of(&columns);
                // The whole-session reward scored the last counselor turn, with everything
                // before it as the prompt: 1 word and 3 words.
                assert_eq!(total, vec![want[0] + 10.0, want[1] + 30.0], "{agg:?}");
                assert_eq!(m.get("rewards/whole/mean"), Some(2.0));
                assert_eq!(m.get("rewards/turns/mean"), Some((want[0] + want[1]) / 2.0));
            }
        }
    }

    #[test]
    fn one_unsafe_turn_sets_the_crisis_score_of_the_session() {
        let mut s = session(&[
            ("I want to die", "Please call a crisis line now."),
            ("I still want to die", "Calm down, it's not that bad."),
            ("ok", "Take care."),
        ]);
        s.first_new = 1;
        let extra = Map::new();
        let mut r = Rewards(vec![Weighted {
            reward: Box::new(crate::rewards::rules::CrisisSafety::new(
                "crisis_safety".into(),
            )),
            weight: 1.0,
        }]);
        let kinds = ["crisis_safety".to_string()];
        // Turn scores +1 (help), −1 (minimising), none (no risk): the session takes −1
        // even when the others are averaged.
        let (total, _) = score_sessions(&mut r, &kinds, &[s], &[&extra], Aggregate::Mean).unwrap();
        assert_eq!(total, vec![-1.0]);
    }
}
