// Matmul on tensor cores through cooperative matrices (wgpu's native `wgpu_cooperative_matrix` extension,
// VK_KHR_cooperative_matrix underneath). Native only: browsers have no such extension.
//
//   out (M, N) f32 = A (M, K) @ B (K, N), inputs in f16 (or f32 converted to f16 while staging), f32 accumulation.
//
// A cooperative matrix belongs to one subgroup (32 invocations on NVIDIA): each subgroup loads, multiplies and
// stores its own 16x16 tiles. The subgroup index is local_invocation_index / 32, which assumes subgroups of 32
// made of consecutive invocations (NVIDIA). coopLoadT/coopStoreT read and write row-major tiles; plain
// coopLoad/coopStore are column-major (bench/bench_coop.py checks this on the device before anything else).
// Accumulators start from a load of `zeros` (`coop_mat16x16<f32, C>()` works too).
// naga 29 panics while writing SPIR-V ("Expression [..] is not cached") for a coopStoreT whose stride or
// element index is an expression such as p.N or o + 16u: every store takes `let` names (or constants).
//
// Kernels, slowest first (bench/bench_coop.py times them against cuBLAS):
//   matmul_naive          one 16x16 output tile per subgroup, tiles read straight from global memory
//   matmul_block          2x2 tiles (32x32) per subgroup: each A and B tile read feeds two products
//   matmul_staged         128x128 output block per workgroup of 8 subgroups (64x32 = 4x2 tiles each);
//                         A and B slices of 32 along K staged through workgroup memory
//   matmul_staged_f32in   the same with f32 inputs in global memory, rounded to f16 while staging
// Sizes: naive needs M, N, K multiples of 16; block M, N multiples of 32; staged M, N multiples of 128, K of 32.

enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    M: u32,
    N: u32,
    K: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f16>;             // (M, K) f16
@group(0) @binding(1) var<storage, read> b: array<f16>;             // (K, N) f16
@group(0) @binding(2) var<storage, read_write> out: array<f32>;     // (M, N) f32
@group(0) @binding(3) var<storage, read> zeros: array<f32>;         // (16, 16) f32, all zero
@group(0) @binding(4) var<uniform> p: Params;
@group(0) @binding(5) var<storage, read> a4: array<vec4<f16>>;      // (M, K/4) f16: A read four at a time
@group(0) @binding(6) var<storage, read> b4: array<vec4<f16>>;      // (K, N/4) f16
@group(0) @binding(7) var<storage, read> a4f: array<vec4<f32>>;     // (M, K/4) f32
@group(0) @binding(8) var<storage, read> b4f: array<vec4<f32>>;     // (K, N/4) f32

const SUBGROUP = 32u;

// ---------------------------------------------------------------------------------------------
// One tile per subgroup; a workgroup of 4 subgroups covers 32x32 of out. Dispatch (N / 32, M / 32).
@compute @workgroup_size(128)
fn matmul_naive(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = p.N;   // a store's stride and index must be `let` names: see the header
    let sg = lid / SUBGROUP;
    let row = wg.y * 32u + (sg / 2u) * 16u;
    let col = wg.x * 32u + (sg % 2u) * 16u;
    var acc = coopLoadT<coop_mat16x16<f32, C>>(&zeros[0], 16u);
    for (var k = 0u; k < p.K; k += 16u) {
        let x = coopLoadT<coop_mat16x16<f16, A>>(&a[row * p.K + k], p.K);
        let y = coopLoadT<coop_mat16x16<f16, B>>(&b[k * p.N + col], p.N);
        acc = coopMultiplyAdd(x, y, acc);
    }
    let o = row * n + col;
    coopStoreT(acc, &out[o], n);
}

// ---------------------------------------------------------------------------------------------
// 2x2 tiles per subgroup; a workgroup of 4 subgroups covers 64x64. Dispatch (N / 64, M / 64).
@compute @workgroup_size(128)
fn matmul_block(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = p.N;
    let sg = lid / SUBGROUP;
    let row = wg.y * 64u + (sg / 2u) * 32u;
    let col = wg.x * 64u + (sg % 2u) * 32u;
    let zero = coopLoadT<coop_mat16x16<f32, C>>(&zeros[0], 16u);
    var c00 = zero;
    var c01 = zero;
    var c10 = zero;
    var c11 = zero;
    for (var k = 0u; k < p.K; k += 16u) {
        let x0 = coopLoadT<coop_mat16x16<f16, A>>(&a[row * p.K + k], p.K);
        let x1 = coopLoadT<coop_mat16x16<f16, A>>(&a[(row + 16u) * p.K + k], p.K);
        let y0 = coopLoadT<coop_mat16x16<f16, B>>(&b[k * p.N + col], p.N);
        let y1 = coopLoadT<coop_mat16x16<f16, B>>(&b[k * p.N + col + 16u], p.N);
        c00 = coopMultiplyAdd(x0, y0, c00);
        c01 = coopMultiplyAdd(x0, y1, c01);
        c10 = coopMultiplyAdd(x1, y0, c10);
        c11 = coopMultiplyAdd(x1, y1, c11);
    }
    let o00 = row * n + col;
    let o01 = o00 + 16u;
    let o10 = o00 + 16u * n;
    let o11 = o10 + 16u;
    coopStoreT(c00, &out[o00], n);
    coopStoreT(c01, &out[o01], n);
    coopStoreT(c10, &out[o10], n);
    coopStoreT(c11, &out[o11], n);
}

// ---------------------------------------------------------------------------------------------
// Staged: a 128x128 block of out per workgroup, K in slices of 32 through workgroup memory.
// Rows of the staged tiles are padded by 8 halves (16 bytes) against bank conflicts; a cooperative
// load wants 16-byte aligned rows, which 40 and 136 halves keep.
const BM = 128u;
const BN = 128u;
const BK = 32u;
const AS = 40u;    // tile_a row stride (BK + 8)
const BS = 136u;   // tile_b row stride (BN + 8)
var<workgroup> tile_a: array<f16, 5120>;   // (BM, AS)
var<workgroup> tile_b: array<f16, 4352>;   // (BK, BS)

fn put_a(r: u32, c: u32, v: vec4<f16>) {
    let i = r * AS + c;
    tile_a[i] = v.x;
    tile_a[i + 1u] = v.y;
    tile_a[i + 2u] = v.z;
    tile_a[i + 3u] = v.w;
}

fn put_b(r: u32, c: u32, v: vec4<f16>) {
    let i = r * BS + c;
    tile_b[i] = v.x;
    tile_b[i + 1u] = v.y;
    tile_b[i + 2u] = v.z;
    tile_b[i + 3u] = v.w;
}

// Subgroup sg owns rows sr..sr+63 and columns sc..sc+31 of the block: 4x2 tiles, c0..c7 in row-major order.
@compute @workgroup_size(256)
fn matmul_staged(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = wg.y * BM;
    let col0 = wg.x * BN;
    let sg = lid / SUBGROUP;
    let sr = (sg / 4u) * 64u;
    let sc = (sg % 4u) * 32u;
    let n = p.N;
    let K4 = p.K / 4u;
    let N4 = n / 4u;
    let zero = coopLoadT<coop_mat16x16<f32, C>>(&zeros[0], 16u);
    var c0 = zero; var c1 = zero; var c2 = zero; var c3 = zero;
    var c4 = zero; var c5 = zero; var c6 = zero; var c7 = zero;
    for (var k0 = 0u; k0 < p.K; k0 += BK) {
        // Stage A (128 x 32 halves = 1024 vec4) and B (32 x 128 halves = 1024 vec4): 4 + 4 per invocation.
        for (var i = 0u; i < 4u; i++) {
            let e = lid + 256u * i;
            let ra = e / 8u;
            let ca = (e % 8u) * 4u;
            put_a(ra, ca, a4[(row0 + ra) * K4 + (k0 + ca) / 4u]);
            let rb = e / 32u;
            let cb = (e % 32u) * 4u;
            put_b(rb, cb, b4[(k0 + rb) * N4 + (col0 + cb) / 4u]);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += 16u) {
            let y0 = coopLoadT<coop_mat16x16<f16, B>>(&tile_b[kk * BS + sc], BS);
            let y1 = coopLoadT<coop_mat16x16<f16, B>>(&tile_b[kk * BS + sc + 16u], BS);
            let x0 = coopLoadT<coop_mat16x16<f16, A>>(&tile_a[(sr + 0u) * AS + kk], AS);
            c0 = coopMultiplyAdd(x0, y0, c0);
            c1 = coopMultiplyAdd(x0, y1, c1);
            let x1 = coopLoadT<coop_mat16x16<f16, A>>(&tile_a[(sr + 16u) * AS + kk], AS);
            c2 = coopMultiplyAdd(x1, y0, c2);
            c3 = coopMultiplyAdd(x1, y1, c3);
            let x2 = coopLoadT<coop_mat16x16<f16, A>>(&tile_a[(sr + 32u) * AS + kk], AS);
            c4 = coopMultiplyAdd(x2, y0, c4);
            c5 = coopMultiplyAdd(x2, y1, c5);
            let x3 = coopLoadT<coop_mat16x16<f16, A>>(&tile_a[(sr + 48u) * AS + kk], AS);
            c6 = coopMultiplyAdd(x3, y0, c6);
            c7 = coopMultiplyAdd(x3, y1, c7);
        }
        workgroupBarrier();
    }
    let o0 = (row0 + sr) * n + col0 + sc;
    let o1 = o0 + 16u;
    let o2 = o0 + 16u * n;
    let o3 = o2 + 16u;
    let o4 = o2 + 16u * n;
    let o5 = o4 + 16u;
    let o6 = o4 + 16u * n;
    let o7 = o6 + 16u;
    coopStoreT(c0, &out[o0], n);
    coopStoreT(c1, &out[o1], n);
    coopStoreT(c2, &out[o2], n);
    coopStoreT(c3, &out[o3], n);
    coopStoreT(c4, &out[o4], n);
    coopStoreT(c5, &out[o5], n);
    coopStoreT(c6, &out[o6], n);
    coopStoreT(c7, &out[o7], n);
}

@compute @workgroup_size(256)
fn matmul_staged_f32in(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = wg.y * BM;
    let col0 = wg.x * BN;
    let sg = lid / SUBGROUP;
    let sr = (sg / 4u) * 64u;
    let sc = (sg % 4u) * 32u;
    let n = p.N;
    let K4 = p.K / 4u;
    let N4 = n / 4u;
    let zero = coopLoadT<coop_mat16x16<f32, C>>(&zeros[0], 16u);
    var c0 = zero; var c1 = zero; var c2 = zero; var c3 = zero;
    var c4 = zero; var c5 = zero; var c6 = zero; var c7 = zero;
    for (var k0 = 0u; k0 < p.K; k0 += BK) {
        for (var i = 0u; i < 4u; i++) {
            let e = lid + 256u * i;
            let ra = e / 8u;
            let ca = (e % 8u) * 4u;
            put_a(ra, ca, vec4<f16>(a4f[(row0 + ra) * K4 + (k0 + ca) / 4u]));
            let rb = e / 32u;
            let cb = (e % 32u) * 4u;
            put_b(rb, cb, vec4<f16>(b4f[(k0 + rb) * N4 + (col0 + cb) / 4u]));
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += 16u) {
            let y0 = coopLoadT<coop_mat16x16<f16, B>>(&tile_b[kk * BS + sc], BS);
            let y1 = coopLoadT<coop_mat16x16<f16, B>>(&tile_b[kk * BS + sc + 16u], BS);
            let x0 = coopLoadT<coop_mat16x16<f16, A>>(&tile_a[(sr + 0u) * AS + kk], AS);
            c0 = coopMultiplyAdd(x0, y0, c0);
            c1 = coopMultiplyAdd(x0, y1, c1);
            let x1 = coopLoadT<coop_mat16x16<f16, A>>(&tile_a[(sr + 16u) * AS + kk], AS);
            c2 = coopMultiplyAdd(x1, y0, c2);
            c3 = coopMultiplyAdd(x1, y1, c3);
            let x2 = coopLoadT<coop_mat16x16<f16, A>>(&tile_a[(sr + 32u) * AS + kk], AS);
            c4 = coopMultiplyAdd(x2, y0, c4);
            c5 = coopMultiplyAdd(x2, y1, c5);
            let x3 = coopLoadT<coop_mat16x16<f16, A>>(&tile_a[(sr + 48u) * AS + kk], AS);
            c6 = coopMultiplyAdd(x3, y0, c6);
            c7 = coopMultiplyAdd(x3, y1, c7);
        }
        workgroupBarrier();
    }
    let o0 = (row0 + sr) * n + col0 + sc;
    let o1 = o0 + 16u;
    let o2 = o0 + 16u * n;
    let o3 = o2 + 16u;
    let o4 = o2 + 16u * n;
    let o5 = o4 + 16u;
    let o6 = o4 + 16u * n;
    let o7 = o6 + 16u;
    coopStoreT(c0, &out[o0], n);
    coopStoreT(c1, &out[o1], n);
    coopStoreT(c2, &out[o2], n);
    coopStoreT(c3, &out[o3], n);
    coopStoreT(c4, &out[o4], n);
    coopStoreT(c5, &out[o5], n);
    coopStoreT(c6, &out[o6], n);
    coopStoreT(c7, &out[o7], n);
}
