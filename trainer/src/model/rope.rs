use burn::tensor::{Int, Tensor, TensorData};
use checkpoints::{ModelConfig, RopeScaling};

/// Rotary inverse frequencies `1 / θ^(2i/d)`, rescaled as `rope_scaling` says. Computed in
/// f32, as transformers does, so angles match its to the last bit where possible.
pub fn inverse_frequencies(config: &ModelConfig) -> Vec<f32> {
    let d = config.head_dim;
    let theta = config.rope_theta as f32;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32))
        .collect();
    match config.rope_scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            // Llama 3.1: long wavelengths are interpolated by `factor`, short ones kept,
            // and the band between blended smoothly.
            let (factor, low, high) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let old = original_max_position_embeddings as f32;
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// `cos` and `sin` of the rotary angles for `positions` (`[B, T]`), each `[B, T, head_dim]`
/// in the `cat(freqs, freqs)` layout.
pub fn cos_sin(inv_freq: &[f32], positions: Tensor<2, Int>) -> (Tensor<3>, Tensor<3>) {
    let [b, t] = positions.dims();
    let n = inv_freq.len();
    let device = positions.device();
    let inv = Tensor::<1>::from_data(TensorData::new(inv_freq.to_vec(), [n]), &device);
    let freqs = positions.float().reshape([b, t, 1]) * inv.reshape([1, 1, n]);
    let angles = Tensor::cat(vec![freqs.clone(), freqs], 2);
    (angles.clone().cos(), angles.sin())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rope: &str) -> ModelConfig {
        let text = format!(
            r#"{{"model_type":"llama","vocab_size":8,"hidden_size":256,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"rope_theta":500000.0,
            "rope_scaling":{rope}}}"#
        );
        ModelConfig::from_json_str(&text, "config.json".as_ref()).unwrap()
    }

    #[test]
    fn default_frequencies_follow_the_formula() {
        let inv = inverse_frequencies(&config("null"));
        assert_eq!(inv.len(), 64);
        assert_eq!(inv[0], 1.0);
        let expected = 1.0 / 500000f64.powf(10.0 / 128.0);
        assert!((inv[5] as f64 - expected).abs() < 1e-7 * expected);
    }

    #[test]
    fn linear_scaling_divides_every_frequency() {
        let plain = inverse_frequencies(&config("null"));
        let scaled = inverse_frequencies(&config(r#"{"type":"linear","factor":4.0}"#));
        for (p, s) in plain.iter().zip(&scaled) {
            assert_eq!(*s, p / 4.0);
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_blends_between() {
        let plain = inverse_frequencies(&config("null"));
        let scaled = inverse_frequencies(&config(
            r#"{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
                "high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        ));
        let (mut kept, mut divided, mut blended) = (0, 0, 0);
        for (p, s) in plain.iter().zip(&scaled) {
            let wavelen = 2.0 * std::f32::consts::PI / p;
            if wavelen < 8192.0 / 4.0 {
                assert_eq!(s, p);
                kept += 1;
            } else if wavelen > 8192.0 {
                assert_eq!(*s, p / 8.0);
                divided += 1;
            } else {
                let smooth = (8192.0 / wavelen - 1.0) / 3.0;
                let want = (1.0 - smooth) * p / 8.0 + smooth * p;
                assert!((s - want).abs() <= 1e-6 * want);
                assert!(*s < *p && *s > p / 8.0);
                blended += 1;
            }
        }
        assert!(
            kept > 0 && divided > 0 && blended > 0,
            "{kept} {divided} {blended}"
        );
    }
}
