//! JSON values whose objects never repeat a key. serde_json keeps the last of two equal
//! keys without a word, so `{"role": "user", "content": "…", "role": "assistant"}` would turn
//! a client's words into a reply to learn from; a data row that says two things is refused.

use std::fmt;

use serde::de::{Deserialize, Deserializer, Error, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// A [`Value`] read with every object's keys checked for repeats, at any depth.
pub struct Strict(pub Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: Error>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Strict::deserialize(d).map(|s| s.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if fields.contains_key(&key) {
                // A key may be a client's words (a dict keyed by utterance): named only
                // when it reads as a name.
                return Err(A::Error::custom(format!(
                    "key {} appears twice in one object",
                    crate::read::shown_name(&key)
                )));
            }
            let Strict(value) = map.next_value()?;
            fields.insert(key, value);
        }
        Ok(Value::Object(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Value, String> {
        serde_json::from_str::<Strict>(text)
            .map(|s| s.0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn values_read_as_serde_json_reads_them() {
        let text = r#"{"a": [1, -2, 3.5, 1e300, 0.1, "x", null, true, {"b": {}}], "big": 18446744073709551615}"#;
        let plain: Value = serde_json::from_str(text).unwrap();
        assert_eq!(read(text).unwrap(), plain);
    }

    #[test]
    fn a_repeated_key_is_named_at_any_depth() {
        let e = read(r#"{"messages": [{"role": "user", "content": "x", "role": "assistant"}]}"#)
            .unwrap_err();
        assert!(
            e.contains("key `role` appears twice") && e.contains("column"),
            "{e}"
        );
        let e = read(r#"{"messages": [], "messages": []}"#).unwrap_err();
        assert!(e.contains("key `messages` appears twice"), "{e}");
        let e =
            read(r#"{"meta": {"My husband hits me": 1, "My husband hits me": 2}}"#).unwrap_err();
        assert!(
            e.contains("key a name of 18 characters appears twice") && !e.contains("husband"),
            "{e}"
        );
        // Equal keys in different objects are no repeat.
        read(r#"[{"role": "a"}, {"role": "b"}]"#).unwrap();
    }
}
