use checkpoints::ModelConfig;

/// How a fresh tensor is initialised (only used when making a random model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    Normal,
    Ones,
}

/// One weight of the model by its Hugging Face name.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// Every tensor a checkpoint of this config holds, with its shape: the single list that
/// loading, saving and random initialisation all follow.
pub fn tensor_specs(c: &ModelConfig) -> Vec<TensorSpec> {
    let mut out = Vec::new();
    let mut add =
        |name: String, shape: Vec<usize>, init: Init| out.push(TensorSpec { name, shape, init });
    let (hd, inter, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let q_out = c.num_attention_heads * c.head_dim;
    let kv_out = c.num_key_value_heads * c.head_dim;
    add(
        "model.embed_tokens.weight".into(),
        vec![v, hd],
        Init::Normal,
    );
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), vec![hd], Init::Ones);
        let attn = [
            ("q_proj", q_out, hd, c.qkv_bias),
            ("k_proj", kv_out, hd, c.qkv_bias),
            ("v_proj", kv_out, hd, c.qkv_bias),
            ("o_proj", hd, q_out, c.o_bias),
        ];
        for (name, o, i_, bias) in attn {
            add(
                format!("{p}.self_attn.{name}.weight"),
                vec![o, i_],
                Init::Normal,
            );
            if bias {
                add(format!("{p}.self_attn.{name}.bias"), vec![o], Init::Normal);
            }
        }
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![hd],
            Init::Ones,
        );
        let mlp = [
            ("gate_proj", inter, hd),
            ("up_proj", inter, hd),
            ("down_proj", hd, inter),
        ];
        for (name, o, i_) in mlp {
            add(format!("{p}.mlp.{name}.weight"), vec![o, i_], Init::Normal);
            if c.mlp_bias {
                add(format!("{p}.mlp.{name}.bias"), vec![o], Init::Normal);
            }
        }
    }
    add("model.norm.weight".into(), vec![hd], Init::Ones);
    match c.score_labels {
        Some(labels) => add("score.weight".into(), vec![labels, hd], Init::Normal),
        None if !c.tie_word_embeddings => add("lm_head.weight".into(), vec![v, hd], Init::Normal),
        None => {}
    }
    out
}
