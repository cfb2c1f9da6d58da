//! Streaming row readers. Every row arrives as a JSON object with its location, so that
//! format rules and errors are the same whatever the file type.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};

use crate::strict_json::Strict;
use serde_json::{Map, Value};

use crate::DataError;

/// Where a row sits in its file: a 1-based line for JSON Lines, a 0-based index for arrays
/// and columnar files (as `datasets` numbers rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    Line(usize),
    Row(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Line(n) => write!(f, "line {n}"),
            Self::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// One record: its location and its columns.
#[derive(Debug, Clone)]
pub struct Row {
    pub location: Location,
    pub fields: Map<String, Value>,
    /// Columns of a Parquet or Arrow file left out of `fields` because their type has no
    /// JSON value (binary image bytes, say): (name, why). They matter only to a format
    /// that reads them, which then says why instead of calling them missing.
    pub unreadable: Vec<(String, String)>,
}

impl Row {
    /// A row of `fields`, every column read.
    pub fn new(location: Location, fields: Map<String, Value>) -> Self {
        Self {
            location,
            fields,
            unreadable: Vec::new(),
        }
    }
}

/// A row that could not be read, for `skip_bad_rows` to count instead of failing.
#[derive(Debug, Clone)]
pub struct BadRow {
    pub location: Location,
    pub column: Option<String>,
    pub reason: String,
}

impl BadRow {
    pub fn into_error(self, path: &Path) -> DataError {
        DataError::Row {
            path: path.to_path_buf(),
            location: self.location,
            column: self.column,
            reason: self.reason,
        }
    }
}

/// The file types hearth reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    JsonLines,
    JsonArray,
    /// JSON objects one after another, any of them over several lines: a pretty-printed
    /// `.json` file holding one row (or a few).
    JsonObjects,
    Parquet,
    Arrow,
}

impl FileKind {
    /// From the extension; `.json` is a JSON array if its first non-blank byte is `[`,
    /// pretty-printed objects if its first object runs past its first line, else JSON
    /// Lines (as the `datasets` library treats it).
    pub fn detect(path: &Path) -> Result<Self, DataError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "ndjson" => Ok(Self::JsonLines),
            "parquet" => Ok(Self::Parquet),
            "arrow" | "feather" | "ipc" => Ok(Self::Arrow),
            "json" => {
                // Telling the layouts apart reads the start of the file, then the file again
                // from its start: a pipe or a device cannot be read twice, and opening a pipe
                // with no writer waits for one.
                let meta = std::fs::metadata(path).map_err(|e| io(path, e))?;
                if !meta.is_file() {
                    return Err(DataError::Unsupported {
                        path: path.to_path_buf(),
                        reason: "a .json file must be a regular file, which is read twice to \
                                 tell its layout; stream rows through a .jsonl name instead"
                            .into(),
                    });
                }
                let mut reader = BufReader::new(open(path)?);
                skip_bom(&mut reader).map_err(|e| io(path, e))?;
                let mut byte = [0u8; 1];
                loop {
                    let n = reader.read(&mut byte).map_err(|e| io(path, e))?;
                    if n == 0 || !byte[0].is_ascii_whitespace() {
                        break;
                    }
                }
                Ok(match byte[0] {
                    b'[' => Self::JsonArray,
                    b'{' if first_object_spans_lines(path)? => Self::JsonObjects,
                    _ => Self::JsonLines,
                })
            }
            _ => Err(DataError::Unsupported {
                path: path.to_path_buf(),
                reason: "unknown file type (expected .jsonl, .json, .parquet or .arrow)".into(),
            }),
        }
    }
}

/// Whether the first JSON value of `path` is whole and ends on a later line than it
/// starts, or opens with a line that is a lone `{`: a pretty-printed object. Such a file
/// broken inside its first object is still read as one, so the error names the line where
/// it breaks, not line 1. A first line that is broken JSON but not the start of such an
/// object stays a bad line of JSON Lines, which `skip_bad_rows` can pass over.
fn first_object_spans_lines(path: &Path) -> Result<bool, DataError> {
    let mut reader = BufReader::new(open(path)?);
    skip_bom(&mut reader).map_err(|e| io(path, e))?;
    let mut first_line = Vec::new();
    read_line(&mut reader, &mut first_line, path, 1)?;
    if serde_json::from_slice::<Value>(&first_line).is_ok() {
        return Ok(false);
    }
    // No row of JSON Lines is a lone brace; every pretty-printer opens an object so.
    if first_line.trim_ascii() == b"{" {
        return Ok(true);
    }
    let mut reader = BufReader::new(open(path)?);
    skip_bom(&mut reader).map_err(|e| io(path, e))?;
    let mut values = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
    Ok(matches!(values.next(), Some(Ok(Value::Object(_)))))
}

/// The longest line a JSON Lines file may have: far past any conversation, and short of
/// what would exhaust memory on a file that has no line breaks (a binary file, a device).
const MAX_LINE_BYTES: u64 = 1 << 30;

/// Reads one line of `path` into `buf` (cleared first), up to [`MAX_LINE_BYTES`]; the byte
/// count, 0 at the end. A longer line is an error naming it.
fn read_line(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    path: &Path,
    line: usize,
) -> Result<usize, DataError> {
    read_line_within(reader, buf, path, line, MAX_LINE_BYTES)
}

fn read_line_within(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    path: &Path,
    line: usize,
    max: u64,
) -> Result<usize, DataError> {
    buf.clear();
    let n = reader
        .take(max + 1)
        .read_until(b'\n', buf)
        .map_err(|e| io(path, e))?;
    if n as u64 > max {
        return Err(DataError::Unsupported {
            path: path.to_path_buf(),
            reason: format!("line {line} is longer than {max} bytes; is this a JSON Lines file?"),
        });
    }
    Ok(n)
}

fn open(path: &Path) -> Result<File, DataError> {
    File::open(path).map_err(|e| io(path, e))
}

fn io(path: &Path, source: std::io::Error) -> DataError {
    DataError::Io {
        path: PathBuf::from(path),
        source,
    }
}

/// Calls `on_row` for every row of `path`, streaming, in file order. A row that cannot be
/// parsed goes to `on_bad`, which decides whether reading continues (`Ok`) or stops.
pub fn for_each_row(
    path: &Path,
    on_row: &mut dyn FnMut(Row) -> Result<(), DataError>,
    on_bad: &mut dyn FnMut(BadRow) -> Result<(), DataError>,
) -> Result<(), DataError> {
    match FileKind::detect(path)? {
        FileKind::JsonLines => json_lines(path, on_row, on_bad),
        FileKind::JsonArray => json_array(path, on_row, on_bad),
        FileKind::JsonObjects => json_objects(path, on_row, on_bad),
        FileKind::Parquet => crate::columnar::parquet_rows(path, on_row, on_bad),
        FileKind::Arrow => crate::columnar::arrow_rows(path, on_row, on_bad),
    }
}

fn json_lines(
    path: &Path,
    on_row: &mut dyn FnMut(Row) -> Result<(), DataError>,
    on_bad: &mut dyn FnMut(BadRow) -> Result<(), DataError>,
) -> Result<(), DataError> {
    json_lines_from(BufReader::new(open(path)?), path, on_row, on_bad)
}

/// Every row of JSON Lines `text` that ships inside the binary (bundled evaluation sets),
/// read by the same rules as a file; `origin` names it in errors.
pub fn for_each_jsonl_row(
    text: &str,
    origin: &Path,
    on_row: &mut dyn FnMut(Row) -> Result<(), DataError>,
    on_bad: &mut dyn FnMut(BadRow) -> Result<(), DataError>,
) -> Result<(), DataError> {
    json_lines_from(text.as_bytes(), origin, on_row, on_bad)
}

fn json_lines_from(
    mut reader: impl BufRead,
    path: &Path,
    on_row: &mut dyn FnMut(Row) -> Result<(), DataError>,
    on_bad: &mut dyn FnMut(BadRow) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        let n = read_line(&mut reader, &mut buf, path, line + 1)?;
        if n == 0 {
            return Ok(());
        }
        line += 1;
        let location = Location::Line(line);
        let bad = |reason: String| BadRow {
            location,
            column: None,
            reason,
        };
        let text = match std::str::from_utf8(&buf) {
            // Editors on Windows start files with a byte-order mark; it is not data.
            Ok(t) if line == 1 => t.trim_start_matches('\u{feff}').trim(),
            Ok(t) => t.trim(),
            Err(e) => {
                on_bad(bad(format!("not valid UTF-8 (byte {})", e.valid_up_to())))?;
                continue;
            }
        };
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str::<Strict>(text).map(|s| s.0) {
            Ok(Value::Object(fields)) => on_row(Row::new(location, fields))?,
            Ok(other) => on_bad(bad(format!("expected a JSON object, got {}", kind(&other))))?,
            Err(e) => on_bad(bad(format!(
                "invalid JSON at column {}: {}",
                e.column(),
                crate::error::json_message(&e)
            )))?,
        }
    }
}

/// Consumes a UTF-8 byte-order mark at the start of `reader`, if there is one.
fn skip_bom(reader: &mut impl BufRead) -> std::io::Result<()> {
    if reader.fill_buf()?.starts_with(b"\xEF\xBB\xBF") {
        reader.consume(3);
    }
    Ok(())
}

/// What kind of JSON value `v` is, for errors: they name the kind, never the value, which
/// may be what a client said.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether a name taken from the data (a role, a column) may be shown in an error as it is:
/// a short identifier such as `robot` or `text_only`. Anything else in a name's place may
/// be free text (an utterance where a key was expected), so errors give its length instead.
pub(crate) fn showable(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A name from the data as an error shows it: `` `name` `` when [`showable`], else only
/// how long it is.
pub(crate) fn shown_name(name: &str) -> String {
    if showable(name) {
        format!("`{name}`")
    } else {
        format!("a name of {} characters", name.chars().count())
    }
}

/// A cell's value as an error shows it: numbers, booleans and null as they are, a short
/// word (`severe`) quoted, anything longer only by its kind and length, since a cell may
/// hold what a client said.
pub fn shown_value(v: &Value) -> String {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => v.to_string(),
        Value::String(s) if showable(s) => format!("\"{s}\""),
        Value::String(s) => format!("a string of {} characters", s.chars().count()),
        other => kind(other).to_string(),
    }
}

/// JSON objects one after another, each a row numbered from 0 as array elements are.
fn json_objects(
    path: &Path,
    on_row: &mut dyn FnMut(Row) -> Result<(), DataError>,
    on_bad: &mut dyn FnMut(BadRow) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut reader = BufReader::new(open(path)?);
    skip_bom(&mut reader).map_err(|e| io(path, e))?;
    let values = serde_json::Deserializer::from_reader(reader).into_iter::<Strict>();
    for (index, value) in values.map(|v| v.map(|s| s.0)).enumerate() {
        let location = Location::Row(index);
        match value {
            Ok(Value::Object(fields)) => on_row(Row::new(location, fields))?,
            Ok(other) => on_bad(BadRow {
                location,
                column: None,
                reason: format!("expected a JSON object, got {}", kind(&other)),
            })?,
            // The rest cannot be told apart once one value is broken.
            Err(e) => {
                return Err(DataError::json(path, &e));
            }
        }
    }
    Ok(())
}

/// A JSON array, read element by element so a large file is never held whole.
fn json_array(
    path: &Path,
    on_row: &mut dyn FnMut(Row) -> Result<(), DataError>,
    on_bad: &mut dyn FnMut(BadRow) -> Result<(), DataError>,
) -> Result<(), DataError> {
    struct Elements<'a> {
        on_row: &'a mut dyn FnMut(Row) -> Result<(), DataError>,
        on_bad: &'a mut dyn FnMut(BadRow) -> Result<(), DataError>,
        stop: Option<DataError>,
    }
    impl<'de> Visitor<'de> for &mut Elements<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON array of objects")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut index = 0;
            while let Some(Strict(value)) = seq.next_element::<Strict>()? {
                let location = Location::Row(index);
                index += 1;
                let result = match value {
                    Value::Object(fields) => (self.on_row)(Row::new(location, fields)),
                    other => (self.on_bad)(BadRow {
                        location,
                        column: None,
                        reason: format!("expected a JSON object, got {}", kind(&other)),
                    }),
                };
                if let Err(e) = result {
                    self.stop = Some(e);
                    return Err(serde::de::Error::custom("stopped"));
                }
            }
            Ok(())
        }
    }
    impl<'de> DeserializeSeed<'de> for &mut Elements<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }
    let mut elements = Elements {
        on_row,
        on_bad,
        stop: None,
    };
    let mut reader = BufReader::new(open(path)?);
    skip_bom(&mut reader).map_err(|e| io(path, e))?;
    let mut de = serde_json::Deserializer::from_reader(reader);
    let result = (&mut elements).deserialize(&mut de).and_then(|()| de.end());
    if let Some(e) = elements.stop {
        return Err(e);
    }
    result.map_err(|e| DataError::json(path, &e))
}

#[cfg(test)]
mod line_tests {
    use super::*;

    /// A stream with no line break (a binary file, `/dev/zero`) stops at the bound with an
    /// error naming the line, instead of growing one buffer until memory runs out; lines
    /// up to the bound read whole.
    #[test]
    fn a_line_past_the_bound_is_an_error_not_an_allocation() {
        let path = Path::new("zero.jsonl");
        let mut buf = Vec::new();
        let mut endless = BufReader::new(std::io::repeat(0));
        let e = read_line_within(&mut endless, &mut buf, path, 1, 1 << 16)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("zero.jsonl") && e.contains("line 1 is longer"),
            "{e}"
        );
        assert!(buf.len() <= (1 << 16) + 1);
        let mut two = "{}\n{\"a\": 1}".as_bytes();
        assert_eq!(read_line_within(&mut two, &mut buf, path, 1, 3).unwrap(), 3);
        assert_eq!(read_line_within(&mut two, &mut buf, path, 2, 8).unwrap(), 8);
        assert_eq!(read_line_within(&mut two, &mut buf, path, 3, 8).unwrap(), 0);
    }

    /// A named pipe called `.json` is refused before it is opened: opening it with no
    /// writer would wait for ever, and with one the layout check would eat its first rows.
    /// The detection runs on a thread so that a regression fails the test instead of
    /// hanging CI.
    #[test]
    fn a_pretty_object_broken_inside_names_the_line_it_breaks_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.json");
        let text = "{\n  \"prompt\": \"hi\",\n  \"completion\": \"hello\"\n  \"extra\": 1\n}\n";
        std::fs::write(&path, text).unwrap();
        assert_eq!(FileKind::detect(&path).unwrap(), FileKind::JsonObjects);
        let e = for_each_row(&path, &mut |_| Ok(()), &mut |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("one.json: line 4, column 3: invalid JSON"),
            "{e}"
        );
        // JSON Lines whose first row is cut short is still JSON Lines, its bad line 1
        // skippable.
        let lines = dir.path().join("lines.json");
        std::fs::write(&lines, "{\"prompt\": \"hi\",\n{\"prompt\": \"b\"}\n").unwrap();
        assert_eq!(FileKind::detect(&lines).unwrap(), FileKind::JsonLines);
    }

    #[test]
    fn a_json_pipe_is_refused_without_opening_it() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("rows.json");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || tx.send(FileKind::detect(&path).map_err(|e| e.to_string())));
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("detecting a pipe's layout hung");
        let e = got.unwrap_err();
        assert!(e.contains("rows.json") && e.contains("regular file"), "{e}");
        // A pipe named .jsonl is read once, as a stream, and stays allowed.
        let lines = dir.path().join("rows.jsonl");
        assert_eq!(FileKind::detect(&lines).unwrap(), FileKind::JsonLines);
    }
}
