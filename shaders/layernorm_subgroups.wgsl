enable subgroups;

// LayerNorm's kernels with subgroup reductions: compiled together with layernorm.wgsl (its bindings, constants,
// the forward's row passes, dnorm_sums and backward_channels), used with subgroups=True or TABGPT_SUBGROUPS=1
// where the device has subgroups (ops/layernorm.py; the trees are the default: on an H200 they were as fast or
// faster). Same results as those kernels up to the order of the row sums.
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
// layernorm_backward_sg:    step 1 a subgroup per pair of rows of the block (both rows' loads in flight together,
//                           one subgroupAdd for both rows' two sums; one barrier in all), step 2 as
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
        if (live) { s = row_sum(&x, base, lane, width); }
        let m = subgroupAdd(s) * inv_c;
        var q = 0.0;
        if (live) { q = row_centred_squares(&x, base, lane, width, m); }
        let rs = inverseSqrt(subgroupAdd(q) * inv_c + EPS);
        if (live) { row_store(&x, row, base, lane, width, m, rs); }
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

    // 1. Per pair of rows r, r + 1, a subgroup: the two means over the channels of both rows (their loads in flight
    //    together), one vec4 subgroupAdd.
    for (var rr = 0u; rr < rows; rr += 2u * nsg) {
        let r = rr + 2u * sid;
        let live0 = r < rows;
        let live1 = r + 1u < rows;
        var st0 = vec2(0.0);   // (mean, rstd) of row r
        var st1 = vec2(0.0);
        if (live0) { st0 = vec2(mean[row0 + r], rstd[row0 + r]); }
        if (live1) { st1 = vec2(mean[row0 + r + 1u], rstd[row0 + r + 1u]); }
        let base0 = (row0 + r) * C4;
        let base1 = base0 + C4;
        var a0 = vec2(0.0);    // row r: (sum of dnorm, sum of dnorm * norm)
        var a1 = vec2(0.0);
        // A loop of KMAX steps, which the compiler unrolls so that the steps' loads are in flight together (the
        // lane stride is known only at run time), then the rest of a long row.
        for (var k = 0u; k < KMAX; k++) {
            let i = lane + k * width;
            if (i < C4) {
                let w = weight[i];
                if (live0) { a0 = dnorm_sums(a0, base0 + i, w, st0); }
                if (live1) { a1 = dnorm_sums(a1, base1 + i, w, st1); }
            }
        }
        for (var i = lane + KMAX * width; i < C4; i += width) {
            let w = weight[i];
            if (live0) { a0 = dnorm_sums(a0, base0 + i, w, st0); }
            if (live1) { a1 = dnorm_sums(a1, base1 + i, w, st1); }
        }
        let total = subgroupAdd(vec4(a0, a1)) * inv_c;
        if (lane == 0u) {
            if (live0) {
                row_stats[r] = st0;
                row_sums[r] = total.xy;
            }
            if (live1) {
                row_stats[r + 1u] = st1;
                row_sums[r + 1u] = total.zw;
            }
        }
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
        acc += partial_in[(2u * blk + which) * lp.C4 + c];
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
