//! Helpers shared by the integration tests: deterministic contents that are cheap to
//! make and to check even in debug builds (block copies and `memcmp`, no per-byte loops
//! over hundreds of MiB).
#![allow(dead_code)]

use ionet_object_store::{LocalObjectStore, StoreConfig};

pub const MIB: u64 = 1024 * 1024;
const BLOCK: usize = 64 * 1024;

/// One 64 KiB block of pseudo-random bytes for `seed`, with the block index stamped in
/// its first 8 bytes so that misplaced blocks are caught too.
fn block(seed: u64, index: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut block = vec![0u8; BLOCK];
    for word in block.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
    block[..8].copy_from_slice(&index.to_le_bytes());
    block
}

/// Fills `buf` with the contents of object `seed`.
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut template = block(seed, 0);
    for (index, chunk) in buf.chunks_mut(BLOCK).enumerate() {
        template[..8].copy_from_slice(&(index as u64).to_le_bytes());
        chunk.copy_from_slice(&template[..chunk.len()]);
    }
}

pub fn contents(size: u64, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; size as usize];
    fill(&mut buf, seed);
    buf
}

/// Whether `bytes` are exactly the contents of object `seed`.
pub fn matches(bytes: &[u8], size: u64, seed: u64) -> bool {
    if bytes.len() as u64 != size {
        return false;
    }
    let mut template = block(seed, 0);
    bytes.chunks(BLOCK).enumerate().all(|(index, chunk)| {
        template[..8].copy_from_slice(&(index as u64).to_le_bytes());
        chunk == &template[..chunk.len()]
    })
}

pub fn store(capacity: u64) -> LocalObjectStore {
    LocalObjectStore::new(StoreConfig::with_capacity(capacity)).expect("store opens")
}

pub fn id(n: u8) -> ionet_common::ObjectId {
    let mut bytes = [0u8; 28];
    bytes[0] = n;
    bytes[27] = 0xAB;
    ionet_common::ObjectId::from_array(bytes)
}
