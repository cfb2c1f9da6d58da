//! Logits against the reference fixtures made by transformers (../shared/fixtures/parity),
//! with the reference ops and with the fused ones (the switch is process-wide, so this
//! binary holds one test).

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::read_cases;
use trainer::model::load_model;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/parity")
}

fn check(name: &str, mode: kernels::Kernels, device: &Device) {
    let dir = fixtures().join(name);
    assert!(dir.is_dir(), "fixture {} is missing", dir.display());
    let cases = read_cases(&dir.join("cases.safetensors"));
    let device = device.clone();
    let (_, model) = load_model(&dir, &device).unwrap();
    let (b, t, v) = (cases.b, cases.t, cases.v);
    let ids = Tensor::<2, Int>::from_data(TensorData::new(cases.ids.clone(), [b, t]), &device);
    let mask = Tensor::<2, Int>::from_data(TensorData::new(cases.mask.clone(), [b, t]), &device);
    let logits = model.logits(model.hidden(ids, mask));
    assert_eq!(logits.dims(), [b, t, v]);
    let ours = logits.into_data().try_into_vec_as::<f32>().unwrap();
    let mut worst = 0f32;
    let mut compared = 0;
    for (pos, &m) in cases.mask.iter().enumerate() {
        if m == 0 {
            continue;
        }
        for k in 0..v {
            let i = pos * v + k;
            let d = (ours[i] - cases.logits[i]).abs();
            assert!(
                d.is_finite(),
                "{name}: non-finite logit at position {pos}, token {k}"
            );
            worst = worst.max(d);
            compared += 1;
        }
    }
    assert!(
        cases.mask.contains(&0),
        "{name}: the fixture should include padding"
    );
    assert!(compared > 0);
    eprintln!(
        "{name} ({mode:?} kernels, {device:?}): max abs diff {worst:e} over {compared} logits"
    );
    assert!(
        worst <= 1e-4,
        "{name} ({mode:?} kernels): max |Δ| = {worst} over {compared} logits"
    );
}

/// Every checkpoint under the fixtures' `parity/` folder, whatever its name.
#[test]
fn every_parity_fixture_matches_transformers() {
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .expect("../shared/fixtures/parity must exist")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // Both on-disk dtypes and both config styles are among them.
    assert!(names.contains(&"tiny-llama-f32".to_string()), "{names:?}");
    assert!(names.contains(&"tiny-llama-bf16".to_string()), "{names:?}");
    for mode in [kernels::Kernels::Reference, kernels::Kernels::Fused] {
        kernels::set_kernels(mode);
        for name in &names {
            check(name, mode, &Device::flex());
        }
    }
    // The GPU path: the CubeCL kernels on wgpu (lavapipe in CI), chosen by `auto`.
    #[cfg(feature = "wgpu")]
    {
        kernels::set_kernels(kernels::Kernels::Auto);
        let wgpu = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
        assert!(kernels::fused_on(&wgpu));
        for name in &names {
            check(name, kernels::Kernels::Auto, &wgpu);
        }
    }
}
