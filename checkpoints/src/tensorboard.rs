//! TensorBoard event files: every line of `metrics.jsonl` also becomes one event under
//! `tb/`, its numbers as scalars under the same names, so `tensorboard --logdir RUN_DIR`
//! shows a run as it trains.
//!
//! The format is TensorFlow's TFRecord of `Event` protobufs: per record the payload's length
//! (u64, little-endian), the masked CRC-32C of those 8 bytes, the payload, and the payload's
//! masked CRC-32C. The three messages used (`Event`, `Summary`, `Summary.Value`) are declared
//! here with prost, field numbers as in TensorFlow's `event.proto` and `summary.proto`;
//! scalars use `simple_value`, which TensorBoard reads as scalar summaries. (The
//! `tensorboard-rs` crate does the same with protobuf 2 and the `image` crate, and is no
//! longer maintained.)

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use serde_json::Value;

use crate::{CheckpointError, Result};

/// The directory under a run that holds its event files.
pub const TB_DIR: &str = "tb";
/// The run's one event file (TensorBoard reads any file with `tfevents` in its name).
pub const EVENTS_FILE: &str = "events.out.tfevents.hearth";

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

/// `Event.what`: the version header, or a summary.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a scalar. TensorFlow declares `simple_value` inside a
/// `oneof`, whose field is written even when it is 0; as a plain proto3 float a 0 would be
/// left out, and TensorBoard would drop the point.
#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// TFRecord's checksum: CRC-32C, rotated and offset so a CRC of data holding CRCs stays
/// well distributed.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `payload`.
pub fn record(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc(payload).to_le_bytes());
    out
}

/// The records of a file, each CRC-checked; an error names the record and what is wrong.
pub fn read_records(bytes: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let n = out.len() + 1;
        let head = bytes
            .get(at..at + 12)
            .ok_or_else(|| format!("record {n}: cut short in its header"))?;
        let (len, crc) = head.split_at(8);
        if masked_crc(len).to_le_bytes() != crc {
            return Err(format!("record {n}: the length's CRC does not match"));
        }
        let len = u64::from_le_bytes(len.try_into().unwrap_or_default()) as usize;
        let body = bytes
            .get(at + 12..at + 12 + len + 4)
            .ok_or_else(|| format!("record {n}: cut short in its payload"))?;
        let (payload, crc) = body.split_at(len);
        if masked_crc(payload).to_le_bytes() != crc {
            return Err(format!("record {n}: the payload's CRC does not match"));
        }
        out.push(payload.to_vec());
        at += 12 + len + 4;
    }
    Ok(out)
}

/// Every scalar in the event file at `path`, in order: `(step, tag, value)`. Records are
/// CRC-checked; the file must open with the version header.
pub fn read_scalars(path: &Path) -> Result<Vec<(i64, String, f32)>> {
    let mut out = Vec::new();
    for event in read_events(path)? {
        if let Some(What::Summary(s)) = event.what {
            out.extend(
                s.value
                    .into_iter()
                    .filter_map(|v| Some((event.step, v.tag, v.simple_value?))),
            );
        }
    }
    Ok(out)
}

/// Every event in the file at `path`, the version header first. Records are CRC-checked;
/// the file must open with the version header.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    let bad = |reason: String| CheckpointError::Run {
        path: path.to_path_buf(),
        reason,
    };
    let mut out = Vec::new();
    for (i, payload) in read_records(&bytes).map_err(bad)?.iter().enumerate() {
        let event = Event::decode(payload.as_slice())
            .map_err(|e| bad(format!("record {}: not an Event ({e})", i + 1)))?;
        match (i, &event.what) {
            (0, Some(What::FileVersion(v))) if v.starts_with("brain.Event:") => {}
            (0, _) => return Err(bad("it does not start with a file version record".into())),
            _ => {}
        }
        out.push(event);
    }
    Ok(out)
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The event of one metrics line: every number in it but `step` as a scalar; `None` for a
/// line without a step or without numbers.
pub fn event_of(line: &Value, wall_time: f64) -> Option<Event> {
    let o = line.as_object()?;
    let step = o.get("step")?.as_i64()?;
    let value: Vec<SummaryValue> = o
        .iter()
        .filter(|(k, _)| k.as_str() != "step")
        .filter_map(|(k, v)| {
            Some(SummaryValue {
                tag: k.clone(),
                simple_value: Some(v.as_f64()? as f32),
            })
        })
        .collect();
    (!value.is_empty()).then_some(Event {
        wall_time,
        step,
        what: Some(What::Summary(Summary { value })),
    })
}

fn header(wall_time: f64) -> Vec<u8> {
    record(
        &Event {
            wall_time,
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        }
        .encode_to_vec(),
    )
}

fn io(path: &Path, e: std::io::Error) -> CheckpointError {
    CheckpointError::io(path, e)
}

/// The event file of the run in `root`.
pub fn events_path(root: &Path) -> PathBuf {
    root.join(TB_DIR).join(EVENTS_FILE)
}

/// Appends `line`'s event to the run's event file, starting the file (with its version
/// header) when there is none.
pub fn append(root: &Path, line: &Value) -> Result<()> {
    let Some(event) = event_of(line, now()) else {
        return Ok(());
    };
    let path = events_path(root);
    let mut bytes = Vec::new();
    if !path.exists() {
        let dir = root.join(TB_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        bytes.extend(header(event.wall_time));
    }
    bytes.extend(record(&event.encode_to_vec()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    f.write_all(&bytes).map_err(|e| io(&path, e))?;
    f.flush().map_err(|e| io(&path, e))
}

/// Rewrites the run's event file from `lines` (a resumed run's `metrics.jsonl`, cut back to
/// its checkpoint), so the events never hold steps the metrics no longer do. The new file
/// replaces the old one whole. Each event kept keeps the wall time it was logged at (the
/// old file's events of its step, taken in order), so TensorBoard's relative-time axis
/// still shows when each step ran; only a line the old file lacks (or an unreadable old
/// file) is stamped now.
pub fn rewrite(root: &Path, lines: &[Value]) -> Result<()> {
    let now = now();
    let old = read_events(&events_path(root)).unwrap_or_default();
    let started = old.first().map_or(now, |e| e.wall_time);
    let mut logged: HashMap<i64, VecDeque<f64>> = HashMap::new();
    for e in old.iter().skip(1) {
        if matches!(e.what, Some(What::Summary(_))) {
            logged.entry(e.step).or_default().push_back(e.wall_time);
        }
    }
    let mut bytes = header(started);
    for line in lines {
        let Some(mut event) = event_of(line, now) else {
            continue;
        };
        if let Some(t) = logged.get_mut(&event.step).and_then(VecDeque::pop_front) {
            event.wall_time = t;
        }
        bytes.extend(record(&event.encode_to_vec()));
    }
    let dir = root.join(TB_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    crate::write_bytes(&events_path(root), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_its_mask_match_known_values() {
        // CRC-32C's check value, and TFRecord's mask applied by hand.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // TFRecord's mask as its spec writes it, in 64 bits: ((crc >> 15) | (crc << 17)) + δ.
        let crc: u64 = 0xe306_9283;
        let masked = (((crc >> 15) | ((crc << 17) & 0xffff_ffff)) + 0xa282_ead8) as u32;
        assert_eq!(masked_crc(b"123456789"), masked);
    }

    #[test]
    fn records_round_trip_and_corruption_is_named() {
        let mut file = record(b"hello");
        file.extend(record(b""));
        assert_eq!(
            read_records(&file).unwrap(),
            vec![b"hello".to_vec(), Vec::new()]
        );
        let mut bad = file.clone();
        bad[13] ^= 1;
        assert_eq!(
            read_records(&bad).unwrap_err(),
            "record 1: the payload's CRC does not match"
        );
        assert!(
            read_records(&file[..file.len() - 2])
                .unwrap_err()
                .contains("record 2")
        );
    }

    /// A resumed run's rewrite drops the steps past its checkpoint and keeps the wall time
    /// of every event it keeps, the header's too; a line the old file lacks is stamped now.
    #[test]
    fn a_rewrite_keeps_each_kept_events_wall_time() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let line = |step: i64, key: &str| serde_json::json!({"step": step, key: 1.0});
        let logged = [
            line(1, "loss"),
            line(2, "loss"),
            line(2, "eval_loss"),
            line(3, "loss"),
        ];
        for l in &logged {
            append(root, l).unwrap();
        }
        let path = events_path(root);
        let before = read_events(&path).unwrap();
        // Stamps a second apart, as a run writes them over time.
        let bytes: Vec<u8> = before
            .iter()
            .enumerate()
            .flat_map(|(i, e)| {
                let mut e = e.clone();
                e.wall_time = 1000.0 + i as f64;
                record(&e.encode_to_vec())
            })
            .collect();
        std::fs::write(&path, bytes).unwrap();
        let started = now();
        rewrite(
            root,
            &[
                logged[0].clone(),
                logged[1].clone(),
                logged[2].clone(),
                line(5, "loss"),
            ],
        )
        .unwrap();
        let after: Vec<(i64, f64)> = read_events(&path)
            .unwrap()
            .iter()
            .map(|e| (e.step, e.wall_time))
            .collect();
        assert_eq!(
            after[..4],
            [(0, 1000.0), (1, 1001.0), (2, 1002.0), (2, 1003.0)]
        );
        assert_eq!(after.len(), 5, "{after:?}");
        assert_eq!(after[4].0, 5);
        assert!(after[4].1 >= started, "{after:?}");
    }

    #[test]
    fn a_metrics_line_becomes_one_event_of_its_numbers() {
        let line = serde_json::json!({"step": 7, "loss": 1.5, "learning_rate": 0.0, "note": "x"});
        let e = event_of(&line, 12.0).unwrap();
        assert_eq!((e.step, e.wall_time), (7, 12.0));
        let Some(What::Summary(s)) = e.what else {
            panic!("not a summary")
        };
        let tags: Vec<(&str, f32)> = s
            .value
            .iter()
            .map(|v| (v.tag.as_str(), v.simple_value.unwrap()))
            .collect();
        assert_eq!(tags, [("loss", 1.5), ("learning_rate", 0.0)]);
        // A zero is on the wire: its field is written, as TensorFlow's oneof writes it.
        let bytes = prost::Message::encode_to_vec(&s.value[1]);
        assert_eq!(&bytes[bytes.len() - 5..], &[0x15, 0, 0, 0, 0]);
        assert!(event_of(&serde_json::json!({"loss": 1.0}), 0.0).is_none());
    }
}
