// Causal multi-head self-attention, fused (flash-attention style): the (T, T) attention matrix is never
// stored. Scores are made one tile at a time in workgroup memory, with an online softmax over the key tiles;
// the backward recomputes them from the saved per-row logsumexp.
// HS = head size (a multiple of 4), C = NH * HS, heads are contiguous HS-slices of C, scale = 1 / sqrt(HS).
//
// attention_forward:        qkv (B*T, 3C) f32 [q | k | v]
//                           -> out (B*T, C) f32 (heads merged back),
//                              lse (B, NH, T) f32: logsumexp of each row's scaled scores (for the backward)
// attention_backward_delta: dout (B*T, C) f32, out_in (B*T, C) f32 (the forward's out)
//                           -> delta (B, NH, T) f32 = rowsum(dout * out)
// attention_backward_dq:    qkv, dout, lse_in (the forward's lse), delta_in (delta) -> dqkv[:, 0:C], WRITTEN
// attention_backward_dkv:   qkv, dout, lse_in, delta_in -> dqkv[:, C:3C] (the k and v thirds), WRITTEN
// Backward maths (S the scaled scores): P = exp(S - lse), dP = dO V^T, dS = P * (dP - delta);
// dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO.
//
// A workgroup owns a block of BR = 2 NR rows (queries in forward and dq, keys in dkv) of one head and streams
// tiles of BS = 4 TC rows of the other kind over it. Thread (tr, tc) = (lid / TC, lid % TC), NR x TC threads:
// - scores: rows 2 tr and 2 tr + 1 of the block against streamed rows tc + TC * (0, 1, 2, 3) (a 2 x 4 tile);
// - outputs: the same two rows, vec4 dims d0 = chunk * 2 TC + tc and d1 = d0 + TC of the head (8 floats).
// So one workgroup covers 8 TC dims of the head; heads wider than that are split into DS chunks of dims, one
// workgroup each (the scores are recomputed per chunk), so that small workgroup memories still work.
// Grids: (ceil(T / BR), NH * DS, B); wg.y = h * DS + chunk. Delta: fold_grid(ceil(B*NH*T / 64)).
// Causal masking: a query block visits only key tiles at or before its diagonal, a key block only query tiles
// at or after it; the diagonal tiles are masked per element. Every sum runs in a fixed order (no atomics):
// results are bit-identical run to run.
// Workgroup memory: `tiles` holds rows of HS floats as vec4s, H4P = HS/4 + 1 apart (odd: threads reading
// different rows hit different banks); `mat` holds the score-shaped f32 tiles, rows BS + 1 apart. Their sizes
// SMV and SMS (and TC, NR, DS) are override constants the Python side picks to fit the device.
// Register tiles are named variables, not arrays: dynamically indexed private arrays are slow everywhere.

struct AttnParams { B: u32, T: u32, NH: u32, _pad: u32 }

@group(0) @binding(0) var<uniform> ap: AttnParams;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
@group(0) @binding(4) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> out_in: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> delta: array<f32>;
@group(0) @binding(7) var<storage, read> lse_in: array<f32>;
@group(0) @binding(8) var<storage, read> delta_in: array<f32>;
@group(0) @binding(9) var<storage, read_write> dqkv: array<vec4<f32>>;

override HS: u32 = 64u;      // head size, a multiple of 4
override TC: u32 = 8u;       // threads per row pair; streamed tiles hold BS = 4 TC rows
override NR: u32 = 8u;       // row pairs; the workgroup's block holds BR = 2 NR rows
override DS: u32 = 1u;       // chunks of 8 TC dims per head
override SMV: u32 = 1u;      // vec4s of `tiles`
override SMS: u32 = 1u;      // f32s of `mat`
override H4: u32 = HS / 4u;
override H4P: u32 = H4 + 1u;
override BR: u32 = 2u * NR;
override BS: u32 = 4u * TC;
const NEG: f32 = -1e30;      // below every real score; masked entries are excluded explicitly

var<workgroup> tiles: array<vec4<f32>, SMV>;
var<workgroup> mat: array<f32, SMS>;

fn head_scale() -> f32 {
    return inverseSqrt(f32(HS));
}

// c + a . b, as a chain of scalar FMAs.
fn dot4(a: vec4<f32>, b: vec4<f32>, c: f32) -> f32 {
    return fma(a.w, b.w, fma(a.z, b.z, fma(a.y, b.y, fma(a.x, b.x, c))));
}

// acc + p * v, component-wise scalar FMAs.
fn axpy4(p: f32, v: vec4<f32>, acc: vec4<f32>) -> vec4<f32> {
    return vec4(fma(p, v.x, acc.x), fma(p, v.y, acc.y), fma(p, v.z, acc.z), fma(p, v.w, acc.w));
}

// mat[i + TC * (0, 1, 2, 3)] = v: one row's entries of a thread's score tile.
fn store4(i: u32, v: vec4<f32>) {
    mat[i] = v.x;
    mat[i + TC] = v.y;
    mat[i + 2u * TC] = v.z;
    mat[i + 3u * TC] = v.w;
}

// Copy `rows` rows (tokens t0..) of one third of qkv (part 0: q, 1: k, 2: v), head h, into tiles[dst + r*H4P];
// rows past T are zero.
fn load_qkv(dst: u32, part: u32, b: u32, h: u32, t0: u32, rows: u32, lid: u32) {
    let C4 = ap.NH * H4;
    for (var i = lid; i < rows * H4; i += NR * TC) {
        let r = i / H4;
        let d4 = i % H4;
        let t = t0 + r;
        var v = vec4(0.0);
        if (t < ap.T) { v = qkv[(b * ap.T + t) * 3u * C4 + part * C4 + h * H4 + d4]; }
        tiles[dst + r * H4P + d4] = v;
    }
}

// The same for rows of dout (B*T, C).
fn load_dout(dst: u32, b: u32, h: u32, t0: u32, rows: u32, lid: u32) {
    let C4 = ap.NH * H4;
    for (var i = lid; i < rows * H4; i += NR * TC) {
        let r = i / H4;
        let d4 = i % H4;
        let t = t0 + r;
        var v = vec4(0.0);
        if (t < ap.T) { v = dout[(b * ap.T + t) * C4 + h * H4 + d4]; }
        tiles[dst + r * H4P + d4] = v;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Forward: a workgroup per BR queries. tiles: Q (BR rows) | K (BS) | V (BS). mat: P (BR, BS+1) | Mx (BR, TC).

@compute @workgroup_size(NR * TC)
fn attention_forward(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
    let Q0 = 0u;
    let K0 = BR * H4P;
    let V0 = K0 + BS * H4P;
    let P0 = 0u;
    let MX0 = BR * (BS + 1u);
    let b = wg.z;
    let h = wg.y / DS;
    let q0 = wg.x * BR;
    let tc = lid % TC;
    let ra = 2u * (lid / TC);     // the thread's rows ra, rb of the block
    let rb = ra + 1u;
    let row_a = q0 + ra;
    let row_b = q0 + rb;
    let d0 = (wg.y % DS) * 2u * TC + tc;   // the thread's vec4 dims d0, d1 (clamped e0, e1 for reading)
    let d1 = d0 + TC;
    let e0 = min(d0, H4 - 1u);
    let e1 = min(d1, H4 - 1u);
    let scale = head_scale();

    load_qkv(Q0, 0u, b, h, q0, BR, lid);
    var m_a = NEG;                // running max of each row's scores
    var m_b = NEG;
    var l_a = 0.0;                // running sum of exp(score - m)
    var l_b = 0.0;
    var acc_a0 = vec4(0.0);       // running sum of exp(score - m) * v, rows a, b x dims d0, d1
    var acc_a1 = vec4(0.0);
    var acc_b0 = vec4(0.0);
    var acc_b1 = vec4(0.0);

    let k_end = min(ap.T, q0 + BR);   // later keys are masked for every row of the block
    for (var k0 = 0u; k0 < k_end; k0 += BS) {
        workgroupBarrier();           // the previous tile's K, V, P are no longer read
        load_qkv(K0, 1u, b, h, k0, BS, lid);
        load_qkv(V0, 2u, b, h, k0, BS, lid);
        workgroupBarrier();
        // 1. Scores of rows a, b against keys k0 + tc + TC * (0, 1, 2, 3).
        var s_a = vec4(0.0);
        var s_b = vec4(0.0);
        for (var d4 = 0u; d4 < H4; d4++) {
            let k_0 = tiles[K0 + tc * H4P + d4];
            let k_1 = tiles[K0 + (tc + TC) * H4P + d4];
            let k_2 = tiles[K0 + (tc + 2u * TC) * H4P + d4];
            let k_3 = tiles[K0 + (tc + 3u * TC) * H4P + d4];
            let q_a = tiles[Q0 + ra * H4P + d4];
            let q_b = tiles[Q0 + rb * H4P + d4];
            s_a = vec4(dot4(q_a, k_0, s_a.x), dot4(q_a, k_1, s_a.y), dot4(q_a, k_2, s_a.z), dot4(q_a, k_3, s_a.w));
            s_b = vec4(dot4(q_b, k_0, s_b.x), dot4(q_b, k_1, s_b.y), dot4(q_b, k_2, s_b.z), dot4(q_b, k_3, s_b.w));
        }
        let keys = vec4(k0 + tc) + vec4(0u, TC, 2u * TC, 3u * TC);
        let ok_a = keys <= vec4(row_a);
        let ok_b = keys <= vec4(row_b);
        s_a = select(vec4(NEG), s_a * scale, ok_a);
        s_b = select(vec4(NEG), s_b * scale, ok_b);
        // 2. Row maxima over the TC threads of each row, then probabilities against the new maxima.
        mat[MX0 + ra * TC + tc] = max(max(s_a.x, s_a.y), max(s_a.z, s_a.w));
        mat[MX0 + rb * TC + tc] = max(max(s_b.x, s_b.y), max(s_b.z, s_b.w));
        workgroupBarrier();
        var mn_a = m_a;
        var mn_b = m_b;
        for (var c = 0u; c < TC; c++) {
            mn_a = max(mn_a, mat[MX0 + ra * TC + c]);
            mn_b = max(mn_b, mat[MX0 + rb * TC + c]);
        }
        let alpha_a = exp(m_a - mn_a);
        let alpha_b = exp(m_b - mn_b);
        m_a = mn_a;
        m_b = mn_b;
        l_a *= alpha_a;
        l_b *= alpha_b;
        acc_a0 *= alpha_a;
        acc_a1 *= alpha_a;
        acc_b0 *= alpha_b;
        acc_b1 *= alpha_b;
        store4(P0 + ra * (BS + 1u) + tc, select(vec4(0.0), exp(s_a - mn_a), ok_a));
        store4(P0 + rb * (BS + 1u) + tc, select(vec4(0.0), exp(s_b - mn_b), ok_b));
        workgroupBarrier();
        // 3. acc += P V and l += rowsum(P) over the tile's keys.
        for (var j = 0u; j < BS; j++) {
            let v_0 = tiles[V0 + j * H4P + e0];
            let v_1 = tiles[V0 + j * H4P + e1];
            let pa = mat[P0 + ra * (BS + 1u) + j];
            let pb = mat[P0 + rb * (BS + 1u) + j];
            l_a += pa;
            l_b += pb;
            acc_a0 = axpy4(pa, v_0, acc_a0);
            acc_a1 = axpy4(pa, v_1, acc_a1);
            acc_b0 = axpy4(pb, v_0, acc_b0);
            acc_b1 = axpy4(pb, v_1, acc_b1);
        }
    }
    // l >= 1 for real rows: key 0 is visible to every row.
    let C4 = ap.NH * H4;
    let stats = (b * ap.NH + h) * ap.T;
    let first = wg.y % DS == 0u && tc == 0u;
    if (row_a < ap.T) {
        let o = (b * ap.T + row_a) * C4 + h * H4;
        if (d0 < H4) { out[o + d0] = acc_a0 / l_a; }
        if (d1 < H4) { out[o + d1] = acc_a1 / l_a; }
        if (first) { lse[stats + row_a] = m_a + log(l_a); }
    }
    if (row_b < ap.T) {
        let o = (b * ap.T + row_b) * C4 + h * H4;
        if (d0 < H4) { out[o + d0] = acc_b0 / l_b; }
        if (d1 < H4) { out[o + d1] = acc_b1 / l_b; }
        if (first) { lse[stats + row_b] = m_b + log(l_b); }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Backward.

// One thread per (b, h, t): delta[b, h, t] = dout[b*T + t, h-slice] . out[b*T + t, h-slice].
@compute @workgroup_size(64)
fn attention_backward_delta(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                            @builtin(local_invocation_index) lid: u32) {
    let n = (wg.y * nwg.x + wg.x) * 64u + lid;   // (b * NH + h) * T + t
    if (n >= ap.B * ap.NH * ap.T) { return; }
    let t = n % ap.T;
    let bh = n / ap.T;
    let h = bh % ap.NH;
    let b = bh / ap.NH;
    let base = (b * ap.T + t) * ap.NH * H4 + h * H4;
    var s = 0.0;
    for (var d4 = 0u; d4 < H4; d4++) { s = dot4(dout[base + d4], out_in[base + d4], s); }
    delta[n] = s;
}

// dq: a workgroup per BR queries. tiles: Q (BR) | dO (BR) | K (BS) | V (BS). mat: dS (BR, BS+1).
@compute @workgroup_size(NR * TC)
fn attention_backward_dq(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
    let Q0 = 0u;
    let DO0 = BR * H4P;
    let K0 = DO0 + BR * H4P;
    let V0 = K0 + BS * H4P;
    let b = wg.z;
    let h = wg.y / DS;
    let q0 = wg.x * BR;
    let tc = lid % TC;
    let ra = 2u * (lid / TC);
    let rb = ra + 1u;
    let row_a = q0 + ra;
    let row_b = q0 + rb;
    let d0 = (wg.y % DS) * 2u * TC + tc;
    let d1 = d0 + TC;
    let e0 = min(d0, H4 - 1u);
    let e1 = min(d1, H4 - 1u);
    let scale = head_scale();

    load_qkv(Q0, 0u, b, h, q0, BR, lid);
    load_dout(DO0, b, h, q0, BR, lid);
    // Rows past T read the last row's statistics; they are masked and never written.
    let stats = (b * ap.NH + h) * ap.T;
    let lse_a = lse_in[stats + min(row_a, ap.T - 1u)];
    let lse_b = lse_in[stats + min(row_b, ap.T - 1u)];
    let delta_a = delta_in[stats + min(row_a, ap.T - 1u)];
    let delta_b = delta_in[stats + min(row_b, ap.T - 1u)];
    var acc_a0 = vec4(0.0);
    var acc_a1 = vec4(0.0);
    var acc_b0 = vec4(0.0);
    var acc_b1 = vec4(0.0);

    let k_end = min(ap.T, q0 + BR);
    for (var k0 = 0u; k0 < k_end; k0 += BS) {
        workgroupBarrier();
        load_qkv(K0, 1u, b, h, k0, BS, lid);
        load_qkv(V0, 2u, b, h, k0, BS, lid);
        workgroupBarrier();
        // 1. S = Q K^T and dP = dO V^T for rows a, b against keys k0 + tc + TC * (0..3); dS into mat.
        var s_a = vec4(0.0);
        var s_b = vec4(0.0);
        var dp_a = vec4(0.0);
        var dp_b = vec4(0.0);
        for (var d4 = 0u; d4 < H4; d4++) {
            let k_0 = tiles[K0 + tc * H4P + d4];
            let k_1 = tiles[K0 + (tc + TC) * H4P + d4];
            let k_2 = tiles[K0 + (tc + 2u * TC) * H4P + d4];
            let k_3 = tiles[K0 + (tc + 3u * TC) * H4P + d4];
            let q_a = tiles[Q0 + ra * H4P + d4];
            let q_b = tiles[Q0 + rb * H4P + d4];
            s_a = vec4(dot4(q_a, k_0, s_a.x), dot4(q_a, k_1, s_a.y), dot4(q_a, k_2, s_a.z), dot4(q_a, k_3, s_a.w));
            s_b = vec4(dot4(q_b, k_0, s_b.x), dot4(q_b, k_1, s_b.y), dot4(q_b, k_2, s_b.z), dot4(q_b, k_3, s_b.w));
            let v_0 = tiles[V0 + tc * H4P + d4];
            let v_1 = tiles[V0 + (tc + TC) * H4P + d4];
            let v_2 = tiles[V0 + (tc + 2u * TC) * H4P + d4];
            let v_3 = tiles[V0 + (tc + 3u * TC) * H4P + d4];
            let g_a = tiles[DO0 + ra * H4P + d4];
            let g_b = tiles[DO0 + rb * H4P + d4];
            dp_a = vec4(dot4(g_a, v_0, dp_a.x), dot4(g_a, v_1, dp_a.y), dot4(g_a, v_2, dp_a.z), dot4(g_a, v_3, dp_a.w));
            dp_b = vec4(dot4(g_b, v_0, dp_b.x), dot4(g_b, v_1, dp_b.y), dot4(g_b, v_2, dp_b.z), dot4(g_b, v_3, dp_b.w));
        }
        let keys = vec4(k0 + tc) + vec4(0u, TC, 2u * TC, 3u * TC);
        let p_a = select(vec4(0.0), exp(s_a * scale - lse_a), keys <= vec4(row_a));
        let p_b = select(vec4(0.0), exp(s_b * scale - lse_b), keys <= vec4(row_b));
        store4(ra * (BS + 1u) + tc, p_a * (dp_a - delta_a));
        store4(rb * (BS + 1u) + tc, p_b * (dp_b - delta_b));
        workgroupBarrier();
        // 2. acc += dS K over the tile's keys.
        for (var j = 0u; j < BS; j++) {
            let k_0 = tiles[K0 + j * H4P + e0];
            let k_1 = tiles[K0 + j * H4P + e1];
            let dsa = mat[ra * (BS + 1u) + j];
            let dsb = mat[rb * (BS + 1u) + j];
            acc_a0 = axpy4(dsa, k_0, acc_a0);
            acc_a1 = axpy4(dsa, k_1, acc_a1);
            acc_b0 = axpy4(dsb, k_0, acc_b0);
            acc_b1 = axpy4(dsb, k_1, acc_b1);
        }
    }
    let C4 = ap.NH * H4;
    if (row_a < ap.T) {
        let o = (b * ap.T + row_a) * 3u * C4 + h * H4;
        if (d0 < H4) { dqkv[o + d0] = acc_a0 * scale; }
        if (d1 < H4) { dqkv[o + d1] = acc_a1 * scale; }
    }
    if (row_b < ap.T) {
        let o = (b * ap.T + row_b) * 3u * C4 + h * H4;
        if (d0 < H4) { dqkv[o + d0] = acc_b0 * scale; }
        if (d1 < H4) { dqkv[o + d1] = acc_b1 * scale; }
    }
}

// dk, dv: a workgroup per BR keys; the thread's rows a, b are keys, streamed tiles are BS queries.
// tiles: K (BR) | V (BR) | Q (BS) | dO (BS). mat: P (BR, BS+1) | dS (BR, BS+1) | lse (BS) | delta (BS).
@compute @workgroup_size(NR * TC)
fn attention_backward_dkv(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
    let K0 = 0u;
    let V0 = BR * H4P;
    let Q0 = V0 + BR * H4P;
    let DO0 = Q0 + BS * H4P;
    let P0 = 0u;
    let DS0 = BR * (BS + 1u);
    let L0 = 2u * DS0;
    let D0 = L0 + BS;
    let b = wg.z;
    let h = wg.y / DS;
    let k0 = wg.x * BR;
    let tc = lid % TC;
    let ra = 2u * (lid / TC);
    let rb = ra + 1u;
    let key_a = k0 + ra;
    let key_b = k0 + rb;
    let d0 = (wg.y % DS) * 2u * TC + tc;
    let d1 = d0 + TC;
    let e0 = min(d0, H4 - 1u);
    let e1 = min(d1, H4 - 1u);
    let scale = head_scale();

    load_qkv(K0, 1u, b, h, k0, BR, lid);
    load_qkv(V0, 2u, b, h, k0, BR, lid);
    var dk_a0 = vec4(0.0);
    var dk_a1 = vec4(0.0);
    var dk_b0 = vec4(0.0);
    var dk_b1 = vec4(0.0);
    var dv_a0 = vec4(0.0);
    var dv_a1 = vec4(0.0);
    var dv_b0 = vec4(0.0);
    var dv_b1 = vec4(0.0);

    let stats = (b * ap.NH + h) * ap.T;
    // Query rows before k0 see none of the block's keys: start at the tile holding row k0.
    for (var q0 = (k0 / BS) * BS; q0 < ap.T; q0 += BS) {
        workgroupBarrier();
        load_qkv(Q0, 0u, b, h, q0, BS, lid);
        load_dout(DO0, b, h, q0, BS, lid);
        for (var i = lid; i < BS; i += NR * TC) {
            let t = min(q0 + i, ap.T - 1u);
            mat[L0 + i] = lse_in[stats + t];
            mat[D0 + i] = delta_in[stats + t];
        }
        workgroupBarrier();
        // 1. S^T = K Q^T and dP^T = V dO^T for keys a, b against queries q0 + tc + TC * (0..3); P, dS into mat.
        var s_a = vec4(0.0);
        var s_b = vec4(0.0);
        var dp_a = vec4(0.0);
        var dp_b = vec4(0.0);
        for (var d4 = 0u; d4 < H4; d4++) {
            let q_0 = tiles[Q0 + tc * H4P + d4];
            let q_1 = tiles[Q0 + (tc + TC) * H4P + d4];
            let q_2 = tiles[Q0 + (tc + 2u * TC) * H4P + d4];
            let q_3 = tiles[Q0 + (tc + 3u * TC) * H4P + d4];
            let k_a = tiles[K0 + ra * H4P + d4];
            let k_b = tiles[K0 + rb * H4P + d4];
            s_a = vec4(dot4(k_a, q_0, s_a.x), dot4(k_a, q_1, s_a.y), dot4(k_a, q_2, s_a.z), dot4(k_a, q_3, s_a.w));
            s_b = vec4(dot4(k_b, q_0, s_b.x), dot4(k_b, q_1, s_b.y), dot4(k_b, q_2, s_b.z), dot4(k_b, q_3, s_b.w));
            let g_0 = tiles[DO0 + tc * H4P + d4];
            let g_1 = tiles[DO0 + (tc + TC) * H4P + d4];
            let g_2 = tiles[DO0 + (tc + 2u * TC) * H4P + d4];
            let g_3 = tiles[DO0 + (tc + 3u * TC) * H4P + d4];
            let v_a = tiles[V0 + ra * H4P + d4];
            let v_b = tiles[V0 + rb * H4P + d4];
            dp_a = vec4(dot4(v_a, g_0, dp_a.x), dot4(v_a, g_1, dp_a.y), dot4(v_a, g_2, dp_a.z), dot4(v_a, g_3, dp_a.w));
            dp_b = vec4(dot4(v_b, g_0, dp_b.x), dot4(v_b, g_1, dp_b.y), dot4(v_b, g_2, dp_b.z), dot4(v_b, g_3, dp_b.w));
        }
        let j = vec4(tc) + vec4(0u, TC, 2u * TC, 3u * TC);     // the queries' places in the tile
        let rows = vec4(q0) + j;
        let real = rows < vec4(ap.T);
        let lse4 = vec4(mat[L0 + j.x], mat[L0 + j.y], mat[L0 + j.z], mat[L0 + j.w]);
        let delta4 = vec4(mat[D0 + j.x], mat[D0 + j.y], mat[D0 + j.z], mat[D0 + j.w]);
        let p_a = select(vec4(0.0), exp(s_a * scale - lse4), real & (vec4(key_a) <= rows));
        let p_b = select(vec4(0.0), exp(s_b * scale - lse4), real & (vec4(key_b) <= rows));
        store4(P0 + ra * (BS + 1u) + tc, p_a);
        store4(P0 + rb * (BS + 1u) + tc, p_b);
        store4(DS0 + ra * (BS + 1u) + tc, p_a * (dp_a - delta4));
        store4(DS0 + rb * (BS + 1u) + tc, p_b * (dp_b - delta4));
        workgroupBarrier();
        // 2. dv += P^T dO and dk += dS^T Q over the tile's queries.
        for (var i = 0u; i < BS; i++) {
            let q_0 = tiles[Q0 + i * H4P + e0];
            let q_1 = tiles[Q0 + i * H4P + e1];
            let g_0 = tiles[DO0 + i * H4P + e0];
            let g_1 = tiles[DO0 + i * H4P + e1];
            let pa = mat[P0 + ra * (BS + 1u) + i];
            let pb = mat[P0 + rb * (BS + 1u) + i];
            let dsa = mat[DS0 + ra * (BS + 1u) + i];
            let dsb = mat[DS0 + rb * (BS + 1u) + i];
            dv_a0 = axpy4(pa, g_0, dv_a0);
            dv_a1 = axpy4(pa, g_1, dv_a1);
            dv_b0 = axpy4(pb, g_0, dv_b0);
            dv_b1 = axpy4(pb, g_1, dv_b1);
            dk_a0 = axpy4(dsa, q_0, dk_a0);
            dk_a1 = axpy4(dsa, q_1, dk_a1);
            dk_b0 = axpy4(dsb, q_0, dk_b0);
            dk_b1 = axpy4(dsb, q_1, dk_b1);
        }
    }
    let C4 = ap.NH * H4;
    if (key_a < ap.T) {
        let o = (b * ap.T + key_a) * 3u * C4 + h * H4;
        if (d0 < H4) {
            dqkv[o + C4 + d0] = dk_a0 * scale;
            dqkv[o + 2u * C4 + d0] = dv_a0;
        }
        if (d1 < H4) {
            dqkv[o + C4 + d1] = dk_a1 * scale;
            dqkv[o + 2u * C4 + d1] = dv_a1;
        }
    }
    if (key_b < ap.T) {
        let o = (b * ap.T + key_b) * 3u * C4 + h * H4;
        if (d0 < H4) {
            dqkv[o + C4 + d0] = dk_b0 * scale;
            dqkv[o + 2u * C4 + d0] = dv_b0;
        }
        if (d1 < H4) {
            dqkv[o + C4 + d1] = dk_b1 * scale;
            dqkv[o + 2u * C4 + d1] = dv_b1;
        }
    }
}
