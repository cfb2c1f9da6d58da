//! Reading and writing weight files: sharding, stale files, dtype conversion, validation.

use std::collections::BTreeMap;

use checkpoints::{
    CheckpointError, OwnedTensor, SaveOptions, WeightDtype, WeightFiles, save_weights,
};

fn weights() -> BTreeMap<String, OwnedTensor> {
    (0..5)
        .map(|i| {
            let values: Vec<f32> = (0..100)
                .map(|k| (i * 100 + k) as f32 * 0.25 - 3.0)
                .collect();
            (
                format!("w{i}"),
                OwnedTensor::from_f32(&values, vec![10, 10], WeightDtype::F32),
            )
        })
        .collect()
}

#[test]
fn sharded_and_single_layouts_replace_each_other_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let w = weights();
    let written = save_weights(
        dir.path(),
        &w,
        SaveOptions {
            max_shard_bytes: 900,
        },
    )
    .unwrap();
    // 400 bytes per tensor, 900 per shard: 2 + 2 + 1.
    assert_eq!(written.len(), 4, "{written:?}");
    assert!(
        dir.path()
            .join("model-00003-of-00003.safetensors")
            .is_file()
    );
    let files = WeightFiles::open_dir(dir.path()).unwrap();
    assert_eq!(files.names().count(), 5);
    for (name, t) in &w {
        let got = files.take(name, &[10, 10]).unwrap();
        assert_eq!(got.bytes(), &t.data[..]);
    }
    files.ensure_all_taken(|_| false).unwrap();

    save_weights(dir.path(), &w, SaveOptions::default()).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec!["model.safetensors"]);
}

#[test]
fn half_precision_round_trips_exactly_for_representable_values() {
    let values = [0.5f32, -1.25, 3.0, 1024.0, -0.0078125];
    for dtype in [WeightDtype::F16, WeightDtype::BF16] {
        let t = OwnedTensor::from_f32(&values, vec![5], dtype);
        assert_eq!(t.data.len(), 10);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        checkpoints::write_safetensors(&path, &BTreeMap::from([("t".to_string(), t)])).unwrap();
        let files = WeightFiles::open_file(&path).unwrap();
        assert_eq!(files.get("t").unwrap().to_f32().unwrap(), values);
    }
}

#[test]
fn untaken_tensors_and_index_mismatches_are_named() {
    let dir = tempfile::tempdir().unwrap();
    save_weights(
        dir.path(),
        &weights(),
        SaveOptions {
            max_shard_bytes: 900,
        },
    )
    .unwrap();
    let files = WeightFiles::open_dir(dir.path()).unwrap();
    files.take("w0", &[10, 10]).unwrap();
    let err = files.ensure_all_taken(|n| n == "w1").unwrap_err();
    assert!(
        matches!(&err, CheckpointError::UnexpectedTensor { tensor, .. } if tensor == "w2"),
        "{err}"
    );
    let err = files.take("w3", &[100]).unwrap_err().to_string();
    assert!(
        err.contains("`w3`") && err.contains("[10, 10]") && err.contains("[100]"),
        "{err}"
    );
    assert!(err.contains("model-0000"), "{err}");

    // An index that points a tensor at a shard that does not hold it.
    let index_path = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path).unwrap();
    let mut index: serde_json::Value = serde_json::from_str(&text).unwrap();
    index["weight_map"]["w0"] = "model-00003-of-00003.safetensors".into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let err = WeightFiles::open_dir(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("`w0`") && err.contains("model-00003-of-00003"),
        "{err}"
    );
}

#[test]
fn absurd_headers_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    // Claims a header of u64::MAX bytes.
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}      ");
    std::fs::write(&path, &bytes).unwrap();
    let err = WeightFiles::open_file(&path).err().unwrap().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
    // Offsets past the end of the file.
    let header = br#"{"w":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(&path, &bytes).unwrap();
    let err = WeightFiles::open_file(&path).err().unwrap().to_string();
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn weights_holding_nan_or_infinity_are_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for (bad, dtype) in [
        (f32::NAN, WeightDtype::F32),
        (f32::NEG_INFINITY, WeightDtype::BF16),
        // Finite in f32, past f16's range: ∞ once narrowed.
        (1e6, WeightDtype::F16),
    ] {
        let mut w = weights();
        let mut values = vec![0.5f32; 100];
        values[37] = bad;
        w.insert(
            "w3".into(),
            OwnedTensor::from_f32(&values, vec![10, 10], dtype),
        );
        let err = save_weights(&out, &w, SaveOptions::default()).unwrap_err();
        assert!(matches!(err, CheckpointError::NonFinite { .. }), "{err}");
        let m = err.to_string();
        assert!(
            m.contains(&out.display().to_string()) && m.contains("tensor `w3`"),
            "{m}"
        );
        assert!(!out.exists(), "{bad} in {dtype:?}: the directory was made");
    }
    // Into a directory that already holds weights: they stay as they were.
    save_weights(&out, &weights(), SaveOptions::default()).unwrap();
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let mut w = weights();
    w.insert(
        "w0".into(),
        OwnedTensor::from_f32(&[f32::NAN; 100], vec![10, 10], WeightDtype::F32),
    );
    save_weights(&out, &w, SaveOptions::default()).unwrap_err();
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        before
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}
