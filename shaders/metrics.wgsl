// Small bookkeeping kernels of the training step, so that nothing is read back between steps.
//
// record_step: loss_acc (1,) f32 (the step's mean loss, accumulated over micro-batches),
//              grad_stats (4,) u32 (AdamW's stats header: norm f32, scale f32, skip u32, skipped u32)
//              -> ring[rp.slot % rp.ring] = (loss, grad norm, skipped 0/1, 0) vec4 f32
//              (the trainer reads the ring back a few steps later, while the GPU already runs ahead)
// top1:        logits (N, Vp) f32, targets (N,) u32 -> correct (N,) u32 = 1 where the first largest of the
//              V real logits of a row is its target (ties: the lowest id, as argmax), else 0
//
// One thread (record_step) or one workgroup per row (top1, grid folded into 2-D).

struct RecordParams { slot: u32, ring: u32, _p0: u32, _p1: u32 }
struct Top1Params { N: u32, V: u32, Vp: u32, _p: u32 }

@group(0) @binding(0) var<uniform> rp: RecordParams;
@group(0) @binding(1) var<storage, read> loss_acc: array<f32>;
@group(0) @binding(2) var<storage, read> grad_stats: array<u32>;
@group(0) @binding(3) var<storage, read_write> ring: array<vec4<f32>>;
@group(0) @binding(4) var<uniform> tp: Top1Params;
@group(0) @binding(5) var<storage, read> logits: array<f32>;
@group(0) @binding(6) var<storage, read> targets: array<u32>;
@group(0) @binding(7) var<storage, read_write> correct: array<u32>;

const WG: u32 = 64u;

var<workgroup> best_val: array<f32, WG>;
var<workgroup> best_id: array<u32, WG>;

@compute @workgroup_size(1)
fn record_step() {
    let norm = bitcast<f32>(grad_stats[0]);
    ring[rp.slot % rp.ring] = vec4(loss_acc[0], norm, f32(grad_stats[2]), 0.0);
}

@compute @workgroup_size(WG)
fn top1(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_id) lid: vec3u) {
    let row = wg.y * nwg.x + wg.x;
    if (row >= tp.N) { return; }
    let base = row * tp.Vp;
    // Each thread scans ids lid, lid + WG, ...: strict > keeps its lowest id among equal values.
    var bv = -3.0e38;
    var bi = 0xffffffffu;
    for (var i = lid.x; i < tp.V; i += WG) {
        let z = logits[base + i];
        if (z > bv) { bv = z; bi = i; }
    }
    best_val[lid.x] = bv;
    best_id[lid.x] = bi;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid.x < s) {
            let ov = best_val[lid.x + s];
            let oi = best_id[lid.x + s];
            if (ov > best_val[lid.x] || (ov == best_val[lid.x] && oi < best_id[lid.x])) {
                best_val[lid.x] = ov;
                best_id[lid.x] = oi;
            }
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        correct[row] = select(0u, 1u, best_id[0] == targets[row]);
    }
}
