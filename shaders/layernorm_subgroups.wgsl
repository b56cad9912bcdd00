enable subgroups;

// LayerNorm's kernels with subgroup reductions: compiled together with layernorm.wgsl (its bindings, constants and
// backward_channels), where the device has subgroups (ops/layernorm.py). Same results as those kernels up to the
// order of the row sums.
//
// A subgroup (a warp of 32 on NVIDIA, 4 lanes on SwiftShader, 8 on lavapipe, ...) reduces a whole row: its lanes
// read the row's vec4s lane, lane + width, ... and subgroupAdd adds their sums, with no workgroup memory and no
// barrier. A lane's number and the subgroup's width are counted (subgroupExclusiveAdd(1), subgroupAdd(1)) rather
// than taken from subgroup_invocation_id and subgroup_size, so partial subgroups work too; subgroup_id and
// num_subgroups place the subgroups among the workgroup's rows. The loops around the subgroup operations run
// the same number of times in every subgroup of the workgroup (rows that do not exist add zeros), so the
// operations stay in uniform control flow. The sums' order is the device's subgroupAdd's: fixed for a device,
// so results are bit-identical run to run there.
//
// layernorm_forward_sg:     one workgroup per SG_ROWS rows; its subgroups take rows sid, sid + num_subgroups, ...
// layernorm_backward_sg:    step 1 a subgroup per row of the block (one barrier in all), step 2 as
//                           layernorm_backward
// layernorm_param_grads_sg: each subgroup's blocks added by subgroupAdd, the subgroups' sums in order

const SG_ROWS: u32 = 2u;     // rows per forward workgroup (a warp each on NVIDIA)

var<workgroup> red4_sg: array<vec4<f32>, WG>;   // param grads: one sum per subgroup (at most WG subgroups)

@compute @workgroup_size(WG)
fn layernorm_forward_sg(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                        @builtin(subgroup_id) sid: u32, @builtin(num_subgroups) nsg: u32) {
    let lane = subgroupExclusiveAdd(1u);
    let width = subgroupAdd(1u);
    let C4 = lp.C4;
    let inv_c = 1.0 / f32(4u * C4);
    let row0 = (wg.y * nwg.x + wg.x) * SG_ROWS;
    for (var j = 0u; j < SG_ROWS; j += nsg) {
        let r = j + sid;
        let row = row0 + r;
        let live = r < SG_ROWS && row < lp.N;
        let base = row * C4;
        var x: array<vec4<f32>, KMAX>;
        var s = 0.0;
        if (live) {
            for (var k = 0u; k < KMAX; k++) {
                let i = lane + k * width;
                if (i < C4) { x[k] = inp[base + i]; }
            }
            for (var k = 0u; k < KMAX; k++) {
                if (lane + k * width < C4) { s += sum4(x[k]); }
            }
            for (var i = lane + KMAX * width; i < C4; i += width) {
                s += sum4(inp[base + i]);
            }
        }
        let m = subgroupAdd(s) * inv_c;
        var q = 0.0;
        if (live) {
            for (var k = 0u; k < KMAX; k++) {
                if (lane + k * width < C4) {
                    let d = x[k] - m;
                    q += dot(d, d);
                }
            }
            for (var i = lane + KMAX * width; i < C4; i += width) {
                let d = inp[base + i] - m;
                q += dot(d, d);
            }
        }
        let rs = inverseSqrt(subgroupAdd(q) * inv_c + EPS);
        if (live) {
            for (var k = 0u; k < KMAX; k++) {
                let i = lane + k * width;
                if (i < C4) { out[base + i] = (x[k] - m) * rs * weight[i] + bias[i]; }
            }
            for (var i = lane + KMAX * width; i < C4; i += width) {
                out[base + i] = (inp[base + i] - m) * rs * weight[i] + bias[i];
            }
            if (lane == 0u) {
                mean[row] = m;
                rstd[row] = rs;
            }
        }
    }
}

@compute @workgroup_size(WG)
fn layernorm_backward_sg(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                         @builtin(local_invocation_id) lid: vec3u,
                         @builtin(subgroup_id) sid: u32, @builtin(num_subgroups) nsg: u32) {
    let blk = wg.y * nwg.x + wg.x;
    if (blk >= lp.n_blocks) { return; }
    let lane = subgroupExclusiveAdd(1u);
    let width = subgroupAdd(1u);
    let C4 = lp.C4;
    let row0 = blk * lp.rows_per_block;
    let rows = min(lp.rows_per_block, lp.N - row0);
    let inv_c = 1.0 / f32(4u * C4);

    // 1. Per row, a subgroup: the two means over the channels.
    for (var rr = 0u; rr < rows; rr += nsg) {
        let r = rr + sid;
        var acc = vec2(0.0);
        if (r < rows) {
            let row = row0 + r;
            let base = row * C4;
            let m = mean[row];
            let rs = rstd[row];
            for (var i = lane; i < C4; i += width) {
                let norm = (inp[base + i] - m) * rs;
                let dnorm = weight[i] * dout[base + i];
                acc += vec2(sum4(dnorm), dot(dnorm, norm));
            }
            if (lane == 0u) { row_stats[r] = vec2(m, rs); }
        }
        let total = subgroupAdd(acc);
        if (lane == 0u && r < rows) { row_sums[r] = total * inv_c; }
    }
    workgroupBarrier();   // row_sums and row_stats are read by every thread below

    // 2. As layernorm_backward.
    backward_channels(blk, row0, rows, lid.x);
}

@compute @workgroup_size(WG)
fn layernorm_param_grads_sg(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u,
                            @builtin(subgroup_id) sid: u32, @builtin(num_subgroups) nsg: u32) {
    let lane = subgroupExclusiveAdd(1u);
    let which = wg.x / lp.C4;   // 0: dweight, 1: dbias
    let c = wg.x % lp.C4;
    var acc = vec4(0.0);
    for (var blk = lid.x; blk < lp.n_blocks; blk += WG) {
        acc += partial[(2u * blk + which) * lp.C4 + c];
    }
    let s = subgroupAdd(acc);
    if (lane == 0u) { red4_sg[sid] = s; }
    workgroupBarrier();
    if (lid.x == 0u) {
        var total = red4_sg[0];
        for (var k = 1u; k < nsg; k++) {
            total += red4_sg[k];
        }
        if (which == 0u) {
            dweight[c] += total;
        } else {
            dbias[c] += total;
        }
    }
}
