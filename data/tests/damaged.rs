//! Damaged columnar files: arrow and parquet trust the offsets and lengths they read and
//! assert on them, so a flipped byte could panic inside the decoder. Every such file must
//! instead read (bytes of a value can change undetected) or fail with an error naming it.

use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Fields, Schema};
use data::LoadOptions;

/// Three rows of `messages`: list<struct<role, content>>, as the audit's pyarrow table.
fn messages_table() -> RecordBatch {
    let item = Fields::from(vec![
        Field::new("role", DataType::Utf8, true),
        Field::new("content", DataType::Utf8, true),
    ]);
    let mut list = ListBuilder::new(StructBuilder::from_fields(item, 2));
    for _ in 0..3 {
        for (role, content) in [("user", "hi"), ("assistant", "yo")] {
            let s = list.values();
            s.field_builder::<StringBuilder>(0)
                .unwrap()
                .append_value(role);
            s.field_builder::<StringBuilder>(1)
                .unwrap()
                .append_value(content);
            s.append(true);
        }
        list.append(true);
    }
    let list = list.finish();
    let schema = Schema::new(vec![Field::new("messages", list.data_type().clone(), true)]);
    RecordBatch::try_new(Arc::new(schema), vec![Arc::new(list) as ArrayRef]).unwrap()
}

fn encodings() -> Vec<(&'static str, Vec<u8>)> {
    let batch = messages_table();
    let mut stream = Vec::new();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut stream, &batch.schema()).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    drop(w);
    let mut file = Vec::new();
    let mut w = arrow_ipc::writer::FileWriter::try_new(&mut file, &batch.schema()).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    drop(w);
    let mut parquet = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut parquet, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    vec![
        ("stream.arrow", stream),
        ("file.arrow", file),
        ("table.parquet", parquet),
    ]
}

/// Loads `path`, failing the test if the reader panics.
fn load(path: &Path) -> Result<data::Loaded, String> {
    let options = LoadOptions::default();
    std::panic::catch_unwind(|| data::load_examples(path, &options))
        .unwrap_or_else(|_| panic!("reading {} panicked", path.display()))
        .map_err(|e| e.to_string())
}

#[test]
fn every_one_byte_corruption_is_read_or_refused_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in encodings() {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(load(&path).unwrap().examples.len(), 3, "{name} intact");
        let (mut refused, mut inside_decoder) = (0, 0);
        let flips = (0..bytes.len()).flat_map(|at| [(at, bytes[at] ^ 0xFF), (at, 0)]);
        for (at, byte) in flips.filter(|&(at, byte)| bytes[at] != byte) {
            let mut damaged = bytes.clone();
            damaged[at] = byte;
            std::fs::write(&path, &damaged).unwrap();
            if let Err(message) = load(&path) {
                assert!(message.contains(name), "byte {at}: {message}");
                assert_eq!(message.lines().count(), 1, "byte {at}: {message}");
                refused += 1;
                // What the decoder asserted on (an offset past the body, say) and would
                // have panicked over.
                inside_decoder += usize::from(message.contains("the file is damaged"));
            }
        }
        eprintln!("{name}: {refused} refused, {inside_decoder} inside the decoder");
        assert!(refused > bytes.len() / 2, "{name}: only {refused} refused");
        assert!(inside_decoder > 0, "{name}: no damage reached the decoder");
    }
}

/// A file compressed with lz4 (a codec this build leaves out) says so and what to write
/// instead, each in its own format's words: Parquet's advice is not Feather's.
#[test]
fn lz4_files_are_refused_with_advice_for_their_format() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (name, advice, not) in [
        ("lz4.parquet", "pq.write_table", "feather"),
        ("lz4.arrow", "feather.write_feather", "pq.write_table"),
    ] {
        let e = data::load_examples(&fixtures.join(name), &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(name) && e.contains("lz4") && e.contains(advice) && !e.contains(not),
            "{e}"
        );
    }
}
