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
// attention_backward_dq_ds: where the (B, NH, T, T) dS fits a binding, dkv (STORE_DS) also writes each dS tile it
//                           makes to ds_out, and this kernel forms dQ = scale dS K from it (ds_in, qkv) instead of
//                           attention_backward_dq recomputing S, P, dP and dS: one product where dq makes four.
// Backward maths (S the scaled scores): P = exp(S - lse), dP = dO V^T, dS = P * (dP - delta);
// dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO.
//
// A workgroup owns a block of BR = RPT NR rows (queries in forward and dq, keys in dkv) of one head and streams
// tiles of BS = 4 TC rows of the other kind over it. Thread (tr, tc) = (lid / TC, lid % TC), NR x TC threads:
// - scores: rows RPT tr .. RPT tr + RPT - 1 of the block (RPT = 2 or 4 rows per thread) against streamed rows
//   tc + TC * (0, 1, 2, 3) (a 2 x 4 or 4 x 4 tile; 4 rows reuse each streamed vec4 read twice as often);
// - outputs: the same rows, vec4 dims d0 = chunk * 2 TC + tc and d1 = d0 + TC of the head (8 floats).
// So one workgroup covers 8 TC dims of the head; heads wider than that are split into DS chunks of dims, one
// workgroup each (the scores are recomputed per chunk), so that small workgroup memories still work.
// Grids: (ceil(T / BR), NH * DS, B); wg.y = h * DS + chunk. Delta: fold_grid(ceil(B*NH*T / 64)).
// Causal masking: a query block visits only key tiles at or before its diagonal, a key block only query tiles
// at or after it; the diagonal tiles are masked per element. Every sum runs in a fixed order (no atomics):
// results are bit-identical run to run.
// Workgroup memory: `tiles` holds rows of HS floats as vec4s, H4P = HS/4 + 1 apart (odd: threads reading
// different rows hit different banks); `pt` holds the score-shaped tiles (P, dS: BR block rows x BS streamed rows)
// in pairs of streamed rows: pair jp = j / 2 is a row of PW4 vec4s, in which thread group g (lid / TC, block rows
// RPT g ..) has 2 RPT consecutive floats: its rows' entries for streamed row 2 jp, then for 2 jp + 1 (put_col,
// get_pair). So a thread reads its rows of two streamed rows with one vec4 read (two with RPT = 4) where a
// row-major tile needs 2 RPT scalar reads; the 16 floats of padding per pair row keep the scalar stores of
// RPT = 2 to two-way bank conflicts. `mat` holds f32s: the forward's row maxima, dkv's lse and delta. Their sizes
// SMV, SMP and SMS (and TC, NR, DS) are override constants the Python side picks to fit the device.
// Register tiles are named variables, not arrays: dynamically indexed private arrays are slow everywhere.
// PIPELINE (default false): the inner loops (over a tile's dims d4 for scores, over its rows j / i for the
// accumulations) read the values of step n + 1 from `tiles` and `pt` into registers (the f_* variables) during
// step n's FMAs: software pipelining, as in matmul.wgsl (the reads' latency hides behind the arithmetic; 10%
// for the matmul on an H100, but 27-43% slower for these kernels there: more registers). PIPELINE = false, the
// default, reads them at the top of each step (its step-0 reads before each loop are dead code, overwritten
// before use). Same FMAs in the
// same order either way: the results are bit-identical.
// PREFETCH (the Python side turns it on where a tile allows): register prefetch of the streamed tiles, as
// matmul.wgsl's PREFETCH. Each thread's share of a streamed tile is PF_N = ceil(BS H4 / (NR TC)) vec4s per
// streamed matrix (K and V in forward and dq, Q and dO in dkv; vec4s lid + s NR TC of the tile, s < PF_N, the
// ones load_qkv / load_dout give it) and, in
// dkv, PF_S = ceil(BS / (NR TC)) lse/delta pairs. They are read from global memory into named registers
// (p*0..p*3, never an indexed array) right after the barrier that starts a tile's arithmetic, for the NEXT
// tile, so the loads are in flight during this tile's products; the next iteration stores them into `tiles`
// (and `mat`) after its first barrier, where the plain kernels call load_qkv / load_dout. At most 4 of each
// per thread (PF_N <= 4: NR >= H4); beyond that PREFETCH is ignored (PF false; the Python side then passes
// false). The same values land in the same places: the results are bit-identical to PREFETCH = false.

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
@group(0) @binding(10) var<storage, read_write> ds_out: array<f32>;   // dkv, STORE_DS: dS (B, NH, T keys, T queries)
@group(0) @binding(11) var<storage, read> ds_in: array<f32>;          // attention_backward_dq_ds: the same
@group(0) @binding(12) var<storage, read> ds_in4: array<vec4<f32>>;   //   the same buffer as vec4s (DS_VEC4)

override HS: u32 = 64u;      // head size, a multiple of 4
override TC: u32 = 8u;       // threads per row pair; streamed tiles hold BS = 4 TC rows
override NR: u32 = 8u;       // threads per streamed-row slot; the workgroup's block holds BR = RPT NR rows
override RPT: u32 = 2u;      // rows per thread, 2 or 4
override DS: u32 = 1u;       // chunks of 8 TC dims per head
override SMV: u32 = 1u;      // vec4s of `tiles`
override SMS: u32 = 1u;      // f32s of `mat`
override SMP: u32 = 1u;      // vec4s of `pt`
override PIPELINE: bool = false;  // inner loops read their next step's values during the current step's FMAs
override PREFETCH: bool = false;  // the next streamed tile is read into registers during the current one
override HEAVY_FIRST: bool = false;  // row blocks launched heaviest first across all heads (block_order)
override HEAVY_GROUP: u32 = 0u;      // HEAVY_FIRST within groups of this many heads (0: all)
override H4: u32 = HS / 4u;
override H4P: u32 = H4 + 1u;
override BR: u32 = RPT * NR;
override BS: u32 = 4u * TC;
override PW4: u32 = BR / 2u + 4u;                     // vec4s per pair row of `pt`: 2 BR floats + 16 of padding
override NT: u32 = NR * TC;                          // threads
override PF_N: u32 = (BS * H4 + NT - 1u) / NT;       // PREFETCH: vec4s per thread of each streamed matrix
override PF_S: u32 = (BS + NT - 1u) / NT;            // PREFETCH: lse/delta pairs per thread (dkv), <= 4
override PF: bool = PREFETCH && PF_N <= 4u;          // PREFETCH in effect
override STORE_DS: bool = false;  // dkv also writes each tile's dS to ds_out, for attention_backward_dq_ds
override QB: u32 = 64u;           // attention_backward_dq_ds: queries per workgroup
override RQ: u32 = 4u;            //   query rows per thread (4 or 8): (QB / RQ) x H4 threads
override KS: u32 = 16u;           //   keys per staged step
override DQ_PREFETCH: bool = false;  //   the next staged keys read into registers during the current ones
override DS_VEC4: bool = false;   //   T % 4 == 0: dS read as aligned vec4s (ds_in4)
override DQ_NK: u32 = (KS * H4 + (QB / RQ) * H4 - 1u) / ((QB / RQ) * H4);         // DQ_PREFETCH: K vec4s a thread
override DQ_ND: u32 = (KS * (QB / 4u) + (QB / RQ) * H4 - 1u) / ((QB / RQ) * H4);  //   and dS vec4s a thread stages
override DQ_PF: bool = DQ_PREFETCH && DQ_NK <= 2u && DQ_ND <= 2u;                  // DQ_PREFETCH in effect
const NEG: f32 = -1e30;      // below every real score; masked entries are excluded explicitly

var<workgroup> tiles: array<vec4<f32>, SMV>;
var<workgroup> mat: array<f32, SMS>;
var<workgroup> pt: array<vec4<f32>, SMP>;

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

// A thread's output accumulators: rows a, b (c, d where RPT = 4) x its two vec4s of dims d0 (a0, ..) and d1.
struct Acc { a0: vec4<f32>, a1: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>,
             c0: vec4<f32>, c1: vec4<f32>, d0: vec4<f32>, d1: vec4<f32> }

// acc + p v for one streamed row: p its weights for the thread's rows a..d, v0 and v1 its dims d0 and d1.
fn acc_key(acc: Acc, p: vec4<f32>, v0: vec4<f32>, v1: vec4<f32>) -> Acc {
    var r = acc;
    r.a0 = axpy4(p.x, v0, r.a0);
    r.a1 = axpy4(p.x, v1, r.a1);
    r.b0 = axpy4(p.y, v0, r.b0);
    r.b1 = axpy4(p.y, v1, r.b1);
    if (RPT == 4u) {
        r.c0 = axpy4(p.z, v0, r.c0);
        r.c1 = axpy4(p.z, v1, r.c1);
        r.d0 = axpy4(p.w, v0, r.d0);
        r.d1 = axpy4(p.w, v1, r.d1);
    }
    return r;
}

// acc with row a's accumulators times s.x, b's s.y, c's s.z, d's s.w.
fn acc_scale(acc: Acc, s: vec4<f32>) -> Acc {
    return Acc(acc.a0 * s.x, acc.a1 * s.x, acc.b0 * s.y, acc.b1 * s.y,
               acc.c0 * s.z, acc.c1 * s.z, acc.d0 * s.w, acc.d1 * s.w);
}

// `pt` (header): thread group g's entries of streamed row j in the tile at vec4 m4 are the RPT floats from
// vec4 pair_at(m4, g, j), component 2 (j & 1) (RPT = 2) or the whole vec4 after it (RPT = 4: + (j & 1)).
fn pair_at(m4: u32, g: u32, j: u32) -> u32 {
    return m4 + (j >> 1u) * PW4 + (RPT / 2u) * g;
}

// x (a thread group's rows a..d of a streamed row j) at vec4 i = pair_at(.., j) of `pt`, odd = j & 1.
fn put_col(i: u32, odd: u32, x: vec4<f32>) {
    if (RPT == 4u) {
        pt[i + odd] = x;
    } else {
        pt[i][2u * odd] = x.x;
        pt[i][2u * odd + 1u] = x.y;
    }
}

// A thread's score-shaped tile (its rows a..d x_a..x_d, streamed rows tc + TC (0, 1, 2, 3)) into the tile at m4.
// With TC even (all but TC = 1) the four streamed rows share their parity and lie TC / 2 pair rows apart: one
// index for all four, stepped by a constant.
fn put_tile(m4: u32, g: u32, tc: u32, x_a: vec4<f32>, x_b: vec4<f32>, x_c: vec4<f32>, x_d: vec4<f32>) {
    let x0 = vec4(x_a.x, x_b.x, x_c.x, x_d.x);
    let x1 = vec4(x_a.y, x_b.y, x_c.y, x_d.y);
    let x2 = vec4(x_a.z, x_b.z, x_c.z, x_d.z);
    let x3 = vec4(x_a.w, x_b.w, x_c.w, x_d.w);
    if (TC % 2u == 0u) {
        let i = pair_at(m4, g, tc);
        let odd = tc & 1u;
        let step = (TC / 2u) * PW4;
        put_col(i, odd, x0);
        put_col(i + step, odd, x1);
        put_col(i + 2u * step, odd, x2);
        put_col(i + 3u * step, odd, x3);
    } else {
        put_col(pair_at(m4, g, tc), tc & 1u, x0);
        put_col(pair_at(m4, g, tc + TC), (tc + TC) & 1u, x1);
        put_col(pair_at(m4, g, tc + 2u * TC), (tc + 2u * TC) & 1u, x2);
        put_col(pair_at(m4, g, tc + 3u * TC), (tc + 3u * TC) & 1u, x3);
    }
}

// The thread group's rows a..d of streamed rows 2 jp (j0) and 2 jp + 1 (j1) of the tile at m4 (zeros past RPT).
struct Pair { j0: vec4<f32>, j1: vec4<f32> }

fn get_pair(m4: u32, g: u32, jp: u32) -> Pair {
    let i = pair_at(m4, g, 2u * jp);
    let u = pt[i];
    if (RPT == 4u) {
        return Pair(u, pt[i + 1u]);
    }
    return Pair(vec4(u.xy, 0.0, 0.0), vec4(u.zw, 0.0, 0.0));
}

// A thread's accumulators and its rows' running sums of the weights.
struct AccL { acc: Acc, l: vec4<f32> }

// s.acc + W X and s.l + rowsum(W) over a tile's BS streamed rows, two at a time: W the score-shaped tile at vec4 m4
// of `pt` (thread group g's rows: one vec4 of W holds them for both streamed rows, two with RPT = 4), X the tile's
// rows at x0 of `tiles` (the thread's dims e0, e1). f_*: streamed rows j, j + 1's values, read during the previous
// pair's fmas (PIPELINE) or at the top of the step (the step-0 reads before the loop then dead code).
fn acc_tile(s: AccL, m4: u32, g: u32, x0: u32, e0: u32, e1: u32) -> AccL {
    var r = s;
    var f_w = get_pair(m4, g, 0u);
    var f_x00 = tiles[x0 + e0];
    var f_x01 = tiles[x0 + e1];
    var f_x10 = tiles[x0 + H4P + e0];
    var f_x11 = tiles[x0 + H4P + e1];
    for (var jp = 0u; jp < BS / 2u; jp++) {
        if (!PIPELINE) {
            let j = 2u * jp;
            f_w = get_pair(m4, g, jp);
            f_x00 = tiles[x0 + j * H4P + e0];
            f_x01 = tiles[x0 + j * H4P + e1];
            f_x10 = tiles[x0 + (j + 1u) * H4P + e0];
            f_x11 = tiles[x0 + (j + 1u) * H4P + e1];
        }
        let w = f_w;
        let x00 = f_x00;
        let x01 = f_x01;
        let x10 = f_x10;
        let x11 = f_x11;
        if (PIPELINE && jp + 1u < BS / 2u) {
            let n = 2u * jp + 2u;
            f_w = get_pair(m4, g, jp + 1u);
            f_x00 = tiles[x0 + n * H4P + e0];
            f_x01 = tiles[x0 + n * H4P + e1];
            f_x10 = tiles[x0 + (n + 1u) * H4P + e0];
            f_x11 = tiles[x0 + (n + 1u) * H4P + e1];
        }
        r.l += w.j0;
        r.acc = acc_key(r.acc, w.j0, x00, x01);
        r.l += w.j1;
        r.acc = acc_key(r.acc, w.j1, x10, x11);
    }
    return r;
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

// PREFETCH: vec4 i (row i / H4, dims i % H4) of the streamed tile of rows t0.. of one third of qkv: what
// load_qkv stores at tiles[dst + (i / H4) * H4P + i % H4]. Zeros for rows past T (and nothing read for i past
// the tile: a thread's last vec4 may lie there when threads do not divide the tile).
fn fetch_qkv(part: u32, b: u32, h: u32, t0: u32, i: u32) -> vec4<f32> {
    let C4 = ap.NH * H4;
    let t = t0 + i / H4;
    var v = vec4(0.0);
    if (i < BS * H4 && t < ap.T) { v = qkv[(b * ap.T + t) * 3u * C4 + part * C4 + h * H4 + i % H4]; }
    return v;
}

// The same for dout.
fn fetch_dout(b: u32, h: u32, t0: u32, i: u32) -> vec4<f32> {
    let C4 = ap.NH * H4;
    let t = t0 + i / H4;
    var v = vec4(0.0);
    if (i < BS * H4 && t < ap.T) { v = dout[(b * ap.T + t) * C4 + h * H4 + i % H4]; }
    return v;
}

// A thread's PF_N prefetch registers (its vec4s lid + s NT of the tile) into tiles[dst..]. Registers pass by
// value: every index stays constant.
fn put_share(dst: u32, lid: u32, p0: vec4<f32>, p1: vec4<f32>, p2: vec4<f32>, p3: vec4<f32>) {
    put_vec(dst, lid, p0);
    if (PF_N > 1u) { put_vec(dst, lid + NT, p1); }
    if (PF_N > 2u) { put_vec(dst, lid + 2u * NT, p2); }
    if (PF_N > 3u) { put_vec(dst, lid + 3u * NT, p3); }
}

fn put_vec(dst: u32, i: u32, v: vec4<f32>) {
    if (i < BS * H4) { tiles[dst + (i / H4) * H4P + i % H4] = v; }
}

// ---------------------------------------------------------------------------------------------------------
// Forward: a workgroup per BR queries. tiles: Q (BR rows) | K (BS) | V (BS). pt: P. mat: Mx (BR, TC).
// RPT = 4 adds rows c, d to the thread's rows a, b (every `if (RPT == 4u)` below is decided at compile time).

// s + one vec4 of dims of the scores of row q against the 4 streamed rows k_0..k_3, as scalar FMA chains.
fn qk4(s: vec4<f32>, q: vec4<f32>, k_0: vec4<f32>, k_1: vec4<f32>, k_2: vec4<f32>, k_3: vec4<f32>) -> vec4<f32> {
    return vec4(dot4(q, k_0, s.x), dot4(q, k_1, s.y), dot4(q, k_2, s.z), dot4(q, k_3, s.w));
}

fn max4(s: vec4<f32>) -> f32 {
    return max(max(s.x, s.y), max(s.z, s.w));
}

// The workgroup's (block, y, z) in a grid (blocks, y, z). Causal blocks differ in work (a query block's keys grow
// with its index, a key block's queries shrink), and a GPU starts workgroups in the order of their linear index
// (x fastest): launched as they are numbered, every head's heaviest block comes among the last. HEAVY_FIRST maps
// the linear index so that the blocks' index is the slowest and the heaviest blocks of every head start first,
// the lightest last (longest job first: the last wave holds the shortest). heavy_high: the heavy blocks are the
// high indices. HEAVY_GROUP > 0 does so within groups of that many (y, z) pairs (heads), one group after the
// other, so that the heads in flight at once, whose K and V the GPU's cache holds, stay that many. Which
// workgroup computes what changes, not what is computed: the results are bit-identical.
fn block_order(wg: vec3u, nwg: vec3u, heavy_high: bool) -> vec3u {
    if (!HEAVY_FIRST) {
        return wg;
    }
    let pairs = nwg.y * nwg.z;
    let lin = wg.x + nwg.x * (wg.y + nwg.y * wg.z);
    let size = select(pairs, min(HEAVY_GROUP, pairs), HEAVY_GROUP > 0u);   // pairs per group
    let group = lin / (nwg.x * size);
    let first = group * size;                  // the group's first pair
    let n = min(size, pairs - first);          // its pairs (the last group may have fewer)
    let within = lin - first * nwg.x;
    let i = within / n;
    let r = first + within % n;
    return vec3u(select(i, nwg.x - 1u - i, heavy_high), r % nwg.y, r / nwg.y);
}

@compute @workgroup_size(NR * TC)
fn attention_forward(@builtin(workgroup_id) wg_id: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
    let wg = block_order(wg_id, nwg, true);
    let Q0 = 0u;
    let K0 = BR * H4P;
    let V0 = K0 + BS * H4P;
    let b = wg.z;
    let h = wg.y / DS;
    let q0 = wg.x * BR;
    let tc = lid % TC;
    let g = lid / TC;             // the thread's group: rows ra, rb (rc, rd) of the block
    let ra = RPT * g;
    let rb = ra + 1u;
    let rc = ra + 2u;
    let rd = ra + 3u;
    let row = vec4(q0 + ra) + vec4(0u, 1u, 2u, 3u);
    let d0 = (wg.y % DS) * 2u * TC + tc;   // the thread's vec4 dims d0, d1 (clamped e0, e1 for reading)
    let d1 = d0 + TC;
    let e0 = min(d0, H4 - 1u);
    let e1 = min(d1, H4 - 1u);
    let scale = head_scale();

    load_qkv(Q0, 0u, b, h, q0, BR, lid);
    var m = vec4(NEG);            // running max of each row's scores (rows a, b, c, d)
    var l = vec4(0.0);            // running sum of exp(score - m)
    var acc = Acc();              // running sum of exp(score - m) * v, rows a..d x dims d0, d1

    let k_end = min(ap.T, q0 + BR);   // later keys are masked for every row of the block
    // PREFETCH: the thread's share of the next K and V tiles (PF_N vec4s of each), read one tile ahead.
    var pk0 = vec4(0.0);
    var pk1 = vec4(0.0);
    var pk2 = vec4(0.0);
    var pk3 = vec4(0.0);
    var pv0 = vec4(0.0);
    var pv1 = vec4(0.0);
    var pv2 = vec4(0.0);
    var pv3 = vec4(0.0);
    if (PF && 0u < k_end) {
        pk0 = fetch_qkv(1u, b, h, 0u, lid);
        pv0 = fetch_qkv(2u, b, h, 0u, lid);
        if (PF_N > 1u) {
            pk1 = fetch_qkv(1u, b, h, 0u, lid + NT);
            pv1 = fetch_qkv(2u, b, h, 0u, lid + NT);
        }
        if (PF_N > 2u) {
            pk2 = fetch_qkv(1u, b, h, 0u, lid + 2u * NT);
            pv2 = fetch_qkv(2u, b, h, 0u, lid + 2u * NT);
        }
        if (PF_N > 3u) {
            pk3 = fetch_qkv(1u, b, h, 0u, lid + 3u * NT);
            pv3 = fetch_qkv(2u, b, h, 0u, lid + 3u * NT);
        }
    }
    for (var k0 = 0u; k0 < k_end; k0 += BS) {
        workgroupBarrier();           // the previous tile's K, V, P are no longer read
        if (PF) {
            put_share(K0, lid, pk0, pk1, pk2, pk3);
            put_share(V0, lid, pv0, pv1, pv2, pv3);
        } else {
            load_qkv(K0, 1u, b, h, k0, BS, lid);
            load_qkv(V0, 2u, b, h, k0, BS, lid);
        }
        workgroupBarrier();
        // PREFETCH: the next tile's loads are in flight while this one is worked on. After the last tile they
        // are made too (rows past T read zeros) and never used: a guard would give the registers a phi with
        // their old values, which NVIDIA's compiler resolves with copies that wait for the loads (as in
        // matmul.wgsl; 2-5% faster on an H100 without it).
        let kn = k0 + BS;
        if (PF) {
            pk0 = fetch_qkv(1u, b, h, kn, lid);
            pv0 = fetch_qkv(2u, b, h, kn, lid);
            if (PF_N > 1u) {
                pk1 = fetch_qkv(1u, b, h, kn, lid + NT);
                pv1 = fetch_qkv(2u, b, h, kn, lid + NT);
            }
            if (PF_N > 2u) {
                pk2 = fetch_qkv(1u, b, h, kn, lid + 2u * NT);
                pv2 = fetch_qkv(2u, b, h, kn, lid + 2u * NT);
            }
            if (PF_N > 3u) {
                pk3 = fetch_qkv(1u, b, h, kn, lid + 3u * NT);
                pv3 = fetch_qkv(2u, b, h, kn, lid + 3u * NT);
            }
        }
        // 1. Scores of the thread's rows against keys k0 + tc + TC * (0, 1, 2, 3).
        var s_a = vec4(0.0);
        var s_b = vec4(0.0);
        var s_c = vec4(0.0);
        var s_d = vec4(0.0);
        // f_*: the values of dims d4, read during d4 - 1's products (PIPELINE) or at the top of step d4.
        var f_k_0 = tiles[K0 + tc * H4P];
        var f_k_1 = tiles[K0 + (tc + TC) * H4P];
        var f_k_2 = tiles[K0 + (tc + 2u * TC) * H4P];
        var f_k_3 = tiles[K0 + (tc + 3u * TC) * H4P];
        var f_q_a = tiles[Q0 + ra * H4P];
        var f_q_b = tiles[Q0 + rb * H4P];
        var f_q_c = vec4(0.0);
        var f_q_d = vec4(0.0);
        if (RPT == 4u) {
            f_q_c = tiles[Q0 + rc * H4P];
            f_q_d = tiles[Q0 + rd * H4P];
        }
        for (var d4 = 0u; d4 < H4; d4++) {
            if (!PIPELINE) {
                f_k_0 = tiles[K0 + tc * H4P + d4];
                f_k_1 = tiles[K0 + (tc + TC) * H4P + d4];
                f_k_2 = tiles[K0 + (tc + 2u * TC) * H4P + d4];
                f_k_3 = tiles[K0 + (tc + 3u * TC) * H4P + d4];
                f_q_a = tiles[Q0 + ra * H4P + d4];
                f_q_b = tiles[Q0 + rb * H4P + d4];
                if (RPT == 4u) {
                    f_q_c = tiles[Q0 + rc * H4P + d4];
                    f_q_d = tiles[Q0 + rd * H4P + d4];
                }
            }
            let k_0 = f_k_0;
            let k_1 = f_k_1;
            let k_2 = f_k_2;
            let k_3 = f_k_3;
            let q_a = f_q_a;
            let q_b = f_q_b;
            let q_c = f_q_c;
            let q_d = f_q_d;
            if (PIPELINE && d4 + 1u < H4) {
                let n = d4 + 1u;
                f_k_0 = tiles[K0 + tc * H4P + n];
                f_k_1 = tiles[K0 + (tc + TC) * H4P + n];
                f_k_2 = tiles[K0 + (tc + 2u * TC) * H4P + n];
                f_k_3 = tiles[K0 + (tc + 3u * TC) * H4P + n];
                f_q_a = tiles[Q0 + ra * H4P + n];
                f_q_b = tiles[Q0 + rb * H4P + n];
                if (RPT == 4u) {
                    f_q_c = tiles[Q0 + rc * H4P + n];
                    f_q_d = tiles[Q0 + rd * H4P + n];
                }
            }
            s_a = qk4(s_a, q_a, k_0, k_1, k_2, k_3);
            s_b = qk4(s_b, q_b, k_0, k_1, k_2, k_3);
            if (RPT == 4u) {
                s_c = qk4(s_c, q_c, k_0, k_1, k_2, k_3);
                s_d = qk4(s_d, q_d, k_0, k_1, k_2, k_3);
            }
        }
        let keys = vec4(k0 + tc) + vec4(0u, TC, 2u * TC, 3u * TC);
        let ok_a = keys <= vec4(row.x);
        let ok_b = keys <= vec4(row.y);
        let ok_c = keys <= vec4(row.z);
        let ok_d = keys <= vec4(row.w);
        s_a = select(vec4(NEG), s_a * scale, ok_a);
        s_b = select(vec4(NEG), s_b * scale, ok_b);
        s_c = select(vec4(NEG), s_c * scale, ok_c);
        s_d = select(vec4(NEG), s_d * scale, ok_d);
        // 2. Row maxima over the TC threads of each row, then probabilities against the new maxima.
        mat[ra * TC + tc] = max4(s_a);
        mat[rb * TC + tc] = max4(s_b);
        if (RPT == 4u) {
            mat[rc * TC + tc] = max4(s_c);
            mat[rd * TC + tc] = max4(s_d);
        }
        workgroupBarrier();
        var mn = m;
        for (var c = 0u; c < TC; c++) {
            mn.x = max(mn.x, mat[ra * TC + c]);
            mn.y = max(mn.y, mat[rb * TC + c]);
            if (RPT == 4u) {
                mn.z = max(mn.z, mat[rc * TC + c]);
                mn.w = max(mn.w, mat[rd * TC + c]);
            }
        }
        let alpha = exp(m - mn);
        m = mn;
        l *= alpha;
        acc = acc_scale(acc, alpha);
        put_tile(0u, g, tc, select(vec4(0.0), exp(s_a - mn.x), ok_a), select(vec4(0.0), exp(s_b - mn.y), ok_b),
                 select(vec4(0.0), exp(s_c - mn.z), ok_c), select(vec4(0.0), exp(s_d - mn.w), ok_d));
        workgroupBarrier();
        // 3. acc += P V and l += rowsum(P) over the tile's keys.
        let sums = acc_tile(AccL(acc, l), 0u, g, V0, e0, e1);
        acc = sums.acc;
        l = sums.l;
    }
    // l >= 1 for real rows: key 0 is visible to every row.
    let first = wg.y % DS == 0u && tc == 0u;
    store_out(b, h, row.x, d0, d1, acc.a0 / l.x, acc.a1 / l.x, m.x + log(l.x), first);
    store_out(b, h, row.y, d0, d1, acc.b0 / l.y, acc.b1 / l.y, m.y + log(l.y), first);
    if (RPT == 4u) {
        store_out(b, h, row.z, d0, d1, acc.c0 / l.z, acc.c1 / l.z, m.z + log(l.z), first);
        store_out(b, h, row.w, d0, d1, acc.d0 / l.w, acc.d1 / l.w, m.w + log(l.w), first);
    }
}

// One query row's output dims d0, d1 (those inside the head) and, from one thread, its logsumexp.
fn store_out(b: u32, h: u32, t: u32, d0: u32, d1: u32, y0: vec4<f32>, y1: vec4<f32>, row_lse: f32, first: bool) {
    if (t >= ap.T) { return; }
    let o = (b * ap.T + t) * ap.NH * H4 + h * H4;
    if (d0 < H4) { out[o + d0] = y0; }
    if (d1 < H4) { out[o + d1] = y1; }
    if (first) { lse[(b * ap.NH + h) * ap.T + t] = row_lse; }
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

// dq: a workgroup per BR queries. tiles: Q (BR) | dO (BR) | K (BS) | V (BS). pt: dS.
@compute @workgroup_size(NR * TC)
fn attention_backward_dq(@builtin(workgroup_id) wg_id: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
    let wg = block_order(wg_id, nwg, true);
    let Q0 = 0u;
    let DO0 = BR * H4P;
    let K0 = DO0 + BR * H4P;
    let V0 = K0 + BS * H4P;
    let b = wg.z;
    let h = wg.y / DS;
    let q0 = wg.x * BR;
    let tc = lid % TC;
    let g = lid / TC;
    let ra = RPT * g;
    let rb = ra + 1u;
    let rc = ra + 2u;
    let rd = ra + 3u;
    let row = vec4(q0 + ra) + vec4(0u, 1u, 2u, 3u);
    let d0 = (wg.y % DS) * 2u * TC + tc;
    let d1 = d0 + TC;
    let e0 = min(d0, H4 - 1u);
    let e1 = min(d1, H4 - 1u);
    let scale = head_scale();

    load_qkv(Q0, 0u, b, h, q0, BR, lid);
    load_dout(DO0, b, h, q0, BR, lid);
    // Rows past T read the last row's statistics; they are masked and never written.
    let stats = (b * ap.NH + h) * ap.T;
    let srow = min(row, vec4(ap.T - 1u));
    let lse4 = vec4(lse_in[stats + srow.x], lse_in[stats + srow.y], lse_in[stats + srow.z], lse_in[stats + srow.w]);
    let delta4 = vec4(delta_in[stats + srow.x], delta_in[stats + srow.y], delta_in[stats + srow.z],
                      delta_in[stats + srow.w]);
    var acc = Acc();

    let k_end = min(ap.T, q0 + BR);
    // PREFETCH: the thread's share of the next K and V tiles, read one tile ahead (as in the forward).
    var pk0 = vec4(0.0);
    var pk1 = vec4(0.0);
    var pk2 = vec4(0.0);
    var pk3 = vec4(0.0);
    var pv0 = vec4(0.0);
    var pv1 = vec4(0.0);
    var pv2 = vec4(0.0);
    var pv3 = vec4(0.0);
    if (PF && 0u < k_end) {
        pk0 = fetch_qkv(1u, b, h, 0u, lid);
        pv0 = fetch_qkv(2u, b, h, 0u, lid);
        if (PF_N > 1u) {
            pk1 = fetch_qkv(1u, b, h, 0u, lid + NT);
            pv1 = fetch_qkv(2u, b, h, 0u, lid + NT);
        }
        if (PF_N > 2u) {
            pk2 = fetch_qkv(1u, b, h, 0u, lid + 2u * NT);
            pv2 = fetch_qkv(2u, b, h, 0u, lid + 2u * NT);
        }
        if (PF_N > 3u) {
            pk3 = fetch_qkv(1u, b, h, 0u, lid + 3u * NT);
            pv3 = fetch_qkv(2u, b, h, 0u, lid + 3u * NT);
        }
    }
    for (var k0 = 0u; k0 < k_end; k0 += BS) {
        workgroupBarrier();
        if (PF) {
            put_share(K0, lid, pk0, pk1, pk2, pk3);
            put_share(V0, lid, pv0, pv1, pv2, pv3);
        } else {
            load_qkv(K0, 1u, b, h, k0, BS, lid);
            load_qkv(V0, 2u, b, h, k0, BS, lid);
        }
        workgroupBarrier();
        let kn = k0 + BS;
        if (PF) {   // also after the last tile (see the forward)
            pk0 = fetch_qkv(1u, b, h, kn, lid);
            pv0 = fetch_qkv(2u, b, h, kn, lid);
            if (PF_N > 1u) {
                pk1 = fetch_qkv(1u, b, h, kn, lid + NT);
                pv1 = fetch_qkv(2u, b, h, kn, lid + NT);
            }
            if (PF_N > 2u) {
                pk2 = fetch_qkv(1u, b, h, kn, lid + 2u * NT);
                pv2 = fetch_qkv(2u, b, h, kn, lid + 2u * NT);
            }
            if (PF_N > 3u) {
                pk3 = fetch_qkv(1u, b, h, kn, lid + 3u * NT);
                pv3 = fetch_qkv(2u, b, h, kn, lid + 3u * NT);
            }
        }
        // 1. S = Q K^T and dP = dO V^T for the thread's rows against keys k0 + tc + TC * (0..3); dS into pt.
        var s_a = vec4(0.0);
        var s_b = vec4(0.0);
        var s_c = vec4(0.0);
        var s_d = vec4(0.0);
        var dp_a = vec4(0.0);
        var dp_b = vec4(0.0);
        var dp_c = vec4(0.0);
        var dp_d = vec4(0.0);
        // f_*: the values of dims d4, read during d4 - 1's products (PIPELINE) or at the top of step d4.
        var f_k_0 = tiles[K0 + tc * H4P];
        var f_k_1 = tiles[K0 + (tc + TC) * H4P];
        var f_k_2 = tiles[K0 + (tc + 2u * TC) * H4P];
        var f_k_3 = tiles[K0 + (tc + 3u * TC) * H4P];
        var f_q_a = tiles[Q0 + ra * H4P];
        var f_q_b = tiles[Q0 + rb * H4P];
        var f_q_c = vec4(0.0);
        var f_q_d = vec4(0.0);
        var f_v_0 = tiles[V0 + tc * H4P];
        var f_v_1 = tiles[V0 + (tc + TC) * H4P];
        var f_v_2 = tiles[V0 + (tc + 2u * TC) * H4P];
        var f_v_3 = tiles[V0 + (tc + 3u * TC) * H4P];
        var f_g_a = tiles[DO0 + ra * H4P];
        var f_g_b = tiles[DO0 + rb * H4P];
        var f_g_c = vec4(0.0);
        var f_g_d = vec4(0.0);
        if (RPT == 4u) {
            f_q_c = tiles[Q0 + rc * H4P];
            f_q_d = tiles[Q0 + rd * H4P];
            f_g_c = tiles[DO0 + rc * H4P];
            f_g_d = tiles[DO0 + rd * H4P];
        }
        for (var d4 = 0u; d4 < H4; d4++) {
            if (!PIPELINE) {
                f_k_0 = tiles[K0 + tc * H4P + d4];
                f_k_1 = tiles[K0 + (tc + TC) * H4P + d4];
                f_k_2 = tiles[K0 + (tc + 2u * TC) * H4P + d4];
                f_k_3 = tiles[K0 + (tc + 3u * TC) * H4P + d4];
                f_q_a = tiles[Q0 + ra * H4P + d4];
                f_q_b = tiles[Q0 + rb * H4P + d4];
                f_v_0 = tiles[V0 + tc * H4P + d4];
                f_v_1 = tiles[V0 + (tc + TC) * H4P + d4];
                f_v_2 = tiles[V0 + (tc + 2u * TC) * H4P + d4];
                f_v_3 = tiles[V0 + (tc + 3u * TC) * H4P + d4];
                f_g_a = tiles[DO0 + ra * H4P + d4];
                f_g_b = tiles[DO0 + rb * H4P + d4];
                if (RPT == 4u) {
                    f_q_c = tiles[Q0 + rc * H4P + d4];
                    f_q_d = tiles[Q0 + rd * H4P + d4];
                    f_g_c = tiles[DO0 + rc * H4P + d4];
                    f_g_d = tiles[DO0 + rd * H4P + d4];
                }
            }
            let k_0 = f_k_0;
            let k_1 = f_k_1;
            let k_2 = f_k_2;
            let k_3 = f_k_3;
            let q_a = f_q_a;
            let q_b = f_q_b;
            let q_c = f_q_c;
            let q_d = f_q_d;
            let v_0 = f_v_0;
            let v_1 = f_v_1;
            let v_2 = f_v_2;
            let v_3 = f_v_3;
            let g_a = f_g_a;
            let g_b = f_g_b;
            let g_c = f_g_c;
            let g_d = f_g_d;
            if (PIPELINE && d4 + 1u < H4) {
                let n = d4 + 1u;
                f_k_0 = tiles[K0 + tc * H4P + n];
                f_k_1 = tiles[K0 + (tc + TC) * H4P + n];
                f_k_2 = tiles[K0 + (tc + 2u * TC) * H4P + n];
                f_k_3 = tiles[K0 + (tc + 3u * TC) * H4P + n];
                f_q_a = tiles[Q0 + ra * H4P + n];
                f_q_b = tiles[Q0 + rb * H4P + n];
                f_v_0 = tiles[V0 + tc * H4P + n];
                f_v_1 = tiles[V0 + (tc + TC) * H4P + n];
                f_v_2 = tiles[V0 + (tc + 2u * TC) * H4P + n];
                f_v_3 = tiles[V0 + (tc + 3u * TC) * H4P + n];
                f_g_a = tiles[DO0 + ra * H4P + n];
                f_g_b = tiles[DO0 + rb * H4P + n];
                if (RPT == 4u) {
                    f_q_c = tiles[Q0 + rc * H4P + n];
                    f_q_d = tiles[Q0 + rd * H4P + n];
                    f_g_c = tiles[DO0 + rc * H4P + n];
                    f_g_d = tiles[DO0 + rd * H4P + n];
                }
            }
            s_a = qk4(s_a, q_a, k_0, k_1, k_2, k_3);
            s_b = qk4(s_b, q_b, k_0, k_1, k_2, k_3);
            if (RPT == 4u) {
                s_c = qk4(s_c, q_c, k_0, k_1, k_2, k_3);
                s_d = qk4(s_d, q_d, k_0, k_1, k_2, k_3);
            }
            dp_a = qk4(dp_a, g_a, v_0, v_1, v_2, v_3);
            dp_b = qk4(dp_b, g_b, v_0, v_1, v_2, v_3);
            if (RPT == 4u) {
                dp_c = qk4(dp_c, g_c, v_0, v_1, v_2, v_3);
                dp_d = qk4(dp_d, g_d, v_0, v_1, v_2, v_3);
            }
        }
        let keys = vec4(k0 + tc) + vec4(0u, TC, 2u * TC, 3u * TC);
        let p_a = select(vec4(0.0), exp(s_a * scale - lse4.x), keys <= vec4(row.x));
        let p_b = select(vec4(0.0), exp(s_b * scale - lse4.y), keys <= vec4(row.y));
        let p_c = select(vec4(0.0), exp(s_c * scale - lse4.z), keys <= vec4(row.z));
        let p_d = select(vec4(0.0), exp(s_d * scale - lse4.w), keys <= vec4(row.w));
        put_tile(0u, g, tc, p_a * (dp_a - delta4.x), p_b * (dp_b - delta4.y), p_c * (dp_c - delta4.z),
                 p_d * (dp_d - delta4.w));
        workgroupBarrier();
        // 2. acc += dS K over the tile's keys (the row sums of dS unused).
        acc = acc_tile(AccL(acc, vec4(0.0)), 0u, g, K0, e0, e1).acc;
    }
    store_grad(b, h, row.x, 0u, d0, d1, acc.a0 * scale, acc.a1 * scale);
    store_grad(b, h, row.y, 0u, d0, d1, acc.b0 * scale, acc.b1 * scale);
    if (RPT == 4u) {
        store_grad(b, h, row.z, 0u, d0, d1, acc.c0 * scale, acc.c1 * scale);
        store_grad(b, h, row.w, 0u, d0, d1, acc.d0 * scale, acc.d1 * scale);
    }
}

// dqkv[t, part third, head h, dims d0, d1] = y0, y1 (those inside the head), for rows t < T.
fn store_grad(b: u32, h: u32, t: u32, part: u32, d0: u32, d1: u32, y0: vec4<f32>, y1: vec4<f32>) {
    if (t >= ap.T) { return; }
    let C4 = ap.NH * H4;
    let o = (b * ap.T + t) * 3u * C4 + part * C4 + h * H4;
    if (d0 < H4) { dqkv[o + d0] = y0; }
    if (d1 < H4) { dqkv[o + d1] = y1; }
}

// PREFETCH (dkv): (lse_in, delta_in) of query t0 + i of the streamed tile, i < BS (rows past T read row T - 1,
// as the plain loads do: those queries are masked), and their places mat[l0 + i], mat[l0 + BS + i].
fn fetch_stats(stats: u32, t0: u32, i: u32) -> vec2<f32> {
    var v = vec2(0.0);
    if (i < BS) {
        let t = min(t0 + i, ap.T - 1u);
        v = vec2(lse_in[stats + t], delta_in[stats + t]);
    }
    return v;
}

fn put_stats(l0: u32, i: u32, v: vec2<f32>) {
    if (i < BS) {
        mat[l0 + i] = v.x;
        mat[l0 + BS + i] = v.y;
    }
}

// dk, dv: a workgroup per BR keys; the thread's rows a, b (c, d) are keys, streamed tiles are BS queries.
// tiles: K (BR) | V (BR) | Q (BS) | dO (BS). pt: P | dS. mat: lse (BS) | delta (BS).
@compute @workgroup_size(NR * TC)
fn attention_backward_dkv(@builtin(workgroup_id) wg_id: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
    let wg = block_order(wg_id, nwg, false);
    let K0 = 0u;
    let V0 = BR * H4P;
    let Q0 = V0 + BR * H4P;
    let DO0 = Q0 + BS * H4P;
    let DS4 = (BS / 2u) * PW4;
    let L0 = 0u;
    let D0 = BS;
    let b = wg.z;
    let h = wg.y / DS;
    let k0 = wg.x * BR;
    let tc = lid % TC;
    let g = lid / TC;
    let ra = RPT * g;
    let rb = ra + 1u;
    let rc = ra + 2u;
    let rd = ra + 3u;
    let key = vec4(k0 + ra) + vec4(0u, 1u, 2u, 3u);
    let d0 = (wg.y % DS) * 2u * TC + tc;
    let d1 = d0 + TC;
    let e0 = min(d0, H4 - 1u);
    let e1 = min(d1, H4 - 1u);
    let scale = head_scale();

    load_qkv(K0, 1u, b, h, k0, BR, lid);
    load_qkv(V0, 2u, b, h, k0, BR, lid);
    var dk = Acc();
    var dv = Acc();

    let stats = (b * ap.NH + h) * ap.T;
    // Query rows before k0 see none of the block's keys: start at the tile holding row k0.
    let q_begin = (k0 / BS) * BS;
    // PREFETCH: the thread's share of the next Q and dO tiles (PF_N vec4s of each) and of its lse, delta
    // (PF_S pairs), read one tile ahead.
    var pq0 = vec4(0.0);
    var pq1 = vec4(0.0);
    var pq2 = vec4(0.0);
    var pq3 = vec4(0.0);
    var pg0 = vec4(0.0);
    var pg1 = vec4(0.0);
    var pg2 = vec4(0.0);
    var pg3 = vec4(0.0);
    var ps0 = vec2(0.0);
    var ps1 = vec2(0.0);
    var ps2 = vec2(0.0);
    var ps3 = vec2(0.0);
    if (PF && q_begin < ap.T) {
        pq0 = fetch_qkv(0u, b, h, q_begin, lid);
        pg0 = fetch_dout(b, h, q_begin, lid);
        if (PF_N > 1u) {
            pq1 = fetch_qkv(0u, b, h, q_begin, lid + NT);
            pg1 = fetch_dout(b, h, q_begin, lid + NT);
        }
        if (PF_N > 2u) {
            pq2 = fetch_qkv(0u, b, h, q_begin, lid + 2u * NT);
            pg2 = fetch_dout(b, h, q_begin, lid + 2u * NT);
        }
        if (PF_N > 3u) {
            pq3 = fetch_qkv(0u, b, h, q_begin, lid + 3u * NT);
            pg3 = fetch_dout(b, h, q_begin, lid + 3u * NT);
        }
        ps0 = fetch_stats(stats, q_begin, lid);
        if (PF_S > 1u) { ps1 = fetch_stats(stats, q_begin, lid + NT); }
        if (PF_S > 2u) { ps2 = fetch_stats(stats, q_begin, lid + 2u * NT); }
        if (PF_S > 3u) { ps3 = fetch_stats(stats, q_begin, lid + 3u * NT); }
    }
    for (var q0 = q_begin; q0 < ap.T; q0 += BS) {
        workgroupBarrier();
        if (PF) {
            put_share(Q0, lid, pq0, pq1, pq2, pq3);
            put_share(DO0, lid, pg0, pg1, pg2, pg3);
            put_stats(L0, lid, ps0);
            if (PF_S > 1u) { put_stats(L0, lid + NT, ps1); }
            if (PF_S > 2u) { put_stats(L0, lid + 2u * NT, ps2); }
            if (PF_S > 3u) { put_stats(L0, lid + 3u * NT, ps3); }
        } else {
            load_qkv(Q0, 0u, b, h, q0, BS, lid);
            load_dout(DO0, b, h, q0, BS, lid);
            for (var i = lid; i < BS; i += NR * TC) {
                let t = min(q0 + i, ap.T - 1u);
                mat[L0 + i] = lse_in[stats + t];
                mat[D0 + i] = delta_in[stats + t];
            }
        }
        workgroupBarrier();
        let qn = q0 + BS;
        if (PF) {   // also after the last tile (see the forward)
            pq0 = fetch_qkv(0u, b, h, qn, lid);
            pg0 = fetch_dout(b, h, qn, lid);
            if (PF_N > 1u) {
                pq1 = fetch_qkv(0u, b, h, qn, lid + NT);
                pg1 = fetch_dout(b, h, qn, lid + NT);
            }
            if (PF_N > 2u) {
                pq2 = fetch_qkv(0u, b, h, qn, lid + 2u * NT);
                pg2 = fetch_dout(b, h, qn, lid + 2u * NT);
            }
            if (PF_N > 3u) {
                pq3 = fetch_qkv(0u, b, h, qn, lid + 3u * NT);
                pg3 = fetch_dout(b, h, qn, lid + 3u * NT);
            }
            ps0 = fetch_stats(stats, qn, lid);
            if (PF_S > 1u) { ps1 = fetch_stats(stats, qn, lid + NT); }
            if (PF_S > 2u) { ps2 = fetch_stats(stats, qn, lid + 2u * NT); }
            if (PF_S > 3u) { ps3 = fetch_stats(stats, qn, lid + 3u * NT); }
        }
        // 1. S^T = K Q^T and dP^T = V dO^T for the thread's keys against queries q0 + tc + TC * (0..3);
        //    P, dS into pt.
        var s_a = vec4(0.0);
        var s_b = vec4(0.0);
        var s_c = vec4(0.0);
        var s_d = vec4(0.0);
        var dp_a = vec4(0.0);
        var dp_b = vec4(0.0);
        var dp_c = vec4(0.0);
        var dp_d = vec4(0.0);
        // f_*: the values of dims d4, read during d4 - 1's products (PIPELINE) or at the top of step d4.
        var f_q_0 = tiles[Q0 + tc * H4P];
        var f_q_1 = tiles[Q0 + (tc + TC) * H4P];
        var f_q_2 = tiles[Q0 + (tc + 2u * TC) * H4P];
        var f_q_3 = tiles[Q0 + (tc + 3u * TC) * H4P];
        var f_k_a = tiles[K0 + ra * H4P];
        var f_k_b = tiles[K0 + rb * H4P];
        var f_k_c = vec4(0.0);
        var f_k_d = vec4(0.0);
        var f_g_0 = tiles[DO0 + tc * H4P];
        var f_g_1 = tiles[DO0 + (tc + TC) * H4P];
        var f_g_2 = tiles[DO0 + (tc + 2u * TC) * H4P];
        var f_g_3 = tiles[DO0 + (tc + 3u * TC) * H4P];
        var f_v_a = tiles[V0 + ra * H4P];
        var f_v_b = tiles[V0 + rb * H4P];
        var f_v_c = vec4(0.0);
        var f_v_d = vec4(0.0);
        if (RPT == 4u) {
            f_k_c = tiles[K0 + rc * H4P];
            f_k_d = tiles[K0 + rd * H4P];
            f_v_c = tiles[V0 + rc * H4P];
            f_v_d = tiles[V0 + rd * H4P];
        }
        for (var d4 = 0u; d4 < H4; d4++) {
            if (!PIPELINE) {
                f_q_0 = tiles[Q0 + tc * H4P + d4];
                f_q_1 = tiles[Q0 + (tc + TC) * H4P + d4];
                f_q_2 = tiles[Q0 + (tc + 2u * TC) * H4P + d4];
                f_q_3 = tiles[Q0 + (tc + 3u * TC) * H4P + d4];
                f_k_a = tiles[K0 + ra * H4P + d4];
                f_k_b = tiles[K0 + rb * H4P + d4];
                f_g_0 = tiles[DO0 + tc * H4P + d4];
                f_g_1 = tiles[DO0 + (tc + TC) * H4P + d4];
                f_g_2 = tiles[DO0 + (tc + 2u * TC) * H4P + d4];
                f_g_3 = tiles[DO0 + (tc + 3u * TC) * H4P + d4];
                f_v_a = tiles[V0 + ra * H4P + d4];
                f_v_b = tiles[V0 + rb * H4P + d4];
                if (RPT == 4u) {
                    f_k_c = tiles[K0 + rc * H4P + d4];
                    f_k_d = tiles[K0 + rd * H4P + d4];
                    f_v_c = tiles[V0 + rc * H4P + d4];
                    f_v_d = tiles[V0 + rd * H4P + d4];
                }
            }
            let q_0 = f_q_0;
            let q_1 = f_q_1;
            let q_2 = f_q_2;
            let q_3 = f_q_3;
            let k_a = f_k_a;
            let k_b = f_k_b;
            let k_c = f_k_c;
            let k_d = f_k_d;
            let g_0 = f_g_0;
            let g_1 = f_g_1;
            let g_2 = f_g_2;
            let g_3 = f_g_3;
            let v_a = f_v_a;
            let v_b = f_v_b;
            let v_c = f_v_c;
            let v_d = f_v_d;
            if (PIPELINE && d4 + 1u < H4) {
                let n = d4 + 1u;
                f_q_0 = tiles[Q0 + tc * H4P + n];
                f_q_1 = tiles[Q0 + (tc + TC) * H4P + n];
                f_q_2 = tiles[Q0 + (tc + 2u * TC) * H4P + n];
                f_q_3 = tiles[Q0 + (tc + 3u * TC) * H4P + n];
                f_k_a = tiles[K0 + ra * H4P + n];
                f_k_b = tiles[K0 + rb * H4P + n];
                f_g_0 = tiles[DO0 + tc * H4P + n];
                f_g_1 = tiles[DO0 + (tc + TC) * H4P + n];
                f_g_2 = tiles[DO0 + (tc + 2u * TC) * H4P + n];
                f_g_3 = tiles[DO0 + (tc + 3u * TC) * H4P + n];
                f_v_a = tiles[V0 + ra * H4P + n];
                f_v_b = tiles[V0 + rb * H4P + n];
                if (RPT == 4u) {
                    f_k_c = tiles[K0 + rc * H4P + n];
                    f_k_d = tiles[K0 + rd * H4P + n];
                    f_v_c = tiles[V0 + rc * H4P + n];
                    f_v_d = tiles[V0 + rd * H4P + n];
                }
            }
            s_a = qk4(s_a, k_a, q_0, q_1, q_2, q_3);
            s_b = qk4(s_b, k_b, q_0, q_1, q_2, q_3);
            if (RPT == 4u) {
                s_c = qk4(s_c, k_c, q_0, q_1, q_2, q_3);
                s_d = qk4(s_d, k_d, q_0, q_1, q_2, q_3);
            }
            dp_a = qk4(dp_a, v_a, g_0, g_1, g_2, g_3);
            dp_b = qk4(dp_b, v_b, g_0, g_1, g_2, g_3);
            if (RPT == 4u) {
                dp_c = qk4(dp_c, v_c, g_0, g_1, g_2, g_3);
                dp_d = qk4(dp_d, v_d, g_0, g_1, g_2, g_3);
            }
        }
        let j = vec4(tc) + vec4(0u, TC, 2u * TC, 3u * TC);     // the queries' places in the tile
        let rows = vec4(q0) + j;
        let real = rows < vec4(ap.T);
        let lse4 = vec4(mat[L0 + j.x], mat[L0 + j.y], mat[L0 + j.z], mat[L0 + j.w]);
        let delta4 = vec4(mat[D0 + j.x], mat[D0 + j.y], mat[D0 + j.z], mat[D0 + j.w]);
        let p_a = select(vec4(0.0), exp(s_a * scale - lse4), real & (vec4(key.x) <= rows));
        let p_b = select(vec4(0.0), exp(s_b * scale - lse4), real & (vec4(key.y) <= rows));
        let p_c = select(vec4(0.0), exp(s_c * scale - lse4), real & (vec4(key.z) <= rows));
        let p_d = select(vec4(0.0), exp(s_d * scale - lse4), real & (vec4(key.w) <= rows));
        put_tile(0u, g, tc, p_a, p_b, p_c, p_d);
        put_tile(DS4, g, tc, p_a * (dp_a - delta4), p_b * (dp_b - delta4), p_c * (dp_c - delta4),
                 p_d * (dp_d - delta4));
        workgroupBarrier();
        // STORE_DS: the tile's dS (unscaled) to ds_out[b, h, key, query] for attention_backward_dq_ds, by the first
        // dim chunk.
        if (STORE_DS && wg.y % DS == 0u) {
            let base = (b * ap.NH + h) * ap.T * ap.T;
            // One vec4 of the tile a step, neighbouring threads on neighbouring pair rows (queries, so neighbouring
            // addresses): RPT = 2, keys 2 c, 2 c + 1 x queries 2 jp, 2 jp + 1; RPT = 4, keys 4 (c / 2) .. + 3 x
            // query 2 jp + c % 2.
            for (var v = lid; v < (BS / 2u) * (BR / 2u); v += NT) {
                let jp = v % (BS / 2u);
                let c = v / (BS / 2u);
                let x = pt[DS4 + jp * PW4 + c];
                if (RPT == 4u) {
                    let q = q0 + 2u * jp + c % 2u;
                    let kr = k0 + 4u * (c / 2u);
                    if (q < ap.T) {
                        if (kr < ap.T) { ds_out[base + kr * ap.T + q] = x.x; }
                        if (kr + 1u < ap.T) { ds_out[base + (kr + 1u) * ap.T + q] = x.y; }
                        if (kr + 2u < ap.T) { ds_out[base + (kr + 2u) * ap.T + q] = x.z; }
                        if (kr + 3u < ap.T) { ds_out[base + (kr + 3u) * ap.T + q] = x.w; }
                    }
                } else {
                    let q = q0 + 2u * jp;
                    let kr = k0 + 2u * c;
                    if (kr < ap.T) {
                        if (q < ap.T) { ds_out[base + kr * ap.T + q] = x.x; }
                        if (q + 1u < ap.T) { ds_out[base + kr * ap.T + q + 1u] = x.z; }
                    }
                    if (kr + 1u < ap.T) {
                        if (q < ap.T) { ds_out[base + (kr + 1u) * ap.T + q] = x.y; }
                        if (q + 1u < ap.T) { ds_out[base + (kr + 1u) * ap.T + q + 1u] = x.w; }
                    }
                }
            }
        }
        // 2. dv += P^T dO and dk += dS^T Q over the tile's queries, two at a time: acc_tile's loop with both
        //    products in one pass over the pairs.
        var f_p = get_pair(0u, g, 0u);
        var f_ds = get_pair(DS4, g, 0u);
        var f_q00 = tiles[Q0 + e0];
        var f_q01 = tiles[Q0 + e1];
        var f_q10 = tiles[Q0 + H4P + e0];
        var f_q11 = tiles[Q0 + H4P + e1];
        var f_g00 = tiles[DO0 + e0];
        var f_g01 = tiles[DO0 + e1];
        var f_g10 = tiles[DO0 + H4P + e0];
        var f_g11 = tiles[DO0 + H4P + e1];
        for (var ip = 0u; ip < BS / 2u; ip++) {
            if (!PIPELINE) {
                let i = 2u * ip;
                f_p = get_pair(0u, g, ip);
                f_ds = get_pair(DS4, g, ip);
                f_q00 = tiles[Q0 + i * H4P + e0];
                f_q01 = tiles[Q0 + i * H4P + e1];
                f_q10 = tiles[Q0 + (i + 1u) * H4P + e0];
                f_q11 = tiles[Q0 + (i + 1u) * H4P + e1];
                f_g00 = tiles[DO0 + i * H4P + e0];
                f_g01 = tiles[DO0 + i * H4P + e1];
                f_g10 = tiles[DO0 + (i + 1u) * H4P + e0];
                f_g11 = tiles[DO0 + (i + 1u) * H4P + e1];
            }
            let p = f_p;
            let ds = f_ds;
            let q00 = f_q00;
            let q01 = f_q01;
            let q10 = f_q10;
            let q11 = f_q11;
            let g00 = f_g00;
            let g01 = f_g01;
            let g10 = f_g10;
            let g11 = f_g11;
            if (PIPELINE && ip + 1u < BS / 2u) {
                let n = 2u * ip + 2u;
                f_p = get_pair(0u, g, ip + 1u);
                f_ds = get_pair(DS4, g, ip + 1u);
                f_q00 = tiles[Q0 + n * H4P + e0];
                f_q01 = tiles[Q0 + n * H4P + e1];
                f_q10 = tiles[Q0 + (n + 1u) * H4P + e0];
                f_q11 = tiles[Q0 + (n + 1u) * H4P + e1];
                f_g00 = tiles[DO0 + n * H4P + e0];
                f_g01 = tiles[DO0 + n * H4P + e1];
                f_g10 = tiles[DO0 + (n + 1u) * H4P + e0];
                f_g11 = tiles[DO0 + (n + 1u) * H4P + e1];
            }
            dv = acc_key(dv, p.j0, g00, g01);
            dk = acc_key(dk, ds.j0, q00, q01);
            dv = acc_key(dv, p.j1, g10, g11);
            dk = acc_key(dk, ds.j1, q10, q11);
        }
    }
    store_grad(b, h, key.x, 1u, d0, d1, dk.a0 * scale, dk.a1 * scale);
    store_grad(b, h, key.x, 2u, d0, d1, dv.a0, dv.a1);
    store_grad(b, h, key.y, 1u, d0, d1, dk.b0 * scale, dk.b1 * scale);
    store_grad(b, h, key.y, 2u, d0, d1, dv.b0, dv.b1);
    if (RPT == 4u) {
        store_grad(b, h, key.z, 1u, d0, d1, dk.c0 * scale, dk.c1 * scale);
        store_grad(b, h, key.z, 2u, d0, d1, dv.c0, dv.c1);
        store_grad(b, h, key.w, 1u, d0, d1, dk.d0 * scale, dk.d1 * scale);
        store_grad(b, h, key.w, 2u, d0, d1, dv.d0, dv.d1);
    }
}

// vec4 i of the KS keys' K rows staged from key kt: K[kt + i / H4, dims vec4 i % H4] of head h (zeros past T and
// past the staged keys: a thread's last share may lie there when threads do not divide them).
fn dq_fetch_k(b: u32, h: u32, kt: u32, i: u32) -> vec4<f32> {
    let t = kt + i / H4;
    var v = vec4(0.0);
    if (i < KS * H4 && t < ap.T) { v = qkv[(b * ap.T + t) * 3u * ap.NH * H4 + ap.NH * H4 + h * H4 + i % H4]; }
    return v;
}

// vec4 i of the KS keys' dS rows staged from key kt: dS[key kt + i / (QB/4), queries q0 + 4 (i % (QB/4)) .. + 3]
// as dkv stored them (ds_in[b, h, key, query], base = (b NH + h) T T). Entries before the key (above the diagonal:
// never written) and past T are zero, not read. DS_VEC4 (T % 4 == 0: every such group of 4 starts 16-byte aligned)
// reads a whole group as one vec4 (ds_in4, the same buffer) where the scalar form makes four reads.
fn dq_fetch_ds(base: u32, q0: u32, kt: u32, i: u32) -> vec4<f32> {
    let k = kt + i / (QB / 4u);
    let q = q0 + 4u * (i % (QB / 4u));
    var v = vec4(0.0);
    if (i < KS * (QB / 4u) && k < ap.T) {
        let o = base + k * ap.T + q;
        if (q >= k && q + 3u < ap.T) {
            if (DS_VEC4) {
                v = ds_in4[o / 4u];
            } else {
                v = vec4(ds_in[o], ds_in[o + 1u], ds_in[o + 2u], ds_in[o + 3u]);
            }
        } else {
            if (q >= k && q < ap.T) { v.x = ds_in[o]; }
            if (q + 1u >= k && q + 1u < ap.T) { v.y = ds_in[o + 1u]; }
            if (q + 2u >= k && q + 2u < ap.T) { v.z = ds_in[o + 2u]; }
            if (q + 3u >= k && q + 3u < ap.T) { v.w = ds_in[o + 3u]; }
        }
    }
    return v;
}

// dQ = scale dS K from the dS that dkv stored (STORE_DS): a workgroup per QB queries of one head, thread (tq, td)
// owns queries q0 + RQ tq .. + RQ - 1 and dims vec4 td of the head. Keys are staged KS at a time: K rows as they
// are (tiles[KO + k H4 + d4]) and dS rows as dkv stored them, queries along vec4s (tiles[DO + k QB/4 + q/4]).
// Each query sums its keys 0..q in order, dS entries above the diagonal are taken as zero (never read from ds_in:
// dkv did not write them), and each product is one fma: attention_backward_dq's chain, so both give the same dQ.
// DQ_PREFETCH: each thread reads its share of the NEXT keys' K and dS (at most 2 vec4s of each: DQ_PF) into
// registers while the current keys are multiplied, and stores them after the next barrier (as PREFETCH does for
// the tiled kernels); the same values in the same places, so the same dQ to the bit.
@compute @workgroup_size((QB / RQ) * H4)
fn attention_backward_dq_ds(@builtin(workgroup_id) wg_id: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
    let wg = block_order(wg_id, nwg, true);
    let KO = 0u;
    let DO = KS * H4;
    let b = wg.z;
    let h = wg.y;
    let q0 = wg.x * QB;
    let td = lid % H4;
    let tq = lid / H4;
    let NTH = (QB / RQ) * H4;
    let base = (b * ap.NH + h) * ap.T * ap.T;
    var acc0 = vec4(0.0);
    var acc1 = vec4(0.0);
    var acc2 = vec4(0.0);
    var acc3 = vec4(0.0);
    var acc4 = vec4(0.0);
    var acc5 = vec4(0.0);
    var acc6 = vec4(0.0);
    var acc7 = vec4(0.0);
    let k_end = min(q0 + QB, ap.T);
    var pk0 = vec4(0.0);
    var pk1 = vec4(0.0);
    var pd0 = vec4(0.0);
    var pd1 = vec4(0.0);
    if (DQ_PF) {
        pk0 = dq_fetch_k(b, h, 0u, lid);
        pd0 = dq_fetch_ds(base, q0, 0u, lid);
        if (DQ_NK > 1u) { pk1 = dq_fetch_k(b, h, 0u, lid + NTH); }
        if (DQ_ND > 1u) { pd1 = dq_fetch_ds(base, q0, 0u, lid + NTH); }
    }
    for (var kt = 0u; kt < k_end; kt += KS) {
        workgroupBarrier();
        if (DQ_PF) {
            if (lid < KS * H4) { tiles[KO + lid] = pk0; }
            if (DQ_NK > 1u && lid + NTH < KS * H4) { tiles[KO + lid + NTH] = pk1; }
            if (lid < KS * (QB / 4u)) { tiles[DO + lid] = pd0; }
            if (DQ_ND > 1u && lid + NTH < KS * (QB / 4u)) { tiles[DO + lid + NTH] = pd1; }
        } else {
            for (var i = lid; i < KS * H4; i += NTH) { tiles[KO + i] = dq_fetch_k(b, h, kt, i); }
            for (var i = lid; i < KS * (QB / 4u); i += NTH) { tiles[DO + i] = dq_fetch_ds(base, q0, kt, i); }
        }
        workgroupBarrier();
        if (DQ_PF) {   // also after the last keys (never used; rows past T read zeros), as the tiled kernels do
            let kn = kt + KS;
            pk0 = dq_fetch_k(b, h, kn, lid);
            pd0 = dq_fetch_ds(base, q0, kn, lid);
            if (DQ_NK > 1u) { pk1 = dq_fetch_k(b, h, kn, lid + NTH); }
            if (DQ_ND > 1u) { pd1 = dq_fetch_ds(base, q0, kn, lid + NTH); }
        }
        for (var kk = 0u; kk < KS; kk++) {
            let kv = tiles[KO + kk * H4 + td];
            let d_lo = tiles[DO + kk * (QB / 4u) + tq * (RQ / 4u)];
            acc0 = axpy4(d_lo.x, kv, acc0);
            acc1 = axpy4(d_lo.y, kv, acc1);
            acc2 = axpy4(d_lo.z, kv, acc2);
            acc3 = axpy4(d_lo.w, kv, acc3);
            if (RQ == 8u) {
                let d_hi = tiles[DO + kk * (QB / 4u) + tq * 2u + 1u];
                acc4 = axpy4(d_hi.x, kv, acc4);
                acc5 = axpy4(d_hi.y, kv, acc5);
                acc6 = axpy4(d_hi.z, kv, acc6);
                acc7 = axpy4(d_hi.w, kv, acc7);
            }
        }
    }
    let scale = head_scale();
    let t = q0 + tq * RQ;
    store_dq(b, h, t, td, acc0 * scale);
    store_dq(b, h, t + 1u, td, acc1 * scale);
    store_dq(b, h, t + 2u, td, acc2 * scale);
    store_dq(b, h, t + 3u, td, acc3 * scale);
    if (RQ == 8u) {
        store_dq(b, h, t + 4u, td, acc4 * scale);
        store_dq(b, h, t + 5u, td, acc5 * scale);
        store_dq(b, h, t + 6u, td, acc6 * scale);
        store_dq(b, h, t + 7u, td, acc7 * scale);
    }
}

// dqkv[t, q third, head h, dims vec4 d4] = y, for rows t < T.
fn store_dq(b: u32, h: u32, t: u32, d4: u32, y: vec4<f32>) {
    if (t >= ap.T) { return; }
    dqkv[(b * ap.T + t) * 3u * ap.NH * H4 + h * H4 + d4] = y;
}
