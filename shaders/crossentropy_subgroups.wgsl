enable subgroups;

// The cross-entropy kernels with subgroup reductions: compiled together with crossentropy.wgsl (its bindings and
// helpers), used with subgroups=True or TABGPT_SUBGROUPS=1 where the device has subgroups (ops/crossentropy.py;
// the tree is the default: on an H200 both took the same time). The row's (max, sum of exp) pairs are combined
// within each subgroup by subgroupMax and subgroupAdd, then the subgroups' pairs (8 of them for a 256-thread
// workgroup of 32-lane warps) in subgroup order after one barrier, where the trees of crossentropy.wgsl take
// eight levels of barriers. Same results up to the order of the sums; bit-identical run to run on one device.

fn sg_combine(ms: vec2<f32>, sid: u32, nsg: u32) -> vec2<f32> {
    let m = subgroupMax(ms.x);
    let s = subgroupAdd(ms.y * exp(ms.x - m));
    // The subgroup's first lane writes (subgroupElect would do; naga does not know it).
    if (subgroupExclusiveAdd(1u) == 0u) { red[sid] = vec2(m, s); }
    workgroupBarrier();
    var total = red[0];
    for (var k = 1u; k < nsg; k++) {
        total = combine(total, red[k]);
    }
    return total;
}

@compute @workgroup_size(WG)
fn crossentropy_forward_sg(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                           @builtin(local_invocation_id) lid: vec3u,
                           @builtin(subgroup_id) sid: u32, @builtin(num_subgroups) nsg: u32) {
    let row = row_index(wg, nwg);
    if (row >= cp.N) { return; }
    let base = row * cp.Vp4;
    store_loss(row, base, sg_combine(logits_pair(base, lid.x), sid, nsg), lid.x);
}

@compute @workgroup_size(WG)
fn crossentropy_forward_backward_sg(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                                    @builtin(local_invocation_id) lid: vec3u,
                                    @builtin(subgroup_id) sid: u32, @builtin(num_subgroups) nsg: u32) {
    let row = row_index(wg, nwg);
    if (row >= cp.N) { return; }
    let base = row * cp.Vp4;
    let t = min(targets[row], cp.V - 1u);
    let x_target = dlogits[base + t / 4u][t % 4u];   // before the row is overwritten
    let total = sg_combine(dlogits_pair(base, lid.x), sid, nsg);
    store_loss_and_grad(row, base, t, x_target, total, lid.x);
}
