//! Parquet and Arrow IPC files, read record batch by record batch (never whole) and turned
//! into rows of JSON values, so every format rule downstream is shared with JSON input.

use std::cell::Cell;
use std::fs::File;
use std::io::BufReader;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Once;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type,
    UInt32Type, UInt64Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{ArrowError, DataType};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Number, Value};

use crate::DataError;
use crate::read::{BadRow, Location, Row, showable};

const BATCH_ROWS: usize = 1024;

fn unreadable(path: &Path, reason: impl std::fmt::Display) -> DataError {
    let reason = reason.to_string();
    // arrow's words for a codec this build leaves out name a Cargo feature; say what to do.
    let parquet = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    let left_out = ["lz4", "brotli", "lzo"]
        .into_iter()
        .find(|codec| reason.contains("feature") && reason.to_lowercase().contains(codec));
    let reason = match left_out {
        Some(codec) if parquet => format!(
            "it is compressed with {codec}, which hearth does not read; write it with snappy \
             (the default), zstd or gzip (pyarrow: `pq.write_table(table, path, \
             compression=\"zstd\")`)"
        ),
        Some(codec) => format!(
            "it is compressed with {codec}, which hearth does not read; write it uncompressed \
             or with zstd (pyarrow: `feather.write_feather(table, path, compression=\"zstd\")`), \
             or as Parquet"
        ),
        None => format!("cannot read: {reason}"),
    };
    DataError::Unsupported {
        path: PathBuf::from(path),
        reason,
    }
}

fn open(path: &Path) -> Result<File, DataError> {
    File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

thread_local! {
    /// Set while [`decoding`] runs a decoder step on this thread: its panics are caught and
    /// reported as errors, so the panic hook stays quiet for them.
    static DECODING: Cell<bool> = const { Cell::new(false) };
}

/// Runs one step of the Arrow or Parquet decoders over `path`. They trust offsets and
/// lengths read from the file and assert on them (`Buffer::slice`, alignment, unwraps on
/// footer fields), so a damaged file panics inside them rather than returning an error:
/// such a panic becomes an error naming the file, and nothing is printed for it.
fn decoding<T>(path: &Path, step: impl FnOnce() -> Result<T, DataError>) -> Result<T, DataError> {
    static QUIET_HOOK: Once = Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !DECODING.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let outer = DECODING.with(|d| d.replace(true));
    let result = catch_unwind(AssertUnwindSafe(step));
    DECODING.with(|d| d.set(outer));
    result.unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("the decoder failed");
        // The decoders' messages hold offsets and lengths, never cell values; keep the
        // first line, and not all of a long one.
        let why: String = why
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(160)
            .collect();
        Err(unreadable(path, format!("the file is damaged ({why})")))
    })
}

/// Rows of a Parquet file (any of its compressions: snappy, zstd, none).
pub fn parquet_rows(
    path: &Path,
    on_row: &mut dyn FnMut(Row) -> Result<(), DataError>,
    on_bad: &mut dyn FnMut(BadRow) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let file = open(path)?;
    let reader = decoding(path, || {
        ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| unreadable(path, e))?
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| unreadable(path, e))
    })?;
    batches_to_rows(path, reader, on_row, on_bad)
}

/// Rows of an Arrow IPC file, in the file format or the stream format (`datasets` caches).
/// Arrays are validated as they are decoded (arrow's default, kept on): offsets, lengths
/// and UTF-8 are checked before any value is read.
pub fn arrow_rows(
    path: &Path,
    on_row: &mut dyn FnMut(Row) -> Result<(), DataError>,
    on_bad: &mut dyn FnMut(BadRow) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut file = open(path)?;
    // The file format starts with its magic; its own error then says what is wrong, where
    // the stream reader's fallback would only find garbage.
    let mut magic = [0u8; 6];
    let is_file_format = std::io::Read::read_exact(&mut file, &mut magic).is_ok()
        && &magic == b"ARROW1"
        && std::io::Seek::rewind(&mut file).is_ok();
    let file = if is_file_format { file } else { open(path)? };
    match decoding(path, || {
        Ok(arrow_ipc::reader::FileReader::try_new(file, None))
    })? {
        Ok(reader) => batches_to_rows(path, reader, on_row, on_bad),
        Err(e) if is_file_format => Err(unreadable(path, e)),
        Err(_) => {
            let stream = BufReader::new(open(path)?);
            let reader = decoding(path, || {
                arrow_ipc::reader::StreamReader::try_new(stream, None)
                    .map_err(|e| unreadable(path, e))
            })?;
            batches_to_rows(path, reader, on_row, on_bad)
        }
    }
}

fn batches_to_rows(
    path: &Path,
    mut batches: impl Iterator<Item = Result<RecordBatch, ArrowError>>,
    on_row: &mut dyn FnMut(Row) -> Result<(), DataError>,
    on_bad: &mut dyn FnMut(BadRow) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut index = 0;
    // Each batch is decoded and turned into rows under `decoding`; the rows are handed on
    // outside it, so a panic in the caller's code is never mistaken for a damaged file.
    while let Some(rows) = decoding(path, || {
        let Some(batch) = batches.next() else {
            return Ok(None);
        };
        let batch = batch.map_err(|e| unreadable(path, e))?;
        distinct_names(batch.schema().fields()).map_err(|e| unreadable(path, e))?;
        Ok(Some(batch_rows(&batch, &mut index)))
    })? {
        for row in rows {
            match row {
                Ok(row) => on_row(row)?,
                Err(bad) => on_bad(bad)?,
            }
        }
    }
    Ok(())
}

/// The rows of one batch, numbered on from `*index`. Columns of a type with no JSON value
/// are left out of every row and listed in its `unreadable`: a file is not refused for a
/// column (an image, say) that its format never reads.
fn batch_rows(batch: &RecordBatch, index: &mut usize) -> Vec<Result<Row, BadRow>> {
    let schema = batch.schema();
    let readable: Vec<Result<(), String>> = schema
        .fields()
        .iter()
        .map(|f| readable(f.data_type()))
        .collect();
    let unreadable: Vec<(String, String)> = schema
        .fields()
        .iter()
        .zip(&readable)
        .filter_map(|(f, r)| r.clone().err().map(|why| (f.name().clone(), why)))
        .collect();
    let mut rows = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let location = Location::Row(*index);
        *index += 1;
        let mut fields = Map::new();
        let mut failed = None;
        let columns = schema.fields().iter().zip(batch.columns()).zip(&readable);
        for ((field, column), _) in columns.filter(|(_, r)| r.is_ok()) {
            match value_at(column.as_ref(), i) {
                Ok(v) => {
                    fields.insert(field.name().clone(), v);
                }
                Err(reason) => {
                    failed = Some(BadRow {
                        location,
                        column: showable(field.name()).then(|| field.name().clone()),
                        reason,
                    });
                    break;
                }
            }
        }
        rows.push(match failed {
            Some(bad) => Err(bad),
            None => Ok(Row {
                location,
                fields,
                unreadable: unreadable.clone(),
            }),
        });
    }
    rows
}

/// Refuses a schema in which a name repeats, at the top or inside a struct (as the JSON
/// readers refuse a repeated key): one of the values would silently win, and a client's
/// `role` could become an assistant's.
fn distinct_names(fields: &arrow_schema::Fields) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for f in fields {
        if !seen.insert(f.name().as_str()) {
            let name = if showable(f.name()) {
                format!("`{}`", f.name())
            } else {
                format!("of {} characters", f.name().chars().count())
            };
            return Err(format!(
                "the column or field name {name} appears twice; rename one of them"
            ));
        }
        let mut inner = f.data_type();
        loop {
            match inner {
                DataType::List(item)
                | DataType::LargeList(item)
                | DataType::FixedSizeList(item, _) => inner = item.data_type(),
                DataType::Dictionary(_, values) => inner = values,
                _ => break,
            }
        }
        if let DataType::Struct(children) = inner {
            distinct_names(children)?;
        }
    }
    Ok(())
}

/// Whether [`value_at`] can turn values of `data_type` into JSON; why not, if it cannot.
fn readable(data_type: &DataType) -> Result<(), String> {
    match data_type {
        DataType::Null
        | DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Boolean
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64
        | DataType::Float32
        | DataType::Float64 => Ok(()),
        DataType::List(item) | DataType::LargeList(item) | DataType::FixedSizeList(item, _) => {
            readable(item.data_type())
        }
        DataType::Struct(fields) => fields.iter().try_for_each(|f| readable(f.data_type())),
        DataType::Dictionary(_, values) => readable(values),
        other => Err(format!("column type {other} is not supported")),
    }
}

fn float(v: f64) -> Value {
    Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// The JSON value of `array[i]`.
fn value_at(array: &dyn Array, i: usize) -> Result<Value, String> {
    if array.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match array.data_type() {
        DataType::Null => Value::Null,
        DataType::Utf8 => Value::from(array.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Value::from(array.as_string::<i64>().value(i)),
        DataType::Utf8View => Value::from(array.as_string_view().value(i)),
        DataType::Boolean => Value::from(array.as_boolean().value(i)),
        DataType::Int8 => Value::from(array.as_primitive::<Int8Type>().value(i)),
        DataType::Int16 => Value::from(array.as_primitive::<Int16Type>().value(i)),
        DataType::Int32 => Value::from(array.as_primitive::<Int32Type>().value(i)),
        DataType::Int64 => Value::from(array.as_primitive::<Int64Type>().value(i)),
        DataType::UInt8 => Value::from(array.as_primitive::<UInt8Type>().value(i)),
        DataType::UInt16 => Value::from(array.as_primitive::<UInt16Type>().value(i)),
        DataType::UInt32 => Value::from(array.as_primitive::<UInt32Type>().value(i)),
        DataType::UInt64 => Value::from(array.as_primitive::<UInt64Type>().value(i)),
        DataType::Float32 => float(array.as_primitive::<Float32Type>().value(i) as f64),
        DataType::Float64 => float(array.as_primitive::<Float64Type>().value(i)),
        DataType::List(_) => list(array.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(array.as_list::<i64>().value(i).as_ref())?,
        DataType::FixedSizeList(_, _) => list(array.as_fixed_size_list().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let mut map = Map::new();
            for (field, column) in fields.iter().zip(s.columns()) {
                map.insert(field.name().clone(), value_at(column.as_ref(), i)?);
            }
            Value::Object(map)
        }
        DataType::Dictionary(_, _) => {
            let dict = array
                .as_any_dictionary_opt()
                .ok_or_else(|| "unreadable dictionary column".to_string())?;
            // The one key, read as the integer it is: `normalized_keys` would convert every
            // key of the column for each cell.
            let key = value_at(dict.keys(), i)?
                .as_u64()
                .and_then(|k| usize::try_from(k).ok())
                .filter(|&k| k < dict.values().len())
                .ok_or_else(|| format!("dictionary key of row {i} is out of range"))?;
            value_at(dict.values().as_ref(), key)?
        }
        other => return Err(format!("column type {other} is not supported")),
    })
}

fn list(values: &dyn Array) -> Result<Value, String> {
    (0..values.len())
        .map(|j| value_at(values, j))
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

#[cfg(test)]
mod tests {
    /// arrow's error for a codec left out of the build says what the user can do.
    #[test]
    fn an_lz4_file_is_named_with_a_way_out() {
        let path = std::path::Path::new("feather.arrow");
        let e = super::unreadable(
            path,
            "Invalid argument error: lz4 IPC decompression requires the lz4 feature",
        )
        .to_string();
        assert!(
            e.starts_with("feather.arrow: it is compressed with lz4")
                && e.contains("compression=\"zstd\"")
                && !e.contains("feature"),
            "{e}"
        );
        let e = super::unreadable(
            std::path::Path::new("b.parquet"),
            "Parquet argument error: Parquet error: Disabled feature at compile time: brotli",
        )
        .to_string();
        assert!(
            e.starts_with("b.parquet: it is compressed with brotli")
                && e.contains("zstd or gzip")
                && !e.contains("feature"),
            "{e}"
        );
        let e = super::unreadable(path, "Parser error: bad offset").to_string();
        assert_eq!(e, "feather.arrow: cannot read: Parser error: bad offset");
    }
}
