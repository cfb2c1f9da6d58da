//! Every reader and format on small files written in the real data sets' schemas.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{LargeListBuilder, ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{Array, ArrayRef, Int64Array, LargeStringArray, RecordBatch};
use arrow_schema::{DataType, Field, Fields, Schema};
use data::{Example, Format, LoadOptions, Message, load_examples};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde_json::{Value, json};

fn jsonl(dir: &Path, name: &str, rows: &[Value]) -> PathBuf {
    let path = dir.join(name);
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn load(path: &Path) -> data::Loaded {
    load_examples(path, &LoadOptions::default()).unwrap()
}

fn err(path: &Path, options: &LoadOptions) -> String {
    load_examples(path, options).unwrap_err().to_string()
}

fn m(role: &str, content: &str) -> Message {
    Message::new(role, content)
}

fn conversation(e: &Example) -> (&[Message], usize) {
    match e {
        Example::Conversation {
            messages,
            train_from,
            ..
        } => (messages, *train_from),
        other => panic!("expected a conversation, got {other:?}"),
    }
}

#[test]
fn messages_and_sharegpt() {
    let dir = tempfile::tempdir().unwrap();
    let p = jsonl(
        dir.path(),
        "m.jsonl",
        &[json!({"messages": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": [{"type": "text", "text": "I feel "}, {"type": "text", "text": "low."}]},
        {"role": "assistant", "content": "Tell me more."}]})],
    );
    let loaded = load(&p);
    assert_eq!(loaded.format, Format::Messages);
    assert_eq!(
        conversation(&loaded.examples[0]).0,
        &[
            m("system", "Be kind."),
            m("user", "I feel low."),
            m("assistant", "Tell me more.")
        ]
    );

    let p = jsonl(
        dir.path(),
        "s.jsonl",
        &[json!({"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})],
    );
    let loaded = load(&p);
    assert_eq!(loaded.format, Format::ShareGpt);
    assert_eq!(
        conversation(&loaded.examples[0]).0,
        &[m("system", "S"), m("user", "hi"), m("assistant", "hello")]
    );
    // LLaMA-Factory's ShareGPT keeps the system prompt in a column of its own.
    let turns = json!([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]);
    let p = jsonl(
        dir.path(),
        "lf.jsonl",
        &[
            json!({"system": "You are a CBT counselor.", "conversations": turns}),
            json!({"system": "", "conversations": turns}),
        ],
    );
    let loaded = load(&p);
    assert_eq!(
        conversation(&loaded.examples[0]).0,
        &[
            m("system", "You are a CBT counselor."),
            m("user", "hi"),
            m("assistant", "hello")
        ]
    );
    assert_eq!(
        conversation(&loaded.examples[1]).0,
        &[m("user", "hi"), m("assistant", "hello")]
    );
    let p = jsonl(
        dir.path(),
        "two.jsonl",
        &[json!({"system": "A", "conversations": [
            {"from": "system", "value": "B"}, {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"}]})],
    );
    let message = err(&p, &LoadOptions::default());
    assert!(
        message.contains("line 1") && message.contains("column `system`"),
        "{message}"
    );
    // The same prompt in both places is one system turn.
    let p = jsonl(
        dir.path(),
        "same.jsonl",
        &[json!({"system": "B", "conversations": [
            {"from": "system", "value": "B"}, {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"}]})],
    );
    assert_eq!(
        conversation(&load(&p).examples[0]).0,
        &[m("system", "B"), m("user", "hi"), m("assistant", "hello")]
    );
}

/// ultrafeedback_binarized's rows carry `messages` beside `prompt`, `chosen` and
/// `rejected`: read as conversations by default, as pairs for a method that trains on pairs.
#[test]
fn rows_with_messages_and_pairs_read_as_pairs_for_pair_methods() {
    let dir = tempfile::tempdir().unwrap();
    let side = |reply: &str| json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]);
    let p = jsonl(
        dir.path(),
        "uf.jsonl",
        &[
            json!({"prompt": "q", "chosen": side("good"), "rejected": side("bad"), "messages": side("good")}),
        ],
    );
    assert_eq!(load(&p).format, Format::Messages);
    let pairs = LoadOptions {
        pairs_first: true,
        ..Default::default()
    };
    let loaded = load_examples(&p, &pairs).unwrap();
    assert_eq!(loaded.format, Format::Preference);
    let Example::Pair {
        prompt,
        chosen,
        rejected,
        ..
    } = &loaded.examples[0]
    else {
        panic!()
    };
    assert_eq!(
        (prompt.as_slice(), chosen.as_slice(), rejected.as_slice()),
        (
            &[m("user", "q")][..],
            &[m("assistant", "good")][..],
            &[m("assistant", "bad")][..]
        )
    );
}

#[test]
fn alpaca_psych8k_and_cpsycoun() {
    let dir = tempfile::tempdir().unwrap();
    // Psych8k: plain Alpaca.
    let p = jsonl(
        dir.path(),
        "psych8k.jsonl",
        &[
            json!({"instruction": "If you are a counsellor, please answer.", "input": "I can't sleep.", "output": "That sounds hard."}),
            json!({"instruction": "Say hello.", "input": "", "output": "Hello.", "system": "Be brief."}),
        ],
    );
    let loaded = load(&p);
    assert_eq!(loaded.format, Format::Alpaca);
    // An Alpaca export's `"history": null` is no CPsyCoun history.
    let nulls = jsonl(
        dir.path(),
        "null-history.jsonl",
        &[json!({"instruction": "hi", "input": "", "output": "yo", "history": null})],
    );
    let null_loaded = load(&nulls);
    assert_eq!(null_loaded.format, Format::Alpaca);
    assert_eq!(
        conversation(&null_loaded.examples[0]).0,
        &[m("user", "hi"), m("assistant", "yo")]
    );
    assert_eq!(
        conversation(&loaded.examples[0]).0,
        &[
            m(
                "user",
                "If you are a counsellor, please answer.\nI can't sleep."
            ),
            m("assistant", "That sounds hard.")
        ]
    );
    assert_eq!(
        conversation(&loaded.examples[1]).0,
        &[
            m("system", "Be brief."),
            m("user", "Say hello."),
            m("assistant", "Hello.")
        ]
    );
    // CPsyCoun: Alpaca with history.
    let p = jsonl(
        dir.path(),
        "cpsycoun.jsonl",
        &[json!({
        "instruction": "现在你扮演一位专业的心理咨询师", "input": "我最近很焦虑", "output": "能多说说吗？",
        "history": [["你好", "你好，今天想聊什么？"]]})],
    );
    let loaded = load(&p);
    assert_eq!(loaded.format, Format::CpsyCoun);
    assert_eq!(
        conversation(&loaded.examples[0]).0,
        &[
            m("user", "你好"),
            m("assistant", "你好，今天想聊什么？"),
            m("user", "现在你扮演一位专业的心理咨询师\n我最近很焦虑"),
            m("assistant", "能多说说吗？")
        ]
    );
}

#[test]
fn prompt_completion_masks_only_the_completion() {
    let dir = tempfile::tempdir().unwrap();
    let p = jsonl(
        dir.path(),
        "pc.jsonl",
        &[
            json!({"prompt": "I feel stuck.", "completion": "What feels stuck?"}),
            json!({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
               "completion": [{"role": "assistant", "content": "d"}]}),
        ],
    );
    let loaded = load(&p);
    assert_eq!(loaded.format, Format::PromptCompletion);
    assert_eq!(
        conversation(&loaded.examples[0]),
        (
            &[
                m("user", "I feel stuck."),
                m("assistant", "What feels stuck?")
            ][..],
            1
        )
    );
    let (messages, train_from) = conversation(&loaded.examples[1]);
    assert_eq!((messages.len(), train_from), (4, 3));
}

#[test]
fn preference_explicit_implicit_and_psychocounsel() {
    let dir = tempfile::tempdir().unwrap();
    let p = jsonl(
        dir.path(),
        "explicit.jsonl",
        &[
            json!({"prompt": "I failed my exam.", "chosen": "That must hurt.", "rejected": "Study harder.", "margin": 2.0}),
        ],
    );
    let loaded = load(&p);
    assert_eq!(loaded.format, Format::Preference);
    let Example::Pair {
        prompt,
        chosen,
        rejected,
        extra,
    } = &loaded.examples[0]
    else {
        panic!()
    };
    assert_eq!(
        (
            prompt[0].content.as_str(),
            chosen[0].role.as_str(),
            rejected[0].content.as_str()
        ),
        ("I failed my exam.", "assistant", "Study harder.")
    );
    assert_eq!(extra["margin"], 2.0);

    // Conversations that share their start, alone (the prompt is that start) or beside
    // the prompt as text (ultrafeedback_binarized: the conversations' start wins, as TRL's
    // maybe_extract_prompt has it).
    let side = |reply: &str| json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]);
    for (name, row) in [
        (
            "implicit.jsonl",
            json!({"chosen": side("good"), "rejected": side("bad")}),
        ),
        (
            "h4.jsonl",
            json!({"prompt": "q", "prompt_id": "abc", "chosen": side("good"), "rejected": side("bad")}),
        ),
    ] {
        let loaded = load(&jsonl(dir.path(), name, &[row]));
        assert_eq!(loaded.format, Format::Preference);
        let Example::Pair {
            prompt,
            chosen,
            rejected,
            extra,
        } = &loaded.examples[0]
        else {
            panic!()
        };
        assert_eq!(
            (prompt.as_slice(), chosen.as_slice(), rejected.as_slice()),
            (
                &[m("user", "q")][..],
                &[m("assistant", "good")][..],
                &[m("assistant", "bad")][..]
            ),
            "{name}"
        );
        assert!(!extra.contains_key("prompt"), "{name}");
    }

    let p = jsonl(
        dir.path(),
        "psychocounsel.jsonl",
        &[json!({
        "ID": 1, "prefID": 7, "question": "I keep worrying.", "chosen": "Worry can be exhausting.", "rejected": "Just stop.",
        "chosen_model": "a", "rejected_model": "b", "chosen_empathy_rating": 5, "rejected_empathy_rating": 1})],
    );
    let loaded = load(&p);
    assert_eq!(loaded.format, Format::PsychoCounsel);
    let Example::Pair { prompt, extra, .. } = &loaded.examples[0] else {
        panic!()
    };
    assert_eq!(prompt, &[m("user", "I keep worrying.")]);
    assert_eq!(extra["chosen_empathy_rating"], 5);

    // The same file read as plain preference data through a column rename.
    let options = LoadOptions {
        columns: vec![("question".into(), "prompt".into())],
        ..Default::default()
    };
    assert_eq!(
        load_examples(&p, &options).unwrap().format,
        Format::Preference
    );

    // Renames apply all at once: two columns swap, neither is lost.
    let pair = jsonl(
        dir.path(),
        "swapped.jsonl",
        &[json!({"prompt": "p", "chosen": "worse", "rejected": "better"})],
    );
    let options = LoadOptions {
        columns: vec![
            ("chosen".into(), "rejected".into()),
            ("rejected".into(), "chosen".into()),
        ],
        ..Default::default()
    };
    let loaded = load_examples(&pair, &options).unwrap();
    let Example::Pair {
        chosen, rejected, ..
    } = &loaded.examples[0]
    else {
        panic!()
    };
    assert_eq!(
        (chosen[0].content.as_str(), rejected[0].content.as_str()),
        ("better", "worse")
    );

    // A rename onto a column the row keeps would lose the row's own value: an error naming
    // the line and that column. Moving the old column aside first makes it a plain rename.
    let both = jsonl(
        dir.path(),
        "both.jsonl",
        &[json!({"question": "q", "prompt": "p", "chosen": "a", "rejected": "b"})],
    );
    let renames = |list: &[(&str, &str)]| LoadOptions {
        columns: list
            .iter()
            .map(|(f, t)| (f.to_string(), t.to_string()))
            .collect(),
        ..Default::default()
    };
    let err = load_examples(&both, &renames(&[("question", "prompt")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("both.jsonl: line 1, column `prompt`")
            && err.contains("would replace the row's own `prompt`"),
        "{err}"
    );
    // A null column of that name holds nothing to lose.
    let nulls = jsonl(
        dir.path(),
        "nulls.jsonl",
        &[json!({"question": "q", "prompt": null, "chosen": "a", "rejected": "b"})],
    );
    load_examples(&nulls, &renames(&[("question", "prompt")])).unwrap();
    let moved = renames(&[("prompt", "original"), ("question", "prompt")]);
    let loaded = load_examples(&both, &moved).unwrap();
    let Example::Pair { prompt, extra, .. } = &loaded.examples[0] else {
        panic!()
    };
    assert_eq!(
        (prompt[0].content.as_str(), &extra["original"]),
        ("q", &json!("p"))
    );
    // Renames that cannot all apply are refused before any row is read.
    for (list, needle) in [
        (
            &[("question", "prompt"), ("chosen", "prompt")][..],
            "renames both",
        ),
        (
            &[("question", "a"), ("question", "b")][..],
            "renames `question` twice",
        ),
        (&[("", "prompt")][..], "must be non-empty"),
    ] {
        let err = load_examples(&both, &renames(list))
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{list:?}: {err}");
    }
}

#[test]
fn prompt_only_keeps_extra_columns() {
    let dir = tempfile::tempdir().unwrap();
    let p = jsonl(
        dir.path(),
        "grpo.jsonl",
        &[json!({"prompt": "I can't cope anymore.", "risk": "high"})],
    );
    let loaded = load(&p);
    assert_eq!(loaded.format, Format::PromptOnly);
    let Example::Prompt { prompt, extra } = &loaded.examples[0] else {
        panic!()
    };
    assert_eq!(prompt, &[m("user", "I can't cope anymore.")]);
    assert_eq!(extra["risk"], "high");
}

#[test]
fn cactus_dialogues_from_a_json_array() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cactus.json");
    let rows = json!([{
        "thought": "I always fail.", "patterns": ["overgeneralization"], "intake_form": "Name: A",
        "cbt_technique": "Reframing", "cbt_plan": "1. Identify thoughts", "attitude": "positive",
        "dialogue": "Counselor: Hi, what brings you here?\nClient (sighs): Everything goes wrong.\nIt always does.\nClient: Every time.\nCounselor: That sounds heavy."
    }]);
    std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    let loaded = load(&path);
    assert_eq!(loaded.format, Format::Cactus);
    let Example::Conversation {
        messages, extra, ..
    } = &loaded.examples[0]
    else {
        panic!()
    };
    assert_eq!(
        messages,
        &[
            m("assistant", "Hi, what brings you here?"),
            m(
                "user",
                "(sighs) Everything goes wrong.\nIt always does.\nEvery time."
            ),
            m("assistant", "That sounds heavy.")
        ]
    );
    assert_eq!(extra["cbt_plan"], "1. Identify thoughts");
}

/// Tags in markdown emphasis and directions holding a colon are speakers; a tag-like
/// line naming no known speaker is refused, never glued into the turn before (where a
/// client's words would become the counselor's).
#[test]
fn cactus_speaker_tags_in_their_real_spellings() {
    use data::format::cactus_dialogue;
    let turns = cactus_dialogue(
        "Counselor: Hi.\n**Client:** My husband left.\n**Counselor**: That sounds hard.\n\
         Client (long pause: thinking): I don't know.\nThe client said: nothing.",
    )
    .unwrap();
    // A full-width colon (typed with a CJK input method) tags like an ASCII one; a label
    // that is no speaker's (`Step 1:`) or a sentence naming one goes on the turn before.
    let wide = cactus_dialogue(
        "Counselor：How are you?\nClient： Anxious.\nCounselor: Try this.\nStep 1: breathe.\n\
         my mother said: rest.",
    )
    .unwrap();
    assert_eq!(
        wide,
        [
            m("assistant", "How are you?"),
            m("user", "Anxious."),
            m(
                "assistant",
                "Try this.\nStep 1: breathe.\nmy mother said: rest."
            ),
        ]
    );
    assert_eq!(
        turns,
        [
            m("assistant", "Hi."),
            m("user", "My husband left."),
            m("assistant", "That sounds hard."),
            m(
                "user",
                "(long pause: thinking) I don't know.\nThe client said: nothing."
            ),
        ]
    );
    for (text, line) in [
        (
            "Counselor: Tell me more.\nClient 2: My husband left.",
            "line 2",
        ),
        ("Counselor: Hi.\n> Client: no.", "line 2"),
        ("Counselor: Hi.\nTherapist's note: calm", "line 2"),
        // Another voice (a family session, another data set's roles) is never glued
        // into the counselor's reply.
        (
            "Counselor: How does that feel?\nMother: My husband left her.",
            "line 2",
        ),
        (
            "Client: hi\nCounselor: Hello.\nPsychologist: I agree.",
            "line 3",
        ),
        ("Counselor: Hi.\n**Dr Lee**: My husband left.", "line 2"),
        ("Counselor: Hi.\nUser: My husband left.", "line 2"),
    ] {
        let e = cactus_dialogue(text).unwrap_err();
        assert!(
            e.contains(line) && e.contains("names none of"),
            "{text}: {e}"
        );
        assert!(!e.contains("husband"), "{e}");
    }
}

fn message_list_field() -> Field {
    let item = Fields::from(vec![
        Field::new("role", DataType::Utf8, true),
        Field::new("content", DataType::Utf8, true),
    ]);
    Field::new(
        "messages",
        DataType::List(Arc::new(Field::new("item", DataType::Struct(item), true))),
        true,
    )
}

fn messages_batch() -> RecordBatch {
    let item = Fields::from(vec![
        Field::new("role", DataType::Utf8, true),
        Field::new("content", DataType::Utf8, true),
    ]);
    let mut list = ListBuilder::new(StructBuilder::from_fields(item, 2));
    for (role, content) in [("user", "I feel tired."), ("assistant", "Since when?")] {
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
    let schema = Schema::new(vec![
        message_list_field(),
        Field::new("id", DataType::Int64, true),
    ]);
    RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(list.finish()) as ArrayRef,
            Arc::new(Int64Array::from(vec![7])),
        ],
    )
    .unwrap()
}

#[test]
fn parquet_with_message_structs_under_snappy_zstd_and_gzip() {
    let dir = tempfile::tempdir().unwrap();
    for (name, compression) in [
        ("snappy", Compression::SNAPPY),
        ("zstd", Compression::ZSTD(ZstdLevel::default())),
        // pandas' and pyarrow's `compression="gzip"`.
        ("gzip", Compression::GZIP(Default::default())),
    ] {
        let path = dir.path().join(format!("{name}.parquet"));
        let batch = messages_batch();
        let props = WriterProperties::builder()
            .set_compression(compression)
            .build();
        let mut w = ArrowWriter::try_new(
            std::fs::File::create(&path).unwrap(),
            batch.schema(),
            Some(props),
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let loaded = load(&path);
        assert_eq!(loaded.format, Format::Messages, "{name}");
        let Example::Conversation {
            messages, extra, ..
        } = &loaded.examples[0]
        else {
            panic!()
        };
        assert_eq!(
            messages,
            &[m("user", "I feel tired."), m("assistant", "Since when?")]
        );
        assert_eq!(extra["id"], 7);
    }
}

#[test]
fn parquet_large_strings_and_large_lists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("large.parquet");
    let mut history = LargeListBuilder::new(LargeListBuilder::new(StringBuilder::new()));
    history.values().values().append_value("hi");
    history.values().values().append_value("hello");
    history.values().append(true);
    history.append(true);
    let large = |v: &str| Arc::new(LargeStringArray::from(vec![v])) as ArrayRef;
    let schema = Schema::new(vec![
        Field::new("instruction", DataType::LargeUtf8, true),
        Field::new("input", DataType::LargeUtf8, true),
        Field::new("output", DataType::LargeUtf8, true),
        Field::new("history", history.finish().data_type().clone(), true),
    ]);
    let mut history = LargeListBuilder::new(LargeListBuilder::new(StringBuilder::new()));
    history.values().values().append_value("hi");
    history.values().values().append_value("hello");
    history.values().append(true);
    history.append(true);
    let batch = RecordBatch::try_new(
        Arc::new(schema),
        vec![
            large("i"),
            large(""),
            large("o"),
            Arc::new(history.finish()),
        ],
    )
    .unwrap();
    let mut w =
        ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let loaded = load(&path);
    assert_eq!(loaded.format, Format::CpsyCoun);
    assert_eq!(
        conversation(&loaded.examples[0]).0,
        &[
            m("user", "hi"),
            m("assistant", "hello"),
            m("user", "i"),
            m("assistant", "o")
        ]
    );
}

#[test]
fn arrow_ipc_file_and_stream() {
    let dir = tempfile::tempdir().unwrap();
    let batch = messages_batch();
    let file_path = dir.path().join("data.arrow");
    let mut w = arrow_ipc::writer::FileWriter::try_new(
        std::fs::File::create(&file_path).unwrap(),
        &batch.schema(),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    let stream_path = dir.path().join("cache.arrow");
    let mut w = arrow_ipc::writer::StreamWriter::try_new(
        std::fs::File::create(&stream_path).unwrap(),
        &batch.schema(),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    // zstd-compressed, as `datasets` and pyarrow write on request.
    let zstd_path = dir.path().join("zstd.arrow");
    let options = arrow_ipc::writer::IpcWriteOptions::default()
        .try_with_compression(Some(arrow_ipc::CompressionType::ZSTD))
        .unwrap();
    let mut w = arrow_ipc::writer::FileWriter::try_new_with_options(
        std::fs::File::create(&zstd_path).unwrap(),
        &batch.schema(),
        options,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    for path in [file_path, stream_path, zstd_path] {
        let loaded = load(&path);
        assert_eq!(
            conversation(&loaded.examples[0]).0,
            &[m("user", "I feel tired."), m("assistant", "Since when?")]
        );
    }
}

#[test]
fn bad_rows_name_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let good = json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]});
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "invalid.jsonl",
            format!("{good}\n{{\"messages\": [\n").into_bytes(),
            &[
                "invalid.jsonl",
                "line 2",
                "invalid JSON at column 14: EOF while parsing a list",
            ],
        ),
        (
            "missing.jsonl",
            format!("{}\n", json!({"prompt": "p", "chosen": "c"})).into_bytes(),
            &["missing.jsonl", "line 1"],
        ),
        (
            "role.jsonl",
            format!(
                "{good}\n{}\n",
                json!({"messages": [{"role": "narrator", "content": "x"}]})
            )
            .into_bytes(),
            &[
                "role.jsonl",
                "line 2",
                "column `messages`",
                "unknown role `narrator`",
            ],
        ),
        (
            "empty.jsonl",
            format!("{}\n", json!({"messages": []})).into_bytes(),
            &["empty.jsonl", "line 1", "column `messages`", "empty"],
        ),
        (
            "types.jsonl",
            format!(
                "{}\n{}\n",
                json!({"messages": [{"role": 1, "content": "a"}]}),
                json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null}]}),
            )
            .into_bytes(),
            &[
                "types.jsonl",
                "line 1",
                "column `messages`",
                "message 1: `role` must be a string, got a number",
            ],
        ),
        (
            "null.jsonl",
            format!(
                "{}\n",
                json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null}]}),
            )
            .into_bytes(),
            &[
                "null.jsonl",
                "line 1",
                "message 2: message content must be a string, got null",
            ],
        ),
        (
            "tools.jsonl",
            format!(
                "{good}\n{}\n",
                json!({"messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function"}]},
                ]})
            )
            .into_bytes(),
            &[
                "tools.jsonl",
                "line 2",
                "column `messages`",
                "message 2: `tool_calls` is not supported",
            ],
        ),
        (
            "utf8.jsonl",
            [
                format!("{good}\n").into_bytes(),
                b"{\"messages\": \"\xff\xfe\"}\n".to_vec(),
            ]
            .concat(),
            &["utf8.jsonl", "line 2", "UTF-8"],
        ),
        (
            "cactus.jsonl",
            format!("{}\n", json!({"dialogue": "Narrator: once"})).into_bytes(),
            &["cactus.jsonl", "column `dialogue`", "Counselor:"],
        ),
    ];
    for (name, bytes, needles) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let message = err(&path, &LoadOptions::default());
        for needle in needles {
            assert!(
                message.contains(needle),
                "`{needle}` missing from: {message}"
            );
        }
        // The row's line is the file's; serde_json's "line 1" inside the row would contradict it.
        assert!(!message.contains("line 1 column"), "{message}");
    }
    // A missing column under an explicit format names the column.
    let path = jsonl(
        dir.path(),
        "pref.jsonl",
        &[json!({"prompt": "p", "chosen": "c"})],
    );
    let options = LoadOptions {
        format: Some(Format::Preference),
        ..Default::default()
    };
    let message = err(&path, &options);
    assert!(
        message.contains("line 1")
            && message.contains("column `rejected`")
            && message.contains("missing"),
        "{message}"
    );
}

#[test]
fn skip_bad_rows_counts_and_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let good = json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]});
    let bytes = [
        format!(
            "{good}\nnot json\n{}\n",
            json!({"messages": [{"role": "x", "content": "y"}]})
        )
        .into_bytes(),
        b"\xff\n".to_vec(),
        format!("{good}\n").into_bytes(),
    ]
    .concat();
    let path = dir.path().join("mixed.jsonl");
    std::fs::write(&path, bytes).unwrap();
    let loaded = load_examples(
        &path,
        &LoadOptions {
            skip_bad_rows: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(loaded.examples.len(), 2);
    let lines: Vec<String> = loaded
        .skipped
        .iter()
        .map(|b| b.location.to_string())
        .collect();
    assert_eq!(lines, vec!["line 2", "line 3", "line 4"]);
    assert_eq!(loaded.skipped[1].column.as_deref(), Some("messages"));
    // A first row that shows no format is one more bad row; the next one decides.
    let comment = dir.path().join("comment.jsonl");
    std::fs::write(&comment, format!("{}\n{good}\n", json!({"_comment": "x"}))).unwrap();
    let skipping = LoadOptions {
        skip_bad_rows: true,
        ..Default::default()
    };
    let loaded = load_examples(&comment, &skipping).unwrap();
    assert_eq!(loaded.format, Format::Messages);
    assert_eq!(loaded.examples.len(), 1);
    assert_eq!(loaded.skipped[0].location.to_string(), "line 1");
    let message = err(&comment, &LoadOptions::default());
    assert!(
        message.contains("line 1") && message.contains("cannot tell the format"),
        "{message}"
    );
}

#[test]
fn unknown_file_types_and_undetectable_columns_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.csv");
    std::fs::write(&path, "a,b\n").unwrap();
    assert!(err(&path, &LoadOptions::default()).contains("unknown file type"));
    let path = jsonl(dir.path(), "odd.jsonl", &[json!({"text": "x"})]);
    let message = err(&path, &LoadOptions::default());
    assert!(
        message.contains("odd.jsonl") && message.contains("line 1") && message.contains("[`text`]"),
        "{message}"
    );
    let path = dir.path().join("corrupt.parquet");
    std::fs::write(&path, b"PAR1 but not really").unwrap();
    assert!(err(&path, &LoadOptions::default()).contains("corrupt.parquet"));
}

#[test]
fn psychocounsel_split_keeps_each_question_on_one_side() {
    let dir = tempfile::tempdir().unwrap();
    // 60 questions, each with 1 to 5 preference pairs, rows interleaved.
    let mut rows = Vec::new();
    for round in 0..5 {
        for q in 0..60 {
            if round <= q % 5 {
                rows.push(json!({"question": format!("Question {q}: I feel stuck."), "chosen": format!("reply {round}"), "rejected": "just stop"}));
            }
        }
    }
    let path = jsonl(dir.path(), "pc.jsonl", &rows);
    let loaded = load(&path);
    let keys: Vec<String> = loaded.examples.iter().map(Example::group_key).collect();
    let (train, eval) = data::batch::split_by_group(&keys, 0.25, 3);
    assert!(!train.is_empty() && !eval.is_empty());
    let eval_keys: std::collections::HashSet<&String> = eval.iter().map(|&i| &keys[i]).collect();
    assert!(train.iter().all(|&i| !eval_keys.contains(&keys[i])));
    assert_eq!(data::batch::split_by_group(&keys, 0.25, 3), (train, eval));
}

/// Files saved by Windows editors start with a UTF-8 byte-order mark: JSON Lines and JSON
/// arrays read as if it were not there, and every example knows its line or row.
#[test]
fn a_byte_order_mark_is_not_data() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        json!({"prompt": "a", "completion": "b"}),
        json!({"prompt": "c", "completion": "d"}),
    ];
    let p = dir.path().join("bom.jsonl");
    let text: String = rows.iter().map(|r| format!("{r}\n\n")).collect();
    std::fs::write(&p, format!("\u{feff}{text}")).unwrap();
    let loaded = load(&p);
    assert_eq!(loaded.examples.len(), 2);
    assert_eq!(
        loaded.locations,
        vec![data::read::Location::Line(1), data::read::Location::Line(3)]
    );
    let p = dir.path().join("bom.json");
    std::fs::write(&p, format!("\u{feff}{}", Value::Array(rows.to_vec()))).unwrap();
    let loaded = load(&p);
    assert_eq!(loaded.examples.len(), 2);
    assert_eq!(loaded.locations[1], data::read::Location::Row(1));
}

/// Counseling data is sensitive: an error names the kind of a bad value, the row and the
/// column, and never echoes what was said, wherever it turns up in the wrong place.
#[test]
fn errors_never_echo_what_a_row_says() {
    let dir = tempfile::tempdir().unwrap();
    let said = "I want to die and nobody would notice";
    let user = |content: Value| json!([{"role": "user", "content": content}]);
    let cases: Vec<(Value, &[&str])> = vec![
        (
            json!({"prompt": {"text": said}, "completion": "c"}),
            &["column `prompt`", "got an object"],
        ),
        (
            json!({"messages": user(json!({"text": said}))}),
            &["column `messages`", "must be a string, got an object"],
        ),
        (
            json!({"instruction": [said], "output": "o"}),
            &["column `instruction`", "expected a string, got an array"],
        ),
        (
            json!({"instruction": "i", "output": "o", "history": said}),
            &["column `history`", "got a string"],
        ),
        (
            json!({"messages": [{"role": said, "content": "hi"}]}),
            &["message 1: an unknown role (37 characters)"],
        ),
        (
            json!({"text": "x", said: 1}),
            &["columns [`text`, a name of 37 characters]"],
        ),
    ];
    for (i, (row, needles)) in cases.iter().enumerate() {
        let path = jsonl(
            dir.path(),
            &format!("case{i}.jsonl"),
            std::slice::from_ref(row),
        );
        let message = err(&path, &LoadOptions::default());
        assert!(!message.contains("want to die"), "{message}");
        for needle in needles
            .iter()
            .chain(&[&format!("case{i}.jsonl: line 1")[..]])
        {
            assert!(
                message.contains(needle),
                "`{needle}` missing from: {message}"
            );
        }
    }
}

/// Sessions the counselor opens have no client words before the first assistant turn, and
/// GRPO prompts may hold only the shared system prompt: each row is still its own group, so
/// a split of distinct rows has both sides, while rows sharing a question stay together.
#[test]
fn rows_without_a_client_turn_before_the_reply_still_split() {
    let dir = tempfile::tempdir().unwrap();
    let sessions: Vec<Value> = (0..50)
        .map(|i| {
            json!({"dialogue": format!(
                "Counselor: Hi, what brings you here today?\nClient: Worry number {i}.\nCounselor: Tell me more."
            )})
        })
        .collect();
    let system = json!({"role": "system", "content": "You are a counselor."});
    let prompts: Vec<Value> = (0..50)
        .map(|i| json!({"prompt": [system], "intake_form": format!("Client {i}")}))
        .collect();
    // The same client opening answered twice, and a greeting-only dialogue twice.
    let repeated = |name: &str, rows: &[Value]| {
        let loaded = load(&jsonl(dir.path(), name, rows));
        let keys: Vec<String> = loaded.examples.iter().map(Example::group_key).collect();
        assert_eq!(keys[0], keys[1], "{name}");
    };
    repeated(
        "twice.jsonl",
        &[
            json!({"dialogue": "Counselor: Hi.\nClient: I cannot sleep.\nCounselor: Since when?"}),
            json!({"dialogue": "Counselor: Hi.\nClient: I cannot sleep.\nCounselor: What keeps you up?"}),
        ],
    );
    repeated(
        "same-prompt.jsonl",
        &[
            json!({"prompt": [system], "intake_form": "A", "risk": "low"}),
            json!({"risk": "low", "intake_form": "A", "prompt": [system]}),
        ],
    );
    for (name, rows) in [("sessions.jsonl", sessions), ("prompts.jsonl", prompts)] {
        let loaded = load(&jsonl(dir.path(), name, &rows));
        let keys: Vec<String> = loaded.examples.iter().map(Example::group_key).collect();
        let distinct: std::collections::HashSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), 50, "{name}");
        let (train, eval) = data::batch::split_by_group(&keys, 0.2, 0);
        assert!(
            (25..50).contains(&train.len()) && !eval.is_empty(),
            "{name}: {} train, {} eval",
            train.len(),
            eval.len()
        );
    }
}

/// A column whose type has no JSON value (image bytes) does not make the file unreadable
/// unless the format reads it; then the error says why, not that it is missing.
#[test]
fn unreadable_columns_matter_only_when_read() {
    use arrow_array::BinaryArray;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, columns: Vec<(&str, ArrayRef)>| {
        let path = dir.path().join(name);
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None)
                .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        path
    };
    let messages = messages_batch().column(0).clone();
    let image = || Arc::new(BinaryArray::from(vec![&b"\x89PNG"[..]])) as ArrayRef;
    let path = write(
        "with-image.parquet",
        vec![("messages", messages), ("image", image())],
    );
    let loaded = load(&path);
    assert_eq!(loaded.format, Format::Messages);
    assert_eq!(
        conversation(&loaded.examples[0]).0,
        &[m("user", "I feel tired."), m("assistant", "Since when?")]
    );
    // Read as the conversation itself: named, with its type.
    let path = write("image-only.parquet", vec![("messages", image())]);
    let options = LoadOptions {
        format: Some(Format::Messages),
        ..Default::default()
    };
    let message = err(&path, &options);
    assert!(
        message.contains("row 0, column `messages`: column type Binary is not supported"),
        "{message}"
    );
    let message = err(&path, &LoadOptions::default());
    assert!(
        message.contains("cannot tell the format")
            && message.contains("left out as unreadable: `messages` (column type Binary"),
        "{message}"
    );
}

/// A `.json` file holding one pretty-printed object (or several) is read as rows, not as
/// JSON Lines broken at every line; a JSON Lines `.json` whose first line is broken is
/// still JSON Lines, so that line can be skipped.
#[test]
fn pretty_printed_json_objects_are_rows() {
    let dir = tempfile::tempdir().unwrap();
    let talk = json!({"messages": [
        {"role": "user", "content": "I feel tired."},
        {"role": "assistant", "content": "Since when?"}]});
    let pretty = serde_json::to_string_pretty(&talk).unwrap();
    let path = dir.path().join("one.json");
    std::fs::write(&path, format!("\u{feff}{pretty}\n")).unwrap();
    let loaded = load(&path);
    assert_eq!(loaded.examples.len(), 1);
    assert_eq!(
        conversation(&loaded.examples[0]).0,
        &[m("user", "I feel tired."), m("assistant", "Since when?")]
    );
    std::fs::write(&path, format!("{pretty}\n{pretty}\n7\n")).unwrap();
    let loaded = load_examples(
        &path,
        &LoadOptions {
            skip_bad_rows: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(loaded.examples.len(), 2);
    assert_eq!(loaded.skipped[0].location.to_string(), "row 2");
    // Broken inside the second object: the error names its line.
    std::fs::write(&path, format!("{pretty}\n{{\n  \"messages\": [\n}}\n")).unwrap();
    let message = err(&path, &LoadOptions::default());
    let second = pretty.lines().count() + 1;
    assert!(
        (second..second + 3).any(|l| message.contains(&format!("one.json: line {l}, column "))),
        "{message}"
    );
    assert!(
        !message.contains(" at line "),
        "positioned twice: {message}"
    );

    let path = dir.path().join("lines.json");
    std::fs::write(&path, format!("{{\"messages\": [\n{talk}\n")).unwrap();
    let loaded = load_examples(
        &path,
        &LoadOptions {
            skip_bad_rows: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(loaded.examples.len(), 1);
    assert_eq!(loaded.skipped[0].location.to_string(), "line 1");
}

/// A name that repeats in a columnar schema is refused, as a repeated JSON key is: one of
/// the values would win unseen. Dictionary-encoded columns read as their values.
#[test]
fn columnar_names_must_be_distinct_and_dictionaries_read_as_values() {
    use arrow_array::{DictionaryArray, StringArray, types::Int32Type};
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, batch: RecordBatch| {
        let path = dir.path().join(name);
        let mut w = arrow_ipc::writer::FileWriter::try_new(
            std::fs::File::create(&path).unwrap(),
            &batch.schema(),
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        path
    };
    let text = |v: &[&str]| Arc::new(StringArray::from(v.to_vec())) as ArrayRef;
    let top = Schema::new(vec![
        Field::new("prompt", DataType::Utf8, true),
        Field::new("prompt", DataType::Utf8, true),
        Field::new("completion", DataType::Utf8, true),
    ]);
    let batch = RecordBatch::try_new(
        Arc::new(top),
        vec![text(&["a"]), text(&["b"]), text(&["c"])],
    )
    .unwrap();
    let message = err(&write("top.arrow", batch), &LoadOptions::default());
    assert!(
        message.contains("top.arrow") && message.contains("name `prompt` appears twice"),
        "{message}"
    );
    // Inside the messages' structs: a second `role` would make the client's turn the
    // assistant's.
    let item = Fields::from(vec![
        Field::new("role", DataType::Utf8, true),
        Field::new("content", DataType::Utf8, true),
        Field::new("role", DataType::Utf8, true),
    ]);
    let mut list = ListBuilder::new(StructBuilder::from_fields(item.clone(), 1));
    let s = list.values();
    for (k, v) in ["user", "I feel sad", "assistant"].into_iter().enumerate() {
        s.field_builder::<StringBuilder>(k).unwrap().append_value(v);
    }
    s.append(true);
    list.append(true);
    let schema = Schema::new(vec![Field::new(
        "messages",
        DataType::List(Arc::new(Field::new("item", DataType::Struct(item), true))),
        true,
    )]);
    let batch =
        RecordBatch::try_new(Arc::new(schema), vec![Arc::new(list.finish()) as ArrayRef]).unwrap();
    let message = err(&write("nested.arrow", batch), &LoadOptions::default());
    assert!(message.contains("name `role` appears twice"), "{message}");

    let prompts: DictionaryArray<Int32Type> = vec!["b", "a", "b", "c"].into_iter().collect();
    let schema = Schema::new(vec![
        Field::new("prompt", prompts.data_type().clone(), true),
        Field::new("completion", DataType::Utf8, true),
    ]);
    let batch = RecordBatch::try_new(
        Arc::new(schema),
        vec![Arc::new(prompts) as ArrayRef, text(&["1", "2", "3", "4"])],
    )
    .unwrap();
    let loaded = load(&write("dict.arrow", batch));
    let asked: Vec<&str> = loaded
        .examples
        .iter()
        .map(|e| conversation(e).0[0].content.as_str())
        .collect();
    assert_eq!(asked, ["b", "a", "b", "c"]);
}
