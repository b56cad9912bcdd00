// Softmax + cross-entropy over the real vocabulary V of each row of logits (N, Vp), fused with its gradient.
// Vp (the padded vocabulary) is a multiple of 4 and rows are read as vec4 (Vp4 = Vp / 4); columns V..Vp are
// padding: they take no part in the softmax and get a zero gradient.
//
// crossentropy_forward:          logits (N, Vp) f32, targets (N,) u32 -> losses (N,) f32
// crossentropy_forward_backward: dlogits (N, Vp) f32 holds the logits on entry and is overwritten with
//                                  (softmax - onehot(target)) * grad_scale in columns < V, 0 in V..Vp;
//                                targets (N,) u32 -> losses (N,) f32
// loss_mean:                     losses (n,) f32 -> loss (1,) f32: loss[0] = scale * sum(losses),
//                                or loss[0] += scale * sum(losses) when accumulate != 0
//
// losses[row] = logsumexp(logits[row, :V]) - logits[row, target]. One workgroup per row (grid folded into
// 2-D): each thread keeps a running (max, sum of exp) over its columns, one read of the row, then a fixed-order
// tree combines the threads' pairs (deterministic). crossentropy_subgroups.wgsl has the same kernels with the pairs
// combined by subgroup operations instead of the tree.

struct CEParams { N: u32, V: u32, Vp4: u32, grad_scale: f32 }
struct MeanParams { n: u32, accumulate: u32, scale: f32, _p: u32 }

@group(0) @binding(0) var<uniform> cp: CEParams;
@group(0) @binding(1) var<storage, read> logits: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dlogits: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> targets: array<u32>;
@group(0) @binding(4) var<storage, read_write> losses: array<f32>;
@group(0) @binding(5) var<uniform> mp: MeanParams;
@group(0) @binding(6) var<storage, read_write> loss: array<f32>;

override WG: u32 = 256u;        // threads a row (a power of two); fewer on CPU drivers (ops/crossentropy.py)
const NEG_BIG: f32 = -3.0e38;   // a finite "minus infinity": exp(NEG_BIG - m) is 0, never NaN

var<workgroup> red: array<vec2<f32>, WG>;

// A pair (m, s) stands for sum_j exp(x_j) = s * exp(m), with m the largest x_j seen so far. Four columns at a
// time, from column v0, without branches (lanes of a GPU do not diverge); columns at V or beyond are padding.
fn online4(ms: vec2<f32>, x4: vec4<f32>, v0: u32) -> vec2<f32> {
    let x = select(x4, vec4(NEG_BIG), vec4(v0) + vec4(0u, 1u, 2u, 3u) >= vec4(cp.V));
    let m = max(ms.x, max(max(x.x, x.y), max(x.z, x.w)));
    let e = exp(x - m);
    return vec2(m, ms.y * exp(ms.x - m) + ((e.x + e.y) + (e.z + e.w)));
}

fn combine(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    return vec2(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

// Combine every thread's pair in a fixed tree order; every thread gets the row's (max, sum).
fn wg_combine(ms: vec2<f32>, lid: u32) -> vec2<f32> {
    red[lid] = ms;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] = combine(red[lid], red[lid + s]); }
        workgroupBarrier();
    }
    return red[0];
}

fn row_index(wg: vec3u, nwg: vec3u) -> u32 {
    return wg.y * nwg.x + wg.x;
}

// Each thread's running pair over its columns of the row at base (in logits, or in dlogits for the fused kernel).
// Two running pairs per thread, so that two loads are in flight.
fn logits_pair(base: u32, lid: u32) -> vec2<f32> {
    let n4 = (cp.V + 3u) / 4u;
    var ms0 = vec2(NEG_BIG, 0.0);
    var ms1 = vec2(NEG_BIG, 0.0);
    var i = lid;
    for (; i + WG < n4; i += 2u * WG) {
        ms0 = online4(ms0, logits[base + i], 4u * i);
        ms1 = online4(ms1, logits[base + i + WG], 4u * (i + WG));
    }
    if (i < n4) { ms0 = online4(ms0, logits[base + i], 4u * i); }
    return combine(ms0, ms1);
}

fn dlogits_pair(base: u32, lid: u32) -> vec2<f32> {
    let n4 = (cp.V + 3u) / 4u;
    var ms0 = vec2(NEG_BIG, 0.0);
    var ms1 = vec2(NEG_BIG, 0.0);
    var i = lid;
    for (; i + WG < n4; i += 2u * WG) {
        ms0 = online4(ms0, dlogits[base + i], 4u * i);
        ms1 = online4(ms1, dlogits[base + i + WG], 4u * (i + WG));
    }
    if (i < n4) { ms0 = online4(ms0, dlogits[base + i], 4u * i); }
    return combine(ms0, ms1);
}

// The loss of the row at base from its (max, sum): thread 0 writes it.
fn store_loss(row: u32, base: u32, total: vec2<f32>, lid: u32) {
    if (lid == 0u) {
        let t = min(targets[row], cp.V - 1u);
        losses[row] = log(total.y) + total.x - logits[base + t / 4u][t % 4u];
    }
}

// The fused kernel's outputs: the loss (x_target: the target's logit, read before the row was overwritten) and
// dlogits over the logits.
fn store_loss_and_grad(row: u32, base: u32, t: u32, x_target: f32, total: vec2<f32>, lid: u32) {
    if (lid == 0u) {
        losses[row] = log(total.y) + total.x - x_target;
    }
    let inv_sum = 1.0 / total.y;
    for (var i = lid; i < cp.Vp4; i += WG) {
        let v = vec4(4u * i) + vec4(0u, 1u, 2u, 3u);    // the four columns
        let p = exp(dlogits[base + i] - total.x) * inv_sum;
        let d = (p - select(vec4(0.0), vec4(1.0), v == vec4(t))) * cp.grad_scale;
        dlogits[base + i] = select(d, vec4(0.0), v >= vec4(cp.V));
    }
}

@compute @workgroup_size(WG)
fn crossentropy_forward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                        @builtin(local_invocation_id) lid: vec3u) {
    let row = row_index(wg, nwg);
    if (row >= cp.N) { return; }
    let base = row * cp.Vp4;
    store_loss(row, base, wg_combine(logits_pair(base, lid.x), lid.x), lid.x);
}

@compute @workgroup_size(WG)
fn crossentropy_forward_backward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                                 @builtin(local_invocation_id) lid: vec3u) {
    let row = row_index(wg, nwg);
    if (row >= cp.N) { return; }
    let base = row * cp.Vp4;
    let t = min(targets[row], cp.V - 1u);
    // Read the target's logit now: after the barrier below the row is being overwritten.
    let x_target = dlogits[base + t / 4u][t % 4u];
    let total = wg_combine(dlogits_pair(base, lid.x), lid.x);
    store_loss_and_grad(row, base, t, x_target, total, lid.x);
}

// One workgroup: the mean (or any scaled sum) of the per-row losses, in a fixed order.
@compute @workgroup_size(WG)
fn loss_mean(@builtin(local_invocation_id) lid: vec3u) {
    var s = 0.0;
    for (var i = lid.x; i < mp.n; i += WG) {
        s += losses[i];
    }
    red[lid.x] = vec2(s, 0.0);
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lid.x < stride) { red[lid.x] += red[lid.x + stride]; }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        let v = red[0].x * mp.scale;
        if (mp.accumulate != 0u) {
            loss[0] += v;
        } else {
            loss[0] = v;
        }
    }
}
