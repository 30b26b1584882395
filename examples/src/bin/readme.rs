//! The README's Rust example, exactly as written there (extracted by `build.rs`).
//!
//!   cargo run -p ionet-examples --bin readme

include!(concat!(env!("OUT_DIR"), "/readme.rs"));
