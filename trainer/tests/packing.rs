//! Packed rows give each example exactly the logits it gets alone: positions restart and
//! no token attends across examples.

use burn::tensor::{Device, Int, Tensor, TensorData};
use data::batch::Batch;
use data::tokenize::Sequence;
use trainer::model::{NewModel, init_model, load_model};

fn ints(v: Vec<i64>, shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn host(t: Tensor<3>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().unwrap()
}

#[test]
fn packed_examples_match_their_solo_logits() {
    let dir = tempfile::tempdir().unwrap();
    let spec = NewModel {
        init_std: 0.3,
        seed: 5,
        ..Default::default()
    };
    init_model(dir.path(), &spec, Default::default()).unwrap();
    let device = Device::flex();
    let (config, model) = load_model(dir.path(), &device).unwrap();
    let v = config.vocab_size;

    let seqs: Vec<Sequence> = [
        vec![5u32, 17, 42, 8, 99],
        vec![7, 7, 300, 12],
        vec![1, 2, 3],
    ]
    .into_iter()
    .map(|ids| Sequence {
        loss_mask: vec![1; ids.len()],
        ids,
    })
    .collect();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let packed = Batch::packed(&refs, 12, 0).unwrap();
    assert_eq!(packed.rows, 1, "all three fit one row of 12");

    let as_i64 = |v: &[u32]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
    let shape = [packed.rows, packed.width];
    let logits = host(model.logits(model.hidden_packed(
        ints(as_i64(&packed.ids), shape, &device),
        ints(as_i64(&packed.positions), shape, &device),
        ints(as_i64(&packed.segments), shape, &device),
    )));

    let mut offset = 0;
    for seq in &seqs {
        let n = seq.len();
        let alone = host(model.logits(model.hidden(
            ints(as_i64(&seq.ids), [1, n], &device),
            ints(vec![1; n], [1, n], &device),
        )));
        let slice = &logits[offset * v..(offset + n) * v];
        let worst = slice
            .iter()
            .zip(&alone)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-5,
            "example at offset {offset} differs by {worst}"
        );
        offset += n;
    }

    // Control: without segment ids the later examples would see the earlier ones.
    let leaky = host(model.logits(model.hidden(
        ints(as_i64(&packed.ids), shape, &device),
        ints(vec![1; packed.width], shape, &device),
    )));
    let second = 5 * v..9 * v;
    let diff = logits[second.clone()]
        .iter()
        .zip(&leaky[second])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff > 1e-3, "the control should differ, got {diff}");
}
