//! Training objectives. Each turns a batch into a loss and its metrics; the loop owns
//! everything else.

pub mod sft;
