//! The sessions of one step, played in lockstep: every open session's counselor turn
//! decodes in one batch over the policy's streams, then every open session's client turn
//! in one batch over the client's. A session ends at `max_turns` counselor turns, when the
//! client ends it, or before a counselor turn that could take it past
//! `max_session_tokens`.

use burn::tensor::Device;
use data::{ChatTemplate, Message};
use rand_chacha::ChaCha8Rng;

use super::client::{Client, Reply};
use super::streams::Streams;
use super::turns::{after_reply, opening};
use super::{End, SessionRecord, SessionSettings};
use crate::examples::PromptItem;
use crate::generate::Sampling;
use crate::model::Llama;
use crate::{Result, TrainerError};

/// The counselor's side: the policy's tokenizer, template, stop tokens and sampling.
pub struct Counselor<'a> {
    pub template: &'a ChatTemplate,
    pub tokenizer: &'a tokenizers::Tokenizer,
    pub stop: &'a [u32],
    pub sampling: &'a Sampling,
}

/// A session being played.
struct Open {
    messages: Vec<Message>,
    ids: Vec<u32>,
    mask: Vec<u8>,
    /// The counselor's last sampled token (not yet fed), and whether it was a stop token.
    last: Option<(u32, bool)>,
    truncated: usize,
    client_tokens: usize,
    end: Option<End>,
}

/// How often a client that ends where it should open a session is asked again.
const OPENING_ATTEMPTS: usize = 3;

/// Plays `group` sessions from each opening in `idx`, in that order.
#[allow(clippy::too_many_arguments)]
pub fn play(
    policy: &Llama,
    counselor: &Counselor<'_>,
    client: &mut Client,
    settings: &SessionSettings,
    prompts: &[PromptItem],
    idx: &[usize],
    group: usize,
    rng: &mut ChaCha8Rng,
    device: &Device,
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<SessionRecord>> {
    let opening_of: Vec<usize> = idx
        .iter()
        .flat_map(|&i| std::iter::repeat_n(i, group))
        .collect();
    let n = opening_of.len();
    let extras: Vec<_> = opening_of.iter().map(|&i| &prompts[i].extra).collect();
    let names: Vec<String> = opening_of
        .iter()
        .map(|&i| format!("training prompt {}", i + 1))
        .collect();
    let mut open: Vec<Open> = opening_of
        .iter()
        .map(|&i| Open {
            messages: prompts[i].messages.clone(),
            ids: Vec::new(),
            mask: Vec::new(),
            last: None,
            truncated: 0,
            client_tokens: 0,
            end: None,
        })
        .collect();
    let first_new: Vec<usize> = open.iter().map(|o| o.messages.len()).collect();
    let mut clients = client.sessions(policy, &extras, &names)?;

    // The client opens the sessions whose prompt does not end with a client turn.
    let opens: Vec<bool> = open
        .iter()
        .map(|o| o.messages.last().is_none_or(|m| m.role != "user"))
        .collect();
    // A sampled client may end (or say nothing) where it should open: it is asked again,
    // a few times, before the run is stopped over one unlucky draw.
    let mut waiting = opens.clone();
    for attempt in 1..=OPENING_ATTEMPTS {
        if !waiting.iter().any(|&w| w) {
            break;
        }
        let dialogues: Vec<&[Message]> = open.iter().map(|o| o.messages.as_slice()).collect();
        let (replies, tokens) = clients.turn(&dialogues, &waiting, rng)?;
        for (r, reply) in replies.into_iter().enumerate() {
            open[r].client_tokens += tokens[r];
            match reply {
                Some(Reply::Says(text)) => {
                    open[r].messages.push(Message::new("user", text));
                    waiting[r] = false;
                }
                Some(Reply::Ends) if attempt == OPENING_ATTEMPTS => {
                    return Err(TrainerError::Input(format!(
                        "grpo.client ended the session of {} before its opening turn, \
                         {OPENING_ATTEMPTS} times in a row (an empty turn, or its end_text); \
                         check grpo.client.end_text and the persona it plays",
                        names[r]
                    )));
                }
                Some(Reply::Ends) | None => {}
            }
        }
    }
    let mut chunks: Vec<Vec<u32>> = Vec::with_capacity(n);
    for (r, o) in open.iter_mut().enumerate() {
        let ids = if opens[r] {
            opening(counselor.template, counselor.tokenizer, &o.messages)?
        } else {
            prompts[opening_of[r]].ids.clone()
        };
        o.mask = vec![0; ids.len()];
        o.ids.clone_from(&ids);
        chunks.push(ids);
    }

    let mut streams = Streams::new(policy, n, device);
    let budget = settings.max_session_tokens;
    let max_new = counselor.sampling.max_new_tokens;
    // Later turns are held to the budget before they start; the first must fit too, or the
    // session would run past it (or, ended at once, hold nothing to learn from).
    for (r, o) in open.iter().enumerate() {
        if o.ids.len() + max_new > budget {
            // Who wrote the opening says what can be shortened.
            let fix = if opens[r] {
                "lower grpo.client.max_new_tokens (the client wrote its opening turn)"
            } else {
                "shorten the opening"
            };
            return Err(TrainerError::Input(format!(
                "training prompt {}: its opening takes {} tokens, and with \
                 grpo.max_completion_length = {max_new} the first counselor turn could reach {}, \
                 past grpo.max_session_tokens = {budget}; raise max_session_tokens or {fix}",
                opening_of[r] + 1,
                o.ids.len(),
                o.ids.len() + max_new
            )));
        }
    }
    for turn in 0..settings.max_turns {
        progress(open.iter().filter(|o| o.end.is_some()).count(), n);
        streams.feed(&chunks)?;
        let speaks: Vec<bool> = open.iter().map(|o| o.end.is_none()).collect();
        if !speaks.iter().any(|&s| s) {
            break;
        }
        let replies = streams.decode(&speaks, counselor.stop, counselor.sampling, rng)?;
        for (o, reply) in open.iter_mut().zip(replies) {
            let Some(reply) = reply else { continue };
            let trained = reply.trained_tokens();
            o.ids.extend(&trained);
            o.mask.extend(std::iter::repeat_n(1u8, trained.len()));
            o.truncated += usize::from(reply.stop.is_none());
            o.last = trained.last().map(|&t| (t, reply.stop.is_some()));
            let text = counselor
                .tokenizer
                .decode(&reply.tokens, false)
                .unwrap_or_default();
            o.messages.push(Message::new("assistant", text));
            if turn + 1 == settings.max_turns {
                o.end = Some(End::MaxTurns);
            }
        }
        let speaks: Vec<bool> = open.iter().map(|o| o.end.is_none()).collect();
        if !speaks.iter().any(|&s| s) {
            break;
        }
        let dialogues: Vec<&[Message]> = open.iter().map(|o| o.messages.as_slice()).collect();
        let (replies, tokens) = clients.turn(&dialogues, &speaks, rng)?;
        chunks = vec![Vec::new(); n];
        for (r, reply) in replies.into_iter().enumerate() {
            let o = &mut open[r];
            o.client_tokens += tokens[r];
            match reply {
                None => {}
                Some(Reply::Ends) => o.end = Some(End::Client),
                Some(Reply::Says(text)) => {
                    let said = o.messages.len() - 1;
                    o.messages.push(Message::new("user", text));
                    let (last, stopped) = o.last.unwrap_or((0, false));
                    let tail = after_reply(
                        counselor.template,
                        counselor.tokenizer,
                        &o.messages[..said],
                        &o.messages[said + 1..],
                        stopped.then_some(last),
                    )?;
                    if o.ids.len() + tail.len() + max_new > budget {
                        o.end = Some(End::Length);
                        continue;
                    }
                    o.ids.extend(&tail);
                    o.mask.extend(std::iter::repeat_n(0u8, tail.len()));
                    chunks[r] = std::iter::once(last).chain(tail).collect();
                }
            }
        }
    }
    progress(n, n);
    Ok(open
        .into_iter()
        .zip(opening_of)
        .zip(first_new)
        .map(|((o, opening), first_new)| SessionRecord {
            opening,
            messages: o.messages,
            first_new,
            ids: o.ids,
            loss_mask: o.mask,
            truncated_turns: o.truncated,
            client_tokens: o.client_tokens,
            end: o.end.unwrap_or(End::MaxTurns),
        })
        .collect())
}

/// Refuses, before any step, a row of `file` whose written opening (one ending with the
/// client's turn, which the counselor answers first) leaves its first counselor turn no
/// room under `grpo.max_session_tokens`; found in a rollout, it stopped the run mid-way
/// without naming the file. An opening the client writes is only known when it speaks.
pub fn check_openings(
    prompts: &[crate::examples::PromptItem],
    settings: &super::SessionSettings,
    max_new: usize,
    file: &std::path::Path,
) -> Result<()> {
    let budget = settings.max_session_tokens;
    for (i, p) in prompts.iter().enumerate() {
        let counselor_answers = p.messages.last().is_some_and(|m| m.role == "user");
        if counselor_answers && p.ids.len() + max_new > budget {
            return Err(TrainerError::Input(format!(
                "{}: training prompt {}: its opening takes {} tokens, and with \
                 grpo.max_completion_length = {max_new} the first counselor turn could reach {}, \
                 past grpo.max_session_tokens = {budget}; raise max_session_tokens or shorten \
                 the opening",
                file.display(),
                i + 1,
                p.ids.len(),
                p.ids.len() + max_new
            )));
        }
    }
    Ok(())
}
