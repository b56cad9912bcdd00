// Token + position embedding, forward and backward (no atomics: deterministic).
// N = B*T rows of C channels, read as vec4 (C4 = C / 4); row n holds token idx[n] at position t = n % T.
//
// encoder_forward:      idx (N,) u32, wte (Vp, C) f32, wpe (>= T, C) f32 -> out (N, C) f32 = wte[idx[n]] + wpe[t]
// encoder_backward_wpe: dout (N, C) f32 -> dwpe (>= T, C) f32 +=  (dwpe[t] += sum over b of dout[b*T + t])
// sort_start, sort_merge_global, sort_merge_local:
//                       idx (N,) u32 -> keys (n_pad,) u32: the keys tok * N + n in ascending order, so that the
//                       rows of one token lie side by side in increasing n (a bitonic sort; n_pad is a power of
//                       two and the padding keys are 0xffffffff; needs Vp * N < 2^32). Each kernel works on
//                       blocks of BLOCK keys in one workgroup's memory with SWG threads, override constants set
//                       per kernel: sort_start on blocks of at most 1024 (many workgroups), sort_merge_local on
//                       blocks as large as the device allows, where it makes every stage up to k = BLOCK in one
//                       dispatch
// encoder_backward_wte, encoder_backward_wte_runs:
//                       keys (n_pad,) u32, dout (N, C) f32 -> dwte (Vp, C) f32 +=: each token's run of rows summed in
//                       sorted order (pieces of at most SEG rows, then the pieces in order), scratch
//                       pieces (2 * ceil(N / SEG), C) f32
//
// Tokens >= Vp read as a zero wte row and get no gradient. Grids may be folded into 2-D (x, y).

struct EmbParams { N: u32, T: u32, C4: u32, Vp: u32 }
struct SortParams { n_pad: u32, k: u32, j: u32, k_end: u32 }

@group(0) @binding(0) var<uniform> ep: EmbParams;
@group(0) @binding(1) var<storage, read> idx: array<u32>;
@group(0) @binding(2) var<storage, read> wte: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> wpe: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> dwpe: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> dwte: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> keys: array<u32>;
@group(0) @binding(9) var<uniform> sp: SortParams;
@group(0) @binding(10) var<storage, read_write> pieces: array<vec4<f32>>;

const WG: u32 = 256u;        // encoder_forward, encoder_backward_wpe, sort_merge_global
const ROW_WG: u32 = 64u;     // encoder_backward_wte: threads over the channels of one row
override BLOCK: u32 = 1024u; // keys sorted in workgroup memory by one workgroup (a power of two)
override SWG: u32 = 256u;    // threads of sort_start and sort_merge_local (a power of two, at most BLOCK / 2)
const SEG: u32 = 32u;        // sorted rows per segment: the longest sum one workgroup does in the dwte backward
const NO_KEY: u32 = 0xffffffffu;

fn flat_index(wg: vec3u, nwg: vec3u, lid: vec3u) -> u32 {
    return (wg.y * nwg.x + wg.x) * WG + lid.x;
}

@compute @workgroup_size(WG)
fn encoder_forward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                   @builtin(local_invocation_id) lid: vec3u) {
    let i = flat_index(wg, nwg, lid);
    if (i >= ep.N * ep.C4) { return; }
    let n = i / ep.C4;
    let c = i % ep.C4;
    let tok = idx[n];
    var x = wpe[(n % ep.T) * ep.C4 + c];
    if (tok < ep.Vp) { x += wte[tok * ep.C4 + c]; }
    out[i] = x;
}

// One thread per (t, vec4 of channels): the batch rows of position t summed in order b = 0, 1, ...
@compute @workgroup_size(WG)
fn encoder_backward_wpe(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                        @builtin(local_invocation_id) lid: vec3u) {
    let i = flat_index(wg, nwg, lid);
    if (i >= ep.T * ep.C4) { return; }
    let B = ep.N / ep.T;
    var acc = vec4(0.0);
    for (var b = 0u; b < B; b++) {
        acc += dout[b * ep.T * ep.C4 + i];
    }
    dwpe[i] += acc;
}

// ---- Bitonic sort of the keys. Stage (k, j) compares element i with i + j (for i with bit j clear), in
// ascending order where bit k of i is clear and descending where it is set; stages run k = 2, 4, ..., n_pad and
// for each k, j = k/2, ..., 1. Stages with j < BLOCK stay inside one block and run in workgroup memory.

var<workgroup> tile: array<u32, BLOCK>;

fn make_key(n: u32) -> u32 {
    if (n >= ep.N) { return NO_KEY; }
    let tok = idx[n];
    if (tok >= ep.Vp) { return NO_KEY; }
    return tok * ep.N + n;
}

// One stage (k, j) on the tile of the block starting at global index base; then a barrier.
fn tile_stage(base: u32, k: u32, j: u32, lid: u32) {
    for (var q = 0u; q < BLOCK / 2u / SWG; q++) {
        let p = lid + q * SWG;                    // pair number within the block
        let i = 2u * p - (p & (j - 1u));          // (p / j) 2j + p % j, j a power of two: no divisions
        let a = tile[i];
        let b = tile[i + j];
        if ((a > b) == (((base + i) & k) == 0u)) {
            tile[i] = b;
            tile[i + j] = a;
        }
    }
    workgroupBarrier();
}

// Each block of BLOCK keys, made from idx and sorted in workgroup memory (all stages with k <= BLOCK).
@compute @workgroup_size(SWG)
fn sort_start(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let base = wg.x * BLOCK;
    for (var q = 0u; q < BLOCK / SWG; q++) {
        let e = lid.x + q * SWG;
        tile[e] = make_key(base + e);
    }
    workgroupBarrier();
    for (var k = 2u; k <= BLOCK; k <<= 1u) {
        for (var j = k >> 1u; j > 0u; j >>= 1u) {
            tile_stage(base, k, j, lid.x);
        }
    }
    for (var q = 0u; q < BLOCK / SWG; q++) {
        let e = lid.x + q * SWG;
        keys[base + e] = tile[e];
    }
}

// One stage (sp.k, sp.j) with j >= BLOCK, over the whole key array: one thread per pair.
@compute @workgroup_size(WG)
fn sort_merge_global(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                     @builtin(local_invocation_id) lid: vec3u) {
    let p = flat_index(wg, nwg, lid);
    if (p >= sp.n_pad / 2u) { return; }
    let j = sp.j;
    let i = 2u * p - (p & (j - 1u));
    let a = keys[i];
    let b = keys[i + j];
    if ((a > b) == ((i & sp.k) == 0u)) {
        keys[i] = b;
        keys[i + j] = a;
    }
}

// The stages (k, j) for k = sp.k, 2 sp.k, ..., sp.k_end and j = min(k, BLOCK)/2 ... 1, each block in workgroup
// memory: after sort_start's smaller blocks, the stages of every k up to BLOCK in one dispatch; beyond BLOCK one
// k a dispatch, after its long-range stages.
@compute @workgroup_size(SWG)
fn sort_merge_local(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let base = wg.x * BLOCK;
    for (var q = 0u; q < BLOCK / SWG; q++) {
        let e = lid.x + q * SWG;
        tile[e] = keys[base + e];
    }
    workgroupBarrier();
    for (var k = sp.k; k <= sp.k_end; k <<= 1u) {
        for (var j = min(k, BLOCK) >> 1u; j > 0u; j >>= 1u) {
            tile_stage(base, k, j, lid.x);
        }
    }
    for (var q = 0u; q < BLOCK / SWG; q++) {
        let e = lid.x + q * SWG;
        keys[base + e] = tile[e];
    }
}

// ---- dwte from the sorted keys. The sorted positions are cut into segments of SEG; a piece is the part of one
// token's run inside one segment, so no piece is longer than SEG rows (a frequent token's long run is summed by
// many workgroups at once). A run inside one segment is one piece and adds its sum to dwte[tok] directly. A run
// that crosses segment boundaries leaves its pieces in pieces[]: its first piece at 2 * segment + 1, the pieces
// that continue it at 2 * segment (two slots per segment: one run can end and another begin in the same one);
// then encoder_backward_wte_runs adds them up, in order, for each such run. Every dwte row has one writer.

fn token_at(s: u32) -> u32 {
    return keys[s] / ep.N;
}

fn is_run_start(s: u32, tok: u32) -> bool {
    return s == 0u || token_at(s - 1u) != tok;
}

// The run of tok that contains position s goes on past the end of s's segment.
fn crosses_segment(s: u32, tok: u32) -> bool {
    let seg_end = (s / SEG + 1u) * SEG;
    return seg_end < ep.N && token_at(seg_end) == tok;
}

// One workgroup per sorted position s: the heads of pieces (run starts and segment starts) sum their piece.
@compute @workgroup_size(ROW_WG)
fn encoder_backward_wte(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                        @builtin(local_invocation_id) lid: vec3u) {
    let s = wg.y * nwg.x + wg.x;
    if (s >= ep.N) { return; }
    let tok = token_at(s);
    if (tok >= ep.Vp) { return; }                      // padding or an out-of-range token
    let start = is_run_start(s, tok);
    if (!start && s % SEG != 0u) { return; }           // inside a piece that another workgroup sums
    let seg_end = min((s / SEG + 1u) * SEG, ep.N);
    var end = s + 1u;
    while (end < seg_end && token_at(end) == tok) { end++; }
    let crosses = crosses_segment(s, tok);
    let seg = s / SEG;
    for (var c = lid.x; c < ep.C4; c += ROW_WG) {
        var acc = vec4(0.0);
        for (var r = s; r < end; r++) {
            acc += dout[(keys[r] % ep.N) * ep.C4 + c];
        }
        if (start && !crosses) {
            dwte[tok * ep.C4 + c] += acc;
        } else if (start) {
            pieces[(2u * seg + 1u) * ep.C4 + c] = acc;
        } else {
            pieces[(2u * seg) * ep.C4 + c] = acc;
        }
    }
}

// One workgroup per sorted position s: the starts of runs that cross segments add up their pieces in order.
@compute @workgroup_size(ROW_WG)
fn encoder_backward_wte_runs(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                             @builtin(local_invocation_id) lid: vec3u) {
    let s = wg.y * nwg.x + wg.x;
    if (s >= ep.N) { return; }
    let tok = token_at(s);
    if (tok >= ep.Vp || !is_run_start(s, tok) || !crosses_segment(s, tok)) { return; }
    let first = s / SEG;
    for (var c = lid.x; c < ep.C4; c += ROW_WG) {
        var acc = pieces[(2u * first + 1u) * ep.C4 + c];
        for (var seg = first + 1u; seg * SEG < ep.N && token_at(seg * SEG) == tok; seg++) {
            acc += pieces[(2u * seg) * ep.C4 + c];
        }
        dwte[tok * ep.C4 + c] += acc;
    }
}
