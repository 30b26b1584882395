// The CUDA prover's kernels (see `worker/src/cuda_prover.rs`): the seeded matrices and
// memory fill of `ionet_common::gpu_proof`, generated on the GPU, and the SHA-256 leaves
// of the fill's chunks, hashed where the fill lives. NVRTC compiles this at run time; the
// test `cuda_kernels_on_host` compiles it as C++ on the host (with `IONET_HOST` defined and
// one thread standing in for the grid) and checks every output against the CPU prover.
// Each kernel is a grid-stride loop, so any launch size covers the whole range.

typedef unsigned long long ionet_u64;
typedef unsigned int ionet_u32;

#define IONET_GOLDEN 0x9E3779B97F4A7C15ULL

__device__ ionet_u64 ionet_splitmix64(ionet_u64 x) {
    x += IONET_GOLDEN;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

// `count` entries of a seeded matrix (row-major), integers in [-4, 4] held as floats:
// entry `i` is `splitmix64(key ^ i·golden) mod 9 − 4`, as `gpu_proof::entry`.
extern "C" __global__ void ionet_entries(float* out, ionet_u64 key, ionet_u64 count) {
    ionet_u64 stride = (ionet_u64)gridDim.x * blockDim.x;
    for (ionet_u64 i = (ionet_u64)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
        out[i] = (float)((int)(ionet_splitmix64(key ^ (i * IONET_GOLDEN)) % 9ULL) - 4);
    }
}

// The memory fill: word `i` is `splitmix64(key ^ i·golden)`, stored little-endian, as
// `gpu_proof::MemoryTask::chunk`.
extern "C" __global__ void ionet_fill(ionet_u64* out, ionet_u64 key, ionet_u64 words) {
    ionet_u64 stride = (ionet_u64)gridDim.x * blockDim.x;
    for (ionet_u64 i = (ionet_u64)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride) {
        out[i] = ionet_splitmix64(key ^ (i * IONET_GOLDEN));
    }
}

__device__ const ionet_u32 IONET_SHA256_K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

struct ionet_sha256 {
    ionet_u32 h[8];
    unsigned char block[64];
    ionet_u32 used;
    ionet_u64 total;
};

__device__ ionet_u32 ionet_rotr(ionet_u32 x, ionet_u32 n) {
    return (x >> n) | (x << (32 - n));
}

__device__ void ionet_sha256_init(ionet_sha256* s) {
    s->h[0] = 0x6a09e667; s->h[1] = 0xbb67ae85; s->h[2] = 0x3c6ef372; s->h[3] = 0xa54ff53a;
    s->h[4] = 0x510e527f; s->h[5] = 0x9b05688c; s->h[6] = 0x1f83d9ab; s->h[7] = 0x5be0cd19;
    s->used = 0;
    s->total = 0;
}

__device__ void ionet_sha256_compress(ionet_sha256* s) {
    ionet_u32 w[64];
    for (int i = 0; i < 16; i++) {
        w[i] = ((ionet_u32)s->block[4 * i] << 24) | ((ionet_u32)s->block[4 * i + 1] << 16)
            | ((ionet_u32)s->block[4 * i + 2] << 8) | (ionet_u32)s->block[4 * i + 3];
    }
    for (int i = 16; i < 64; i++) {
        ionet_u32 s0 = ionet_rotr(w[i - 15], 7) ^ ionet_rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
        ionet_u32 s1 = ionet_rotr(w[i - 2], 17) ^ ionet_rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    ionet_u32 a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3];
    ionet_u32 e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
    for (int i = 0; i < 64; i++) {
        ionet_u32 t1 = h + (ionet_rotr(e, 6) ^ ionet_rotr(e, 11) ^ ionet_rotr(e, 25)) + ((e & f) ^ (~e & g))
            + IONET_SHA256_K[i] + w[i];
        ionet_u32 t2 = (ionet_rotr(a, 2) ^ ionet_rotr(a, 13) ^ ionet_rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d;
    s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

__device__ void ionet_sha256_byte(ionet_sha256* s, unsigned char byte) {
    s->block[s->used++] = byte;
    s->total++;
    if (s->used == 64) {
        ionet_sha256_compress(s);
        s->used = 0;
    }
}

__device__ void ionet_sha256_final(ionet_sha256* s, unsigned char* out) {
    ionet_u64 bits = s->total * 8;
    ionet_sha256_byte(s, 0x80);
    while (s->used != 56) {
        ionet_sha256_byte(s, 0);
    }
    for (int i = 7; i >= 0; i--) {
        ionet_sha256_byte(s, (unsigned char)(bits >> (8 * i)));
    }
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(s->h[i] >> 24);
        out[4 * i + 1] = (unsigned char)(s->h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(s->h[i] >> 8);
        out[4 * i + 3] = (unsigned char)s->h[i];
    }
}

// The leaves of `chunks` chunks of `chunk_bytes` (a multiple of 8) each, one thread a
// chunk: SHA-256 of the tag `ionet-proof-chunk`, the chunk's index as a little-endian u32,
// and its bytes, as `gpu_proof::chunk_leaf`.
extern "C" __global__ void ionet_chunk_leaves(const ionet_u64* fill, ionet_u64 chunk_bytes, ionet_u32 chunks,
                                              unsigned char* leaves) {
    const char tag[] = "ionet-proof-chunk";
    ionet_u64 words = chunk_bytes / 8;
    ionet_u64 stride = (ionet_u64)gridDim.x * blockDim.x;
    for (ionet_u64 j = (ionet_u64)blockIdx.x * blockDim.x + threadIdx.x; j < chunks; j += stride) {
        ionet_sha256 s;
        ionet_sha256_init(&s);
        for (int i = 0; tag[i] != 0; i++) {
            ionet_sha256_byte(&s, (unsigned char)tag[i]);
        }
        for (int i = 0; i < 4; i++) {
            ionet_sha256_byte(&s, (unsigned char)(j >> (8 * i)));
        }
        const ionet_u64* chunk = fill + j * words;
        for (ionet_u64 w = 0; w < words; w++) {
            ionet_u64 word = chunk[w];
            for (int i = 0; i < 8; i++) {
                ionet_sha256_byte(&s, (unsigned char)(word >> (8 * i)));
            }
        }
        ionet_sha256_final(&s, leaves + 32 * j);
    }
}
