//! `hearth eval counseling`'s multiple-choice scores are the log-likelihoods a full
//! forward gives each option as the reply to its question.

use burn::tensor::{Device, Int, Tensor, TensorData};
use data::Message;
use data::render::{TemplateChoice, template_for};
use trainer::chat::{Chat, ChatOptions};
use trainer::counseling_eval::multiple_choice::{load, option_logps, option_sequences, score};
use trainer::model::{NewModel, init_model, load_model};

#[test]
fn option_log_likelihoods_match_a_full_forward_per_option() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    let spec = NewModel {
        init_std: 0.3,
        seed: 5,
        ..Default::default()
    };
    init_model(&path, &spec, Default::default()).unwrap();
    let device = Device::flex();
    let chat = Chat::open(ChatOptions {
        model: &path,
        adapter: None,
        template: None,
        system: None,
        sampling: Default::default(),
        device: &device,
    })
    .unwrap();
    let (_, items) = load(None).unwrap();
    let items = &items[..3];
    let seqs = option_sequences(&chat, items, "bundled").unwrap();
    let got = option_logps(&chat, items, &seqs);

    let (config, model) = load_model(&path, &device).unwrap();
    let tokenizer = trainer::model::load_tokenizer(&path, config.vocab_size).unwrap();
    let template = template_for(&path, TemplateChoice::Shipped(None)).unwrap();
    let v = config.vocab_size;
    for (item, lps) in items.iter().zip(&got) {
        assert_eq!(lps.len(), item.options.len());
        let rendered = template
            .render(&[Message::new("user", item.question.clone())], true)
            .unwrap();
        let prompt_len = data::chat::encode(&tokenizer, &rendered).unwrap().len();
        for (option, lp) in item.options.iter().zip(lps) {
            let ids = data::chat::encode(&tokenizer, &format!("{rendered}{option}")).unwrap();
            let n = ids.len();
            assert!(n > prompt_len, "{option}");
            let t = Tensor::<2, Int>::from_data(
                TensorData::new(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, n]),
                &device,
            );
            let mask = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64; n], [1, n]), &device);
            let logits = model
                .logits(model.hidden(t, mask))
                .into_data()
                .try_into_vec_as::<f64>()
                .unwrap();
            let mut want = 0.0;
            for p in prompt_len - 1..n - 1 {
                let row = &logits[p * v..(p + 1) * v];
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                want += row[ids[p + 1] as usize] - lse;
            }
            assert!(
                (lp - want).abs() < 1e-3 * want.abs().max(1.0),
                "{}: {option}: {lp} vs {want}",
                item.id
            );
        }
    }
    // The report's accuracy is the share of items whose likeliest option is the answer.
    let r = score(items, &got);
    let right = items
        .iter()
        .zip(&got)
        .filter(|(i, lp)| {
            lp.iter()
                .enumerate()
                .all(|(k, x)| k == i.answer || *x < lp[i.answer])
        })
        .count();
    assert_eq!(r.accuracy, right as f64 / 3.0);
}
