// Generation with a KV cache: one new token at a time, every layer attending over its cached rows.
// The cache of a layer is its qkv rows, (Tmax, 3C) f32 laid out [q | k | v] as the training forward writes
// them: a prefill is the ordinary forward over the prompt with qkv bound to the cache. C = NH * HS.
//
// decode_embed:     wte (Vp, C) f32, wpe (Tmax, C) f32 -> xrow (C,) f32 = wte[dp.token] + wpe[dp.pos]
// decode_store:     qkv (3C,) f32 -> cache row dp.pos (of (Tmax, 3C) f32)
// decode_attention: qkv (3C,) f32 (the new token's q), cache_in (Tmax, 3C) f32 (k, v of rows 0..dp.pos)
//                   -> yrow (C,) f32, the heads' outputs merged; scores (NH, Tmax) f32 scratch
//                   y_h = softmax(q_h . k_h[t] / sqrt(HS), t <= pos) @ v_h
// pick_row:         rows (R, C) f32 -> xrow (C,) f32 = rows[dp.pos] (the prompt's last position after a prefill)
//
// decode_attention: one workgroup per head; the scores go through storage (any Tmax fits), sums in a fixed
// order, so runs are bit-identical. The others: one thread per element, WG threads per workgroup.

struct DecodeParams { pos: u32, token: u32, C: u32, NH: u32, Tmax: u32, _p0: u32, _p1: u32, _p2: u32 }

@group(0) @binding(0) var<uniform> dp: DecodeParams;
@group(0) @binding(1) var<storage, read> wte: array<f32>;
@group(0) @binding(2) var<storage, read> wpe: array<f32>;
@group(0) @binding(3) var<storage, read_write> xrow: array<f32>;
@group(0) @binding(4) var<storage, read> qkv: array<f32>;
@group(0) @binding(5) var<storage, read_write> cache: array<f32>;
@group(0) @binding(6) var<storage, read> cache_in: array<f32>;
@group(0) @binding(7) var<storage, read_write> scores: array<f32>;
@group(0) @binding(8) var<storage, read_write> yrow: array<f32>;
@group(0) @binding(9) var<storage, read> rows: array<f32>;

const WG: u32 = 64u;

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn decode_embed(@builtin(global_invocation_id) gid: vec3u) {
    let c = gid.x;
    if (c >= dp.C) { return; }
    xrow[c] = wte[dp.token * dp.C + c] + wpe[dp.pos * dp.C + c];
}

@compute @workgroup_size(WG)
fn decode_store(@builtin(global_invocation_id) gid: vec3u) {
    let i = gid.x;
    if (i >= 3u * dp.C) { return; }
    cache[dp.pos * 3u * dp.C + i] = qkv[i];
}

@compute @workgroup_size(WG)
fn pick_row(@builtin(global_invocation_id) gid: vec3u) {
    let c = gid.x;
    if (c >= dp.C) { return; }
    xrow[c] = rows[dp.pos * dp.C + c];
}

fn wg_max(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
        workgroupBarrier();
    }
    return red[0];
}

fn wg_sum(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] += red[lid + s]; }
        workgroupBarrier();
    }
    return red[0];
}

@compute @workgroup_size(WG)
fn decode_attention(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let h = wg.x;
    let C = dp.C;
    let hs = C / dp.NH;
    let n = dp.pos + 1u;                 // rows 0..pos, the new one included
    let q0 = h * hs;
    let s0 = h * dp.Tmax;
    let scale = inverseSqrt(f32(hs));

    var mx = -3.0e38;
    for (var t = lid.x; t < n; t += WG) {
        let k0 = t * 3u * C + C + h * hs;
        var s = 0.0;
        for (var d = 0u; d < hs; d++) { s = fma(qkv[q0 + d], cache_in[k0 + d], s); }
        s *= scale;
        scores[s0 + t] = s;
        mx = max(mx, s);
    }
    mx = wg_max(mx, lid.x);
    var total = 0.0;
    for (var t = lid.x; t < n; t += WG) {
        let e = exp(scores[s0 + t] - mx);
        scores[s0 + t] = e;
        total += e;
    }
    total = wg_sum(total, lid.x);
    storageBarrier();                    // every thread's exp(scores) visible to the whole workgroup
    let inv = 1.0 / total;
    for (var d = lid.x; d < hs; d += WG) {
        var acc = 0.0;
        for (var t = 0u; t < n; t++) { acc = fma(scores[s0 + t], cache_in[t * 3u * C + 2u * C + h * hs + d], acc); }
        yrow[q0 + d] = acc * inv;
    }
}
