//! One turn of a conversation, the unit every data format is normalised into.

use serde::{Deserialize, Serialize};

/// A chat message as Hugging Face templates expect it: `{"role": ..., "content": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn is_assistant(&self) -> bool {
        self.role == "assistant"
    }
}
