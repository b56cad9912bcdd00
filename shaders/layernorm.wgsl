// LayerNorm over the channels of each row (eps 1e-5, biased variance), forward and backward.
// N = B*T rows of C channels; C is a multiple of 4 and rows are read as vec4 (C4 = C / 4).
//
// layernorm_forward:     inp (N, C) f32, weight (C,) f32, bias (C,) f32
//                        -> out (N, C) f32 = (inp - mean) * rstd * weight + bias,
//                           mean (N,) f32, rstd (N,) f32 = 1 / sqrt(var + eps)   (saved for the backward)
// layernorm_backward:    dout (N, C) f32, inp (N, C) f32, weight (C,) f32, mean (N,) f32, rstd (N,) f32
//                        -> dinp (N, C) f32 ACCUMULATED (+=, the residual stream's gradient),
//                           partial (n_blocks, 2, C) f32 WRITTEN: per block of rows_per_block rows,
//                           [blk, 0] = sum of dout * norm (for dweight), [blk, 1] = sum of dout (for dbias)
// layernorm_param_grads: partial_in (n_blocks, 2, C) f32 -> dweight (C,) f32 +=, dbias (C,) f32 +=
//                        (blocks summed in order: deterministic, no atomics)
// layernorm_param_grads_deferred: the same for up to MAX_DEFERRED layernorms at once, workgroup row k of the grid
//                        for layernorm k of the `deferred` table: its partial sums at vec4 partial_at of
//                        partial_in, its dweight and dbias at vec4s dweight_at and dbias_at of grads. So that the
//                        parameter gradients of all a model's layernorms are one dispatch at the end of its
//                        backward instead of one after each layernorm's backward, each waiting for the one before.
//
// Row reductions: a 64-thread workgroup works on R = WG / TPR rows at once, TPR threads per row (TPR, an override
// constant, a power of two in 1..64, chosen on the Python side: for the forward the smallest that covers a row
// with KMAX vec4s per thread; the backward's R is besides at most rows_per_block rounded up to a power of two).
// Thread t of a row sums the row's vec4s t, t + TPR, t + 2 TPR, ... in that order, then a log2(TPR)-level tree
// adds the row's TPR partial sums, the trees of all R rows sharing the same barriers. Rows past N (or past the
// block) add nothing but take part in the barriers. Every sum has a fixed order (no atomics), so results are
// bit-identical run to run; they depend on TPR, which depends only on C (and rows_per_block).
//
// layernorm_forward:     one workgroup per R rows. A thread keeps its first KMAX vec4s of the row in registers
//                        (vec4s past KMAX TPR, only for C > 4 KMAX TPR, are read again in each pass): the mean
//                        first, then the centred sum of squares (two passes, no cancellation), then the output;
//                        2 (1 + log2 TPR) barriers per workgroup.
// layernorm_backward:    one workgroup per block of rows_per_block rows. 1. the two per-row means (of dnorm and of
//                        dnorm * norm), R rows at a time (1 + log2 TPR barriers per R rows); 2. per channel (a
//                        thread's own vec4s), dinp of every row of the block (rows in order, their loads 4 rows at
//                        a time) and the block's dweight/dbias sums.
// layernorm_param_grads: one workgroup per vec4 of dweight or dbias.
// The forward's and backward's grids may be folded into 2-D (x, y).

struct LNParams { N: u32, C4: u32, rows_per_block: u32, n_blocks: u32 }

@group(0) @binding(0) var<uniform> lp: LNParams;
@group(0) @binding(1) var<storage, read> inp: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> weight: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> mean: array<f32>;
@group(0) @binding(6) var<storage, read_write> rstd: array<f32>;
@group(0) @binding(7) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> dinp: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> partial: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> dweight: array<vec4<f32>>;
@group(0) @binding(11) var<storage, read_write> dbias: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read> partial_in: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read_write> grads: array<vec4<f32>>;
@group(0) @binding(14) var<uniform> deferred: array<Deferred, MAX_DEFERRED>;

struct Deferred { partial_at: u32, dweight_at: u32, dbias_at: u32, _pad: u32 }   // vec4 indices
const MAX_DEFERRED: u32 = 64u;

override TPR: u32 = 16u;     // threads per row: a power of two, 1..WG (the Python side sets it)
const WG: u32 = 64u;
override PWG: u32 = 64u;     // threads of the parameter-gradient kernels: a power of two, 1..WG, at least n_blocks
                             // where that is below WG (the threads beyond would add zeros: the same sums)
const KMAX: u32 = 8u;        // vec4s of a row a thread keeps in registers (forward)
const MAX_ROWS: u32 = 64u;   // rows_per_block is at most this
const EPS: f32 = 1e-5;

var<workgroup> red_m: array<f32, WG>;        // forward: the mean's partial sums
var<workgroup> red_q: array<f32, WG>;        // forward: the variance's partial sums
var<workgroup> red: array<vec2<f32>, WG>;    // backward step 1
var<workgroup> row_sums: array<vec2<f32>, MAX_ROWS>;    // backward: (mean(dnorm), mean(dnorm * norm)) per row
var<workgroup> row_stats: array<vec2<f32>, MAX_ROWS>;   // backward: (mean, rstd) per row
var<workgroup> red4: array<vec4<f32>, WG>;

fn sum4(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// The forward's three passes over one thread's share of the row at base: its vec4s t, t + stride, t + 2 stride, ...
// (the first KMAX of them kept in x by row_sum, the rest read again by each pass), for both forward kernels
// (stride TPR here, the subgroup's width in layernorm_subgroups.wgsl).
fn row_sum(x: ptr<function, array<vec4<f32>, KMAX>>, base: u32, t: u32, stride: u32) -> f32 {
    let C4 = lp.C4;
    for (var k = 0u; k < KMAX; k++) {
        let i = t + k * stride;
        if (i < C4) { (*x)[k] = inp[base + i]; }
    }
    var s = 0.0;
    for (var k = 0u; k < KMAX; k++) {
        if (t + k * stride < C4) { s += sum4((*x)[k]); }
    }
    for (var i = t + KMAX * stride; i < C4; i += stride) {
        s += sum4(inp[base + i]);
    }
    return s;
}

fn row_centred_squares(x: ptr<function, array<vec4<f32>, KMAX>>, base: u32, t: u32, stride: u32, m: f32) -> f32 {
    let C4 = lp.C4;
    var q = 0.0;
    for (var k = 0u; k < KMAX; k++) {
        if (t + k * stride < C4) {
            let d = (*x)[k] - m;
            q += dot(d, d);
        }
    }
    for (var i = t + KMAX * stride; i < C4; i += stride) {
        let d = inp[base + i] - m;
        q += dot(d, d);
    }
    return q;
}

// The output of row `row` (at base), and its mean and rstd (thread or lane 0).
fn row_store(x: ptr<function, array<vec4<f32>, KMAX>>, row: u32, base: u32, t: u32, stride: u32, m: f32, r: f32) {
    let C4 = lp.C4;
    for (var k = 0u; k < KMAX; k++) {
        let i = t + k * stride;
        if (i < C4) { out[base + i] = ((*x)[k] - m) * r * weight[i] + bias[i]; }
    }
    for (var i = t + KMAX * stride; i < C4; i += stride) {
        out[base + i] = (inp[base + i] - m) * r * weight[i] + bias[i];
    }
    if (t == 0u) {
        mean[row] = m;
        rstd[row] = r;
    }
}

@compute @workgroup_size(WG)
fn layernorm_forward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                     @builtin(local_invocation_id) lid: vec3u) {
    let R = WG / TPR;
    let row0 = (wg.y * nwg.x + wg.x) * R;
    if (row0 >= lp.N) { return; }   // surplus workgroups of a folded grid (uniform: the whole workgroup)
    let C4 = lp.C4;
    let t = lid.x % TPR;            // thread within the row
    let first = lid.x - t;          // the row's first slot in red_m / red_q
    let row = row0 + lid.x / TPR;
    let live = row < lp.N;          // the last workgroup's rows past N take part in the barriers only
    let base = row * C4;
    let inv_c = 1.0 / f32(4u * C4);

    // 1. The mean. x[k] = vec4 t + k TPR of the row, where that is < C4.
    var x: array<vec4<f32>, KMAX>;
    var s = 0.0;
    if (live) { s = row_sum(&x, base, t, TPR); }
    red_m[lid.x] = s;
    workgroupBarrier();
    for (var h = TPR / 2u; h > 0u; h >>= 1u) {
        if (t < h) { red_m[lid.x] += red_m[lid.x + h]; }
        workgroupBarrier();
    }
    let m = red_m[first] * inv_c;

    // 2. The variance from the centred values (two passes): no cancellation for rows with a large mean.
    var q = 0.0;
    if (live) { q = row_centred_squares(&x, base, t, TPR, m); }
    red_q[lid.x] = q;
    workgroupBarrier();
    for (var h = TPR / 2u; h > 0u; h >>= 1u) {
        if (t < h) { red_q[lid.x] += red_q[lid.x + h]; }
        workgroupBarrier();
    }
    let r = inverseSqrt(red_q[first] * inv_c + EPS);

    // 3. The output.
    if (live) { row_store(&x, row, base, t, TPR, m, r); }
}

// dnorm = weight * dout;  dinp += (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd
@compute @workgroup_size(WG)
fn layernorm_backward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                      @builtin(local_invocation_id) lid: vec3u) {
    let blk = wg.y * nwg.x + wg.x;
    if (blk >= lp.n_blocks) { return; }
    let C4 = lp.C4;
    let row0 = blk * lp.rows_per_block;
    let rows = min(lp.rows_per_block, lp.N - row0);
    let inv_c = 1.0 / f32(4u * C4);
    let R = WG / TPR;
    let t = lid.x % TPR;
    let first = lid.x - t;

    // 1. Per row: the two means over the channels that every channel's input gradient needs; R rows at a time,
    //    TPR threads per row.
    for (var rr = 0u; rr < rows; rr += R) {
        let r = rr + lid.x / TPR;
        var acc = vec2(0.0);
        if (r < rows) {
            let row = row0 + r;
            let base = row * C4;
            let m = mean[row];
            let rs = rstd[row];
            for (var i = t; i < C4; i += TPR) {
                acc = dnorm_sums(acc, base + i, weight[i], vec2(m, rs));
            }
            if (t == 0u) { row_stats[r] = vec2(m, rs); }
        }
        red[lid.x] = acc;
        workgroupBarrier();
        for (var h = TPR / 2u; h > 0u; h >>= 1u) {
            if (t < h) { red[lid.x] += red[lid.x + h]; }
            workgroupBarrier();
        }
        if (t == 0u && r < rows) { row_sums[r] = red[first] * inv_c; }
        workgroupBarrier();   // red is reused by the next R rows; row_sums and row_stats are read below
    }

    backward_channels(blk, row0, rows, lid.x);
}

// Backward step 1 (both backward kernels): a + (sum of dnorm, sum of dnorm * norm) over the vec4 at idx of a row
// with (mean, rstd) st; w: its weights.
fn dnorm_sums(a: vec2<f32>, idx: u32, w: vec4<f32>, st: vec2<f32>) -> vec2<f32> {
    let dnorm = w * dout[idx];
    return a + vec2(sum4(dnorm), dot(dnorm, (inp[idx] - st.x) * st.y));
}

// Backward step 2, after row_sums and row_stats hold the block's rows (both backward kernels).
fn backward_channels(blk: u32, row0: u32, rows: u32, lid: u32) {
    let C4 = lp.C4;
    // Per channel (the thread's own): dinp of every row in the block, and the block's dweight/dbias sums, rows in
    // order. The loads of 4 rows are issued before their stores (a store to dinp would otherwise keep the next
    // row's loads waiting).
    for (var i = lid; i < C4; i += WG) {
        let w = weight[i];
        var dw = vec4(0.0);
        var db = vec4(0.0);
        var r = 0u;
        for (; r + 4u <= rows; r += 4u) {
            let i0 = (row0 + r) * C4 + i;
            let i1 = i0 + C4;
            let i2 = i1 + C4;
            let i3 = i2 + C4;
            let x0 = inp[i0];
            let x1 = inp[i1];
            let x2 = inp[i2];
            let x3 = inp[i3];
            let d0 = dout[i0];
            let d1 = dout[i1];
            let d2 = dout[i2];
            let d3 = dout[i3];
            let g0 = dinp[i0];
            let g1 = dinp[i1];
            let g2 = dinp[i2];
            let g3 = dinp[i3];
            let n0 = row_grad(r, i0, x0, d0, g0, w);
            let n1 = row_grad(r + 1u, i1, x1, d1, g1, w);
            let n2 = row_grad(r + 2u, i2, x2, d2, g2, w);
            let n3 = row_grad(r + 3u, i3, x3, d3, g3, w);
            dw += d0 * n0;
            db += d0;
            dw += d1 * n1;
            db += d1;
            dw += d2 * n2;
            db += d2;
            dw += d3 * n3;
            db += d3;
        }
        for (; r < rows; r++) {
            let idx = (row0 + r) * C4 + i;
            let d = dout[idx];
            let n = row_grad(r, idx, inp[idx], d, dinp[idx], w);
            dw += d * n;
            db += d;
        }
        partial[(2u * blk) * C4 + i] = dw;
        partial[(2u * blk + 1u) * C4 + i] = db;
    }
}

// Backward step 2 for row r of the block at element idx (inp x, dout d, the dinp g it holds, weight w): stores
// dinp; returns norm.
fn row_grad(r: u32, idx: u32, x: vec4<f32>, d: vec4<f32>, g: vec4<f32>, w: vec4<f32>) -> vec4<f32> {
    let st = row_stats[r];   // (mean, rstd)
    let sums = row_sums[r];  // (mean(dnorm), mean(dnorm * norm))
    let norm = (x - st.x) * st.y;
    dinp[idx] = g + (w * d - sums.x - norm * sums.y) * st.y;
    return norm;
}

// One workgroup per (dweight or dbias, vec4 of channels): thread t sums blocks t, t + PWG, ... in order, then a
// fixed tree adds the threads' sums, and the total is added to the gradient.
@compute @workgroup_size(PWG)
fn layernorm_param_grads(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let total = param_total(0u, wg.x, lid.x);
    if (lid.x == 0u) {
        if (wg.x < lp.C4) {
            dweight[wg.x] += total;
        } else {
            dbias[wg.x - lp.C4] += total;
        }
    }
}

// Grid (2 C4, layernorms): workgroup (j, k) makes vec4 j of layernorm k's [dweight | dbias].
@compute @workgroup_size(PWG)
fn layernorm_param_grads_deferred(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let d = deferred[wg.y];
    let total = param_total(d.partial_at, wg.x, lid.x);
    if (lid.x == 0u) {
        let at = select(d.dbias_at + wg.x - lp.C4, d.dweight_at + wg.x, wg.x < lp.C4);
        grads[at] += total;
    }
}

// The sum over the blocks of the partial sums at vec4 base of partial_in, for vec4 j of [dweight | dbias] (valid
// in thread 0): thread t sums blocks t, t + PWG, ... in order, then a fixed tree adds the threads' sums.
fn param_total(base: u32, j: u32, lid: u32) -> vec4<f32> {
    let which = j / lp.C4;   // 0: dweight, 1: dbias
    let c = j % lp.C4;
    var acc = vec4(0.0);
    for (var blk = lid; blk < lp.n_blocks; blk += PWG) {
        acc += partial_in[base + (2u * blk + which) * lp.C4 + c];
    }
    red4[lid] = acc;
    workgroupBarrier();
    for (var s = PWG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red4[lid] += red4[lid + s]; }
        workgroupBarrier();
    }
    return red4[0];
}
