//! Loading a data file into examples: read rows, rename columns, detect or apply the
//! format, normalise. Bad rows stop the load with an error naming file, row and column,
//! unless `skip_bad_rows` asks for them to be counted and reported instead.

use std::path::Path;

use crate::DataError;
use crate::format::{Example, FieldError, Format, parse_row, rename_columns};
use crate::read::{BadRow, for_each_row};

/// How to read one data file.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The format; detected from the first row's columns when `None`.
    pub format: Option<Format>,
    /// Column renames applied to every row first, e.g. `question` → `prompt`.
    pub columns: Vec<(String, String)>,
    /// Count bad rows and go on, instead of failing on the first.
    pub skip_bad_rows: bool,
    /// Detection takes a row's `chosen` and `rejected` first, over a `messages` column it
    /// also has (ultrafeedback_binarized has both): set by methods that train on pairs.
    pub pairs_first: bool,
}

/// What a load produced.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub format: Format,
    pub examples: Vec<Example>,
    /// Where each example came from in the file (same order as `examples`), so errors
    /// found later, in tokenisation, can still name the line or row.
    pub locations: Vec<crate::read::Location>,
    /// Rows skipped under `skip_bad_rows`, in file order.
    pub skipped: Vec<BadRow>,
}

pub fn load_examples(path: &Path, options: &LoadOptions) -> Result<Loaded, DataError> {
    load_rows(path, options, &mut |on_row, on_bad| {
        for_each_row(path, on_row, on_bad)
    })
}

/// [`load_examples`], for a caller that goes on to check every example (tokenise it):
/// when a row fails to load, the rows before it are checked with `check` (given each one's
/// location) first, so the error is the file's first bad row whichever stage finds it.
/// Reading stops a load at its first unreadable row, before any example is tokenised, and
/// the user who fixed it would meet an earlier one next. Only the failing path pays for
/// the second, lenient read.
pub fn load_examples_in_order<E: From<DataError>>(
    path: &Path,
    options: &LoadOptions,
    check: &mut dyn FnMut(&Example, crate::read::Location) -> Result<(), E>,
) -> Result<Loaded, E> {
    let err = match load_examples(path, options) {
        Ok(loaded) => return Ok(loaded),
        Err(e) => e,
    };
    let at = match &err {
        DataError::Row { location, .. } if !options.skip_bad_rows => line_of(*location),
        _ => return Err(err.into()),
    };
    let lenient = LoadOptions {
        skip_bad_rows: true,
        ..options.clone()
    };
    if let Ok(loaded) = load_examples(path, &lenient) {
        for (example, &location) in loaded.examples.iter().zip(&loaded.locations) {
            if line_of(location) >= at {
                break;
            }
            check(example, location)?;
        }
    }
    Err(err.into())
}

fn line_of(location: crate::read::Location) -> usize {
    match location {
        crate::read::Location::Line(n) | crate::read::Location::Row(n) => n,
    }
}

/// [`load_examples`] over JSON Lines `text` shipped inside the binary; `origin` names it
/// in errors.
pub fn load_bundled_examples(
    origin: &Path,
    text: &str,
    options: &LoadOptions,
) -> Result<Loaded, DataError> {
    load_rows(origin, options, &mut |on_row, on_bad| {
        crate::read::for_each_jsonl_row(text, origin, on_row, on_bad)
    })
}

type OnRow<'a> = &'a mut dyn FnMut(crate::read::Row) -> Result<(), DataError>;
type OnBad<'a> = &'a mut dyn FnMut(BadRow) -> Result<(), DataError>;

fn load_rows(
    path: &Path,
    options: &LoadOptions,
    rows: &mut dyn FnMut(OnRow<'_>, OnBad<'_>) -> Result<(), DataError>,
) -> Result<Loaded, DataError> {
    crate::format::check_renames(&options.columns, "the column renames").map_err(|reason| {
        DataError::Unsupported {
            path: path.to_path_buf(),
            reason,
        }
    })?;
    let mut format = options.format;
    let mut examples = Vec::new();
    let mut locations = Vec::new();
    let mut skipped = Vec::new();
    let skip = options.skip_bad_rows;
    let mut on_bad = |bad: BadRow| -> Result<(), DataError> {
        if skip {
            skipped.push(bad);
            Ok(())
        } else {
            Err(bad.into_error(path))
        }
    };
    let mut bad_rows: Vec<BadRow> = Vec::new();
    {
        let mut on_row = |mut row: crate::read::Row| -> Result<(), DataError> {
            // A row whose fields cannot be read: counted under `skip_bad_rows`, else the error.
            let mut reject = |FieldError { column, reason }| {
                let bad = BadRow {
                    location: row.location,
                    column,
                    reason,
                };
                if skip {
                    bad_rows.push(bad);
                    Ok(())
                } else {
                    Err(bad.into_error(path))
                }
            };
            if let Err(e) = rename_columns(&mut row.fields, &options.columns) {
                return reject(e);
            }
            rename_unreadable(&mut row.unreadable, &options.columns);
            let f = match format {
                Some(f) => f,
                None => match Format::detect_preferring(&row.fields, options.pairs_first) {
                    Ok(f) => {
                        format = Some(f);
                        f
                    }
                    // Under `skip_bad_rows` a row that shows no format (a comment row, say)
                    // is one more bad row; the next row is asked instead.
                    Err(reason) => {
                        return reject(FieldError {
                            column: None,
                            reason: with_unreadable(reason, &row.unreadable),
                        });
                    }
                },
            };
            let location = row.location;
            match parse_row(f, row.fields) {
                Ok(example) => {
                    examples.push(example);
                    locations.push(location);
                    Ok(())
                }
                Err(e) => reject(explain(e, &row.unreadable)),
            }
        };
        rows(&mut on_row, &mut on_bad)?;
    }
    skipped.extend(bad_rows);
    skipped.sort_by_key(|b| line_of(b.location));
    let format = format.ok_or_else(|| DataError::Unsupported {
        path: path.to_path_buf(),
        reason: "no rows to read".into(),
    })?;
    Ok(Loaded {
        format,
        examples,
        locations,
        skipped,
    })
}

/// An error about a column the reader left out as unreadable (its type has no JSON value)
/// says why, instead of calling the column missing.
pub(crate) fn explain(error: FieldError, unreadable: &[(String, String)]) -> FieldError {
    match unreadable
        .iter()
        .find(|(name, _)| error.column.as_deref() == Some(name.as_str()))
    {
        Some((_, why)) => FieldError {
            reason: why.clone(),
            ..error
        },
        None => error,
    }
}

/// Applies the column renames to the names of unreadable columns too.
fn rename_unreadable(unreadable: &mut [(String, String)], mapping: &[(String, String)]) {
    for (name, _) in unreadable {
        if let Some((_, to)) = mapping.iter().find(|(from, _)| from == name) {
            *name = to.clone();
        }
    }
}

/// A format detection error, with the columns that were left out as unreadable: the one
/// that would have told the format may be among them.
fn with_unreadable(reason: String, unreadable: &[(String, String)]) -> String {
    if unreadable.is_empty() {
        return reason;
    }
    let left_out: Vec<String> = unreadable
        .iter()
        .map(|(name, why)| format!("{} ({why})", crate::read::shown_name(name)))
        .collect();
    format!("{reason}; left out as unreadable: {}", left_out.join(", "))
}
