// AdamW with global gradient-norm clipping, all on the GPU: no read-back between the norm and the update.
// The P parameters are one flat f32 vector; params, grads, m and v are bound one chunk at a time (views within
// the storage binding limit), chunk ck covering elements ck.base .. ck.base + ck.n of the whole vector.
//
// grad_norm_partial: grads (n,) f32 of one chunk -> partials[ck.part_base + w] f32: workgroup w's sum of squares
//                    of its WG * PER_THREAD consecutive elements (256 * 16 on GPUs)
// grad_norm_finish:  partials (n_partials,) f32 -> stats: norm = sqrt(sum of all partials), the clip scale
//                    min(1, max_norm / (norm + 1e-6)) (1 when max_norm <= 0), skip = 1 when norm is not finite
//                    (a NaN or inf gradient), skipped += skip, history[t % ring] = norm
// adamw_update:      params, m, v (n,) f32 updated in place from grads (n,) f32 * stats.scale, as
//                    torch.optim.AdamW; decay (ceil(P / 32),) u32 is a bit mask over the whole vector (bit e % 32
//                    of word e / 32 set: element e gets weight decay). Nothing changes when stats.skip is set.
//
// stats (read back by the trainer when it wants): norm f32, scale f32, skip u32, skipped u32 (count of skipped
// updates), history (ring,) f32 (the norm of step t at t % ring; a non-finite entry marks a skipped update).
// Fixed summation orders throughout: the same gradients give bit-identical results.

struct Hyper {
    lr: f32, beta1: f32, beta2: f32, eps: f32,
    weight_decay: f32,
    step_size: f32,      // lr / (1 - beta1^t)
    bc2_sqrt: f32,       // sqrt(1 - beta2^t)
    max_norm: f32,       // clip the global norm to this; <= 0: no clipping
    t: u32, ring: u32, n_partials: u32, _p: u32,
}
struct Chunk { base: u32, n: u32, part_base: u32, _p: u32 }
struct Stats { norm: f32, scale: f32, skip: u32, skipped: u32, history: array<f32> }

@group(0) @binding(0) var<uniform> hp: Hyper;
@group(0) @binding(1) var<uniform> ck: Chunk;
@group(0) @binding(2) var<storage, read> grads: array<f32>;
@group(0) @binding(3) var<storage, read_write> partials: array<f32>;
@group(0) @binding(4) var<storage, read_write> stats: Stats;
@group(0) @binding(5) var<storage, read_write> params: array<f32>;
@group(0) @binding(6) var<storage, read_write> m: array<f32>;
@group(0) @binding(7) var<storage, read_write> v: array<f32>;
@group(0) @binding(8) var<storage, read> decay: array<u32>;

override WG: u32 = 256u;        // threads a workgroup: 256 on GPUs, fewer on CPU drivers (ops/optim.py)
const PER_THREAD: u32 = 16u;   // PART = WG * PER_THREAD elements per partial sum

var<workgroup> red: array<f32, WG>;

fn wg_sum(x: f32, lid: u32) -> f32 {
    red[lid] = x;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] += red[lid + s]; }
        workgroupBarrier();
    }
    return red[0];
}

fn is_finite(x: f32) -> bool {
    // By the bits: compilers may fold x != x away.
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

@compute @workgroup_size(WG)
fn grad_norm_partial(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                     @builtin(local_invocation_id) lid: vec3u) {
    let w = wg.y * nwg.x + wg.x;
    let start = w * WG * PER_THREAD;
    if (start >= ck.n) { return; }
    var s = 0.0;
    for (var q = 0u; q < PER_THREAD; q++) {
        let i = start + q * WG + lid.x;
        if (i < ck.n) {
            let g = grads[i];
            s = fma(g, g, s);
        }
    }
    let total = wg_sum(s, lid.x);
    if (lid.x == 0u) { partials[ck.part_base + w] = total; }
}

@compute @workgroup_size(WG)
fn grad_norm_finish(@builtin(local_invocation_id) lid: vec3u) {
    var s = 0.0;
    for (var i = lid.x; i < hp.n_partials; i += WG) {
        s += partials[i];
    }
    let total = wg_sum(s, lid.x);
    if (lid.x == 0u) {
        let norm = sqrt(total);
        let finite = is_finite(norm);
        var scale = 1.0;
        if (hp.max_norm > 0.0) { scale = min(1.0, hp.max_norm / (norm + 1e-6)); }
        stats.norm = norm;
        stats.scale = scale;
        stats.skip = select(1u, 0u, finite);
        if (!finite) { stats.skipped += 1u; }
        if (hp.ring > 0u) { stats.history[hp.t % hp.ring] = norm; }
    }
}

@compute @workgroup_size(WG)
fn adamw_update(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                @builtin(local_invocation_id) lid: vec3u) {
    let i = (wg.y * nwg.x + wg.x) * WG + lid.x;
    if (i >= ck.n || stats.skip != 0u) { return; }
    let e = ck.base + i;
    let g = grads[i] * stats.scale;
    var p = params[i];
    if (((decay[e / 32u] >> (e % 32u)) & 1u) != 0u) {
        p *= 1.0 - hp.lr * hp.weight_decay;   // decoupled weight decay, before the Adam step (as torch)
    }
    let m1 = hp.beta1 * m[i] + (1.0 - hp.beta1) * g;
    let v1 = hp.beta2 * v[i] + (1.0 - hp.beta2) * g * g;
    m[i] = m1;
    v[i] = v1;
    params[i] = p - hp.step_size * m1 / (sqrt(v1) / hp.bc2_sqrt + hp.eps);
}
