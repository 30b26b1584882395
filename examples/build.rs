//! The README's Rust code, extracted for `src/bin/readme.rs` to compile and run as written
//! (so the README cannot drift from the API).

fn main() {
    let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    println!("cargo:rerun-if-changed={}", readme.display());
    let text = std::fs::read_to_string(&readme).expect("the workspace's README.md");
    let mut blocks = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim_end() == "```rust" {
            let block: Vec<&str> = lines.by_ref().take_while(|line| line.trim_end() != "```").collect();
            blocks.push(block.join("\n"));
        }
    }
    // One program: a second block needs a binary of its own here.
    assert_eq!(blocks.len(), 1, "README.md has {} Rust blocks; examples/src/bin/readme.rs runs one", blocks.len());
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("readme.rs"), &blocks[0]).expect("OUT_DIR is writable");
}
