// Self-test kernels: a workgroup-tiled matmul and a deterministic tree reduction.
// `tabgpt device` and the WebGPU check page run them against a pure-Python reference.
//
// matmul:  a (M,K) f32, b (K,N) f32, out (M,N) f32;  out = a @ b
// reduce_sum: inp (n,) f32, out (ceil(n / (256*4)),) f32: per-workgroup partial sums

struct MatmulParams { M: u32, N: u32, K: u32, _pad: u32 }

@group(0) @binding(0) var<uniform> mp: MatmulParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const TS: u32 = 16u;
var<workgroup> tile_a: array<f32, 256>;   // TS*TS
var<workgroup> tile_b: array<f32, 256>;

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let row = wg.y * TS + lid.y;
    let col = wg.x * TS + lid.x;
    var acc = 0.0;
    let n_tiles = (mp.K + TS - 1u) / TS;
    for (var t = 0u; t < n_tiles; t++) {
        let ka = t * TS + lid.x;
        let kb = t * TS + lid.y;
        tile_a[lid.y * TS + lid.x] = select(0.0, a[row * mp.K + ka], row < mp.M && ka < mp.K);
        tile_b[lid.y * TS + lid.x] = select(0.0, b[kb * mp.N + col], kb < mp.K && col < mp.N);
        workgroupBarrier();
        for (var k = 0u; k < TS; k++) {
            acc = fma(tile_a[lid.y * TS + k], tile_b[k * TS + lid.x], acc);
        }
        workgroupBarrier();
    }
    if (row < mp.M && col < mp.N) {
        out[row * mp.N + col] = acc;
    }
}

struct ReduceParams { n: u32, _p0: u32, _p1: u32, _p2: u32 }

@group(0) @binding(4) var<uniform> rp: ReduceParams;
@group(0) @binding(5) var<storage, read> inp: array<f32>;
@group(0) @binding(6) var<storage, read_write> partial: array<f32>;

var<workgroup> scratch: array<f32, 256>;

@compute @workgroup_size(256)
fn reduce_sum(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    // Each thread sums 4 strided elements, then a fixed-order tree: the same result on every run.
    let base = wg.x * 1024u + lid.x;
    var s = 0.0;
    for (var i = 0u; i < 4u; i++) {
        let j = base + i * 256u;
        if (j < rp.n) { s += inp[j]; }
    }
    scratch[lid.x] = s;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (lid.x < stride) { scratch[lid.x] += scratch[lid.x + stride]; }
        workgroupBarrier();
    }
    if (lid.x == 0u) { partial[wg.x] = scratch[0]; }
}

// A no-op-sized kernel to measure the cost of one replayed dispatch.
@compute @workgroup_size(64)
fn touch(@builtin(global_invocation_id) g: vec3u) {
    if (g.x == 0u) { partial[0] = partial[0] + 1.0; }
}
