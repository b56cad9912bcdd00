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
// layernorm_param_grads: partial (n_blocks, 2, C) f32 -> dweight (C,) f32 +=, dbias (C,) f32 +=
//                        (blocks summed in order: deterministic, no atomics)
//
// One workgroup per row (forward), per block of rows (backward), per vec4 of dweight or dbias (param_grads);
// grids may be folded into 2-D (x, y).

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

const WG: u32 = 64u;
const MAX_ROWS: u32 = 64u;   // rows_per_block is at most this
const EPS: f32 = 1e-5;

var<workgroup> red: array<vec2<f32>, WG>;
var<workgroup> row_sums: array<vec2<f32>, MAX_ROWS>;
var<workgroup> red4: array<vec4<f32>, WG>;

// Sum of one vec2 per thread over the workgroup, in a fixed tree order; every thread gets the total.
fn wg_sum2(v: vec2<f32>, lid: u32) -> vec2<f32> {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] += red[lid + s]; }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();   // red is reused by the next call
    return total;
}

fn sum4(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

@compute @workgroup_size(WG)
fn layernorm_forward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                     @builtin(local_invocation_id) lid: vec3u) {
    let row = wg.y * nwg.x + wg.x;
    if (row >= lp.N) { return; }
    let base = row * lp.C4;
    let inv_c = 1.0 / f32(4u * lp.C4);
    var s = 0.0;
    for (var i = lid.x; i < lp.C4; i += WG) {
        s += sum4(inp[base + i]);
    }
    let m = wg_sum2(vec2(s, 0.0), lid.x).x * inv_c;
    // Variance from the centred values (two passes): no cancellation for rows with a large mean.
    var q = 0.0;
    for (var i = lid.x; i < lp.C4; i += WG) {
        let d = inp[base + i] - m;
        q += dot(d, d);
    }
    let r = inverseSqrt(wg_sum2(vec2(q, 0.0), lid.x).x * inv_c + EPS);
    for (var i = lid.x; i < lp.C4; i += WG) {
        out[base + i] = (inp[base + i] - m) * r * weight[i] + bias[i];
    }
    if (lid.x == 0u) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// dnorm = weight * dout;  dinp += (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd
@compute @workgroup_size(WG)
fn layernorm_backward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                      @builtin(local_invocation_id) lid: vec3u) {
    let blk = wg.y * nwg.x + wg.x;
    if (blk >= lp.n_blocks) { return; }
    let row0 = blk * lp.rows_per_block;
    let rows = min(lp.rows_per_block, lp.N - row0);
    let inv_c = 1.0 / f32(4u * lp.C4);
    // 1. Per row: the two means over the channels that every channel's input gradient needs.
    for (var r = 0u; r < rows; r++) {
        let row = row0 + r;
        let base = row * lp.C4;
        let m = mean[row];
        let rs = rstd[row];
        var acc = vec2(0.0);
        for (var i = lid.x; i < lp.C4; i += WG) {
            let norm = (inp[base + i] - m) * rs;
            let dnorm = weight[i] * dout[base + i];
            acc += vec2(sum4(dnorm), dot(dnorm, norm));
        }
        let total = wg_sum2(acc, lid.x);
        if (lid.x == 0u) { row_sums[r] = total * inv_c; }
    }
    workgroupBarrier();
    // 2. Per channel (the thread's own): dinp of every row in the block, and the block's dweight/dbias sums.
    for (var i = lid.x; i < lp.C4; i += WG) {
        let w = weight[i];
        var dw = vec4(0.0);
        var db = vec4(0.0);
        for (var r = 0u; r < rows; r++) {
            let row = row0 + r;
            let idx = row * lp.C4 + i;
            let rs = rstd[row];
            let norm = (inp[idx] - mean[row]) * rs;
            let d = dout[idx];
            let sums = row_sums[r];
            dinp[idx] += (w * d - sums.x - norm * sums.y) * rs;
            dw += d * norm;
            db += d;
        }
        partial[(2u * blk) * lp.C4 + i] = dw;
        partial[(2u * blk + 1u) * lp.C4 + i] = db;
    }
}

// One workgroup per (dweight or dbias, vec4 of channels): thread t sums blocks t, t + WG, ... in order, then a
// fixed tree adds the threads' sums, and the total is added to the gradient.
@compute @workgroup_size(WG)
fn layernorm_param_grads(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let which = wg.x / lp.C4;   // 0: dweight, 1: dbias
    let c = wg.x % lp.C4;
    var acc = vec4(0.0);
    for (var blk = lid.x; blk < lp.n_blocks; blk += WG) {
        acc += partial[(2u * blk + which) * lp.C4 + c];
    }
    red4[lid.x] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid.x < s) { red4[lid.x] += red4[lid.x + s]; }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        if (which == 0u) {
            dweight[c] += red4[0];
        } else {
            dbias[c] += red4[0];
        }
    }
}
