//! The CUDA prover's kernels (`worker/src/cuda/prover.cu`) run only where a GPU is; their
//! logic is checked here on every machine by compiling the same source as C++ on the host,
//! one thread standing in for the grid, and comparing every output with the CPU prover's:
//! the seeded matrices (A directly; B through the product the harness computes from them
//! with its own loop) and the SHA-256 leaves of the memory fill. The cuBLAS call itself
//! (its argument order and leading dimensions) is checked only where a GPU is, by
//! `cuda_prover.rs`.

use std::io::Write as _;
use std::process::Command;

use ionet_common::gpu_proof::{chunk_leaf, row_bytes, ComputeTask, MemoryTask};

const HARNESS: &str = r#"
#include <cstdio>
#include <cstdlib>
#define __global__
#define __device__
struct ionet_dim { unsigned int x; };
static ionet_dim blockIdx = {0}, threadIdx = {0}, blockDim = {1}, gridDim = {1};
#include KERNELS

int main(int argc, char** argv) {
    if (argc != 8) return 2;
    ionet_u64 key_a = strtoull(argv[1], 0, 10), key_b = strtoull(argv[2], 0, 10);
    ionet_u64 n = strtoull(argv[3], 0, 10), k = strtoull(argv[4], 0, 10);
    ionet_u64 key_m = strtoull(argv[5], 0, 10), chunk_bytes = strtoull(argv[6], 0, 10);
    ionet_u32 chunks = (ionet_u32)strtoull(argv[7], 0, 10);
    float* a = (float*)malloc(n * k * sizeof(float));
    float* b = (float*)malloc(k * n * sizeof(float));
    float* c = (float*)calloc(n * n, sizeof(float));
    ionet_entries(a, key_a, n * k);
    ionet_entries(b, key_b, k * n);
    for (ionet_u64 i = 0; i < n * k; i++) printf("%d ", (int)a[i]);
    printf("\n");
    // The product in row-major order, by the harness's own loop (not cuBLAS's).
    for (ionet_u64 i = 0; i < n; i++)
        for (ionet_u64 p = 0; p < k; p++)
            for (ionet_u64 j = 0; j < n; j++) c[i * n + j] += a[i * k + p] * b[p * n + j];
    for (ionet_u64 i = 0; i < n * n; i++) printf("%d ", (int)c[i]);
    printf("\n");
    ionet_u64* fill = (ionet_u64*)malloc(chunk_bytes * chunks);
    unsigned char* leaves = (unsigned char*)malloc(32 * (ionet_u64)chunks);
    ionet_fill(fill, key_m, chunk_bytes * chunks / 8);
    ionet_chunk_leaves(fill, chunk_bytes, chunks, leaves);
    for (ionet_u32 j = 0; j < chunks; j++) {
        for (int i = 0; i < 32; i++) printf("%02x", leaves[32 * j + i]);
        printf("\n");
    }
    return 0;
}
"#;

fn ints(line: &str) -> Vec<i32> {
    line.split_whitespace().map(|value| value.parse().unwrap()).collect()
}

#[test]
fn the_cuda_kernels_compute_what_the_cpu_prover_does() {
    let dir = tempfile::tempdir().unwrap();
    let kernels = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cuda/prover.cu");
    let source = dir.path().join("harness.cpp");
    let mut file = std::fs::File::create(&source).unwrap();
    file.write_all(HARNESS.replace("KERNELS", &format!("{kernels:?}")).as_bytes()).unwrap();
    drop(file);
    let binary = dir.path().join("harness");
    let compiled = Command::new("c++")
        .args(["-O2", "-std=c++14", "-Wall", "-Werror", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("a C++ compiler (c++) is needed to check the CUDA kernels on the host");
    assert!(compiled.status.success(), "the kernels do not compile:\n{}", String::from_utf8_lossy(&compiled.stderr));

    let compute = ComputeTask { seed: [7; 32], n: 24, k: 40 };
    // Chunks of an odd number of 64-byte blocks and leaves past one padding block.
    let memory = MemoryTask { seed: [9; 32], chunk_bytes: 8 * 13, chunks: 21 };
    let (key_a, key_b) = compute.keys();
    let output = Command::new(&binary)
        .args(
            [
                key_a,
                key_b,
                compute.n.into(),
                compute.k.into(),
                memory.key(),
                memory.chunk_bytes.into(),
                memory.chunks.into(),
            ]
            .map(|value: u64| value.to_string()),
        )
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let mut lines = stdout.lines();

    let a: Vec<i32> =
        (0..compute.n).flat_map(|i| (0..compute.k).map(move |j| (i, j))).map(|(i, j)| compute.a(i, j)).collect();
    assert_eq!(ints(lines.next().unwrap()), a, "matrix A");

    let b = compute.b_matrix();
    let rows: Vec<u8> = (0..compute.n).flat_map(|i| row_bytes(&compute.row(i, &b))).collect();
    let product: Vec<u8> = ints(lines.next().unwrap()).iter().flat_map(|value| value.to_le_bytes()).collect();
    assert_eq!(product, rows, "the product's rows");
    assert!(product.iter().any(|&byte| byte != 0));

    let leaves: Vec<String> = lines.map(str::to_string).collect();
    let expected: Vec<String> = (0..memory.chunks).map(|j| hex::encode(chunk_leaf(j, &memory.chunk(j)))).collect();
    assert_eq!(leaves, expected, "the fill's leaves");
}
