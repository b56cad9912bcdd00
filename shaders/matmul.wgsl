// Matrix products of the model, forward and backward, with optional bias and accumulation.
//
//   out (M, N) [+]= op(A) (M, K) @ op(B) (K, N) [+ bias (N,)]
//
// op(A) = A stored (M, K) row-major, or A^T with A stored (K, M) when A_T;
// op(B) = B stored (K, N) row-major, or B^T with B stored (N, K) when B_T. The model's products:
//   Conv1D forward      out = inp @ W + b          nn   inp (M,K), W (K,N)
//   lm_head forward     logits = x @ wte^T         nt   x (M,C), wte (Vp,C)
//   Conv1D dinp         dinp = dout @ W^T          nt   dout (M,N), W (K,N)
//   Conv1D dW           dW += inp^T @ dout         tn   inp (M,K), dout (M,N)   (ACCUMULATE; with BIAS_ROW
//                                                       also db += column sums of dout, as the last row of
//                                                       [dW; db], the bias stored right after the weight)
//   lm_head dx          dx = dlogits @ wte         nn   dlogits (M,Vp), wte (Vp,C)
//   lm_head dwte        dwte += dlogits^T @ x      tn   dlogits (M,Vp), x (M,C) (ACCUMULATE)
//   bias grad           dbias += column sums of dout (M,N), in two deterministic passes
//
// Entry points and bindings (sizes M, N, K in the uniform `mp`; layout and tiles as override constants):
//   matmul_tiled:  a4 vec4 f32, b4 vec4 f32, bias4 (N/4,) vec4 f32, out4 (M, N/4) vec4 f32
//                  register-blocked: a workgroup computes a BM x BN block of out from BK-deep slices of A and B
//                  staged in workgroup memory; each thread owns TM x TN outputs (scalar fma chains).
//                  Every stored row length (K or M for A, N or K for B, and N) must be a multiple of 4.
//                  Split-K: workgroup z sums only k in [z*chunk, (z+1)*chunk) and writes slab z of out4, which
//                  is then a scratch (n_slices, M, N/4) with HAS_BIAS and ACCUMULATE false; then
//   matmul_split_sum: split4 (n_slices, M, N/4) vec4 f32, bias4 (N/4,), out4 (M, N/4): out (+)= slabs summed in
//                  slice order (+ bias). More workgroups where out is small and K long (the weight gradients).
//   matmul_simple: a f32, b f32, bias (N,) f32, out (M, N) f32: one thread per output, any shape.
//                  The obviously correct reference the tiled kernel is tested against.
//   bias_grad_partial: dout (M, N) f32 -> partial (n_blocks, N) f32: column sums of blocks of chunk rows
//   bias_grad_sum:     partial (n_blocks, N) f32 -> dbias (N,) f32: dbias += blocks summed in order
// Each output is a fixed-order fma chain (per slice, slices then added in order), so runs are bit-identical.
// The bias binding is always bound (a dummy when HAS_BIAS is false).
//
// Fused epilogue (matmul_tiled without split-K, else matmul_split_sum), after bias and accumulation, on y, the
// value of out, with aux4 (M, N/4) vec4 f32 laid out as out (always bound: a dummy when EPILOGUE is 0):
//   EPILOGUE 1 GELU       out = y, aux4 = gelu(y)        c_fc forward: pre-activation and activation at once
//   EPILOGUE 2 RESIDUAL   out = y + aux4                 c_proj forward: the residual stream written directly
//   EPILOGUE 3 GELU_GRAD  out = y * gelu'(aux4)          mlp c_proj dinp (nt) times gelu' of the pre-activation
//   EPILOGUE 4 GELU_KEEP  out = gelu'(y), aux4 = gelu(y) c_fc forward in training: the activation, and in place of
//                                                       the pre-activation what the backward needs of it, from one tanh
//   EPILOGUE 5 MUL        out = y * aux4                 mlp c_proj dinp (nt) times the gelu' that GELU_KEEP stored
// gelu and gelu' are elementwise.wgsl's tanh formulas, copied (mm_gelu, mm_gelu_grad; mm_gelu_keep both at once).

struct MatmulParams {
    M: u32,
    N: u32,
    K: u32,
    chunk: u32,   // matmul_tiled: reduction length per slice (grid z, split-K); bias_grad_*: rows per block
}

@group(0) @binding(0) var<uniform> mp: MatmulParams;
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> a: array<f32>;
@group(0) @binding(6) var<storage, read> b: array<f32>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;
@group(0) @binding(8) var<storage, read_write> out: array<f32>;
@group(0) @binding(9) var<storage, read> dout: array<f32>;
@group(0) @binding(10) var<storage, read_write> partial: array<f32>;
@group(0) @binding(11) var<storage, read_write> dbias: array<f32>;
@group(0) @binding(12) var<storage, read> split4: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read_write> aux4: array<vec4<f32>>;   // EPILOGUE's operand, laid out as out4
// #if GROUPED
// The second product of a grouped matmul_tiled (below).
@group(0) @binding(14) var<storage, read> a4_2: array<vec4<f32>>;
@group(0) @binding(15) var<storage, read> b4_2: array<vec4<f32>>;
@group(0) @binding(16) var<uniform> mp2: MatmulParams;   // its M and N; K as mp's; chunk: its slabs' first vec4
// #endif

override A_T: bool = false;         // A stored (K, M)
override B_T: bool = false;         // B stored (N, K)
override HAS_BIAS: bool = false;    // out += bias broadcast over rows
override ACCUMULATE: bool = false;  // out += product (parameter gradients) instead of out = product
override BIAS_ROW: bool = false;    // with A_T: out has a last row more, (+)= the column sums of B (see matmul_tiled)
override EPILOGUE: u32 = 0u;        // then 0 none, 1 GELU, 2 RESIDUAL, 3 GELU_GRAD, 4 GELU_KEEP, 5 MUL (header)
override READS_AUX: bool = EPILOGUE == 2u || EPILOGUE == 3u || EPILOGUE == 5u;   // the epilogues that read aux4

// GROUPED, a conditional block (`// #if GROUPED`, kept only in the kernel compiled with that define: ops/matmul.py
// MatmulPair; gpu.select_blocks): matmul_tiled with A_T and split-K slabs makes two weight-gradient products with
// the same reduction length K and the same tiles in one dispatch, out1 (M, N) = A^T B (mp, a4, b4) and
// out2 (mp2.M, mp2.N) = A2^T B2 (mp2, a4_2, b4_2): the grid is (blocks of out1 + blocks of out2, 1, slices), and
// out4 gets the slabs of out1 from vec4 0 and those of out2 from vec4 mp2.chunk (then both summed by one
// matmul_split_sum of the same define). Two products that each fill a wave or less fill more of the GPU together
// (bench/results/h200/run29_merge_probe.txt: a product of twice the size takes 3-27% less than two). A block and
// not an override constant: the second product's code, even under a condition that is false once the pipeline is
// made, changed what NVIDIA's compiler made of the plain products (bench/results/h200/run30_grouped_kernel_*).
// #if GROUPED
var<private> second: bool;   // this workgroup makes the second product

// The dimensions of the product this workgroup makes.
fn dim_m() -> u32 { return select(mp.M, mp2.M, second); }

fn dim_n() -> u32 { return select(mp.N, mp2.N, second); }
// #endif

// BATCHED, a conditional block as GROUPED (ops/matmul.py BatchedMatmul): matmul_tiled makes one product per
// workgroup z, z = b * heads + h, each of strided matrices inside larger ones (the heads of attention): element
// (r, c) of the stored A at float a_off + r * lda + c of a4, a_off = a_0 + b * a_b + h * a_h, and likewise B
// (ldb, b_0, b_b, b_h) and out (ldc, c_0, c_b, c_h); no split-K, bias, accumulation or EPILOGUE (but SOFTMAX,
// below). Every stride and offset is a multiple of 4. A row's vec4 may run past its K (or M, N) columns into the
// row's padding, which must hold finite values: they meet zeros of the other operand, or land in padding of out.
// CAUSAL (z's products of causal attention, rows and columns both positions): 1 skips the blocks of out wholly
// above the diagonal (n0 > m0 + BM - 1: never read), 2 sums k from m0 only (tn: A^T's column k, a query, is zero
// before the key m0), 3 sums k below m0 + BM only (nn: A's row m, a query, is zero past key m).
// #if BATCHED
struct BatchParams {
    lda: u32, ldb: u32, ldc: u32, heads: u32,
    a_0: u32, a_b: u32, a_h: u32, b_0: u32,
    b_b: u32, b_h: u32, c_0: u32, c_b: u32,
    c_h: u32, _p0: u32, _p1: u32, _p2: u32,
}
@group(0) @binding(17) var<uniform> bp: BatchParams;
override CAUSAL: u32 = 0u;
var<private> a_off: u32;
var<private> b_off: u32;
var<private> c_off: u32;
// #endif

// SOFTMAX, with BATCHED (the causal attention backward's S = Q K^T and dP = dO V^T, ops/attention.py): the stores
// of out's element (z, m, n), z = b * heads + h, become masked softmax terms: with r = row_in[z * M + m] and
// scale = 1 / sqrt(K) (K the head size), P = exp(scale y - r) (r the row's log-sum-exp) or, SOFTMAX_DS,
// scale P (y - r) with P read from aux4 at out's place (r the row's delta = dO . O); zeros where n > m (past the
// diagonal, and in the rows' padding past N). So every block of out that is made holds P (scale dS) and zeros:
// the products that read them stay within such blocks (Attention checks it).
// #if SOFTMAX
@group(0) @binding(18) var<storage, read> row_in: array<f32>;
var<private> z_row: u32;   // z * M: this workgroup's first row of row_in

// Which of out's columns n..n+3 of row m are on or below the diagonal.
fn on_or_below(m: u32, n: u32) -> vec4<bool> {
    return vec4(n) + vec4(0u, 1u, 2u, 3u) <= vec4(m);
}

fn softmax_scale() -> f32 {
    return 1.0 / sqrt(f32(mp.K));
}
// #endif

// PAIRED, with BATCHED, tn only (the attention backward's dV = P^T dO and dK = dS^T Q, ops/attention.py): two
// batched products of the same shape in one dispatch, z < nwg.z / 2 the first (a4, b4, bp), the others the second
// (a4_2, b4_2 and the strides and offsets of bp2, but out's row length bp.ldc), both into out4: the last wave of
// each small grid fills with the other's workgroups (on an H200 the attention backward 4-6% faster than with the
// two apart: bench/results/h200/run47_batched_pair_probe.txt, run48_attention_pair.txt).
// #if PAIRED
@group(0) @binding(14) var<storage, read> a4_2: array<vec4<f32>>;
@group(0) @binding(15) var<storage, read> b4_2: array<vec4<f32>>;
@group(0) @binding(19) var<uniform> bp2: BatchParams;
var<private> second: bool;   // this workgroup makes the second product
// #endif

// ---------------------------------------------------------------------------------------------
// Register-blocked, workgroup-tiled product. Tile sizes are override constants so that each adapter can
// get its own: BM % TM == 0, BN % TN == 0, TM in {4, 8}, TN in {4, 8, 16}, BK % 4 == 0, (BM/TM)*(BN/TN) <= 256
// threads, 4*BK*(BM+BN) bytes of workgroup memory.
// A thread owns TM/4 groups of 4 rows and TN/4 groups of 4 columns. SPREAD false: adjacent groups (rows
// ty*TM.., columns tx*TN..); SPREAD true: groups half a block apart (rows 4ty.. and 4ty + BM/2.., columns
// 4tx.. and 4tx + BN/2..), so that neighbouring threads read neighbouring vec4s of the tiles (no bank
// conflicts) and store neighbouring vec4s of out.
// PREFETCH: the next BK slice is read from global memory into registers while the current one is multiplied
// (at most 4 vec4s per thread and operand: BK*BM/4 and BK*BN/4 <= 4 * threads).
// DOUBLE_BUFFER (only with PREFETCH; ignored without it): two copies of each tile, 8*BK*(BM+BN) bytes of
// workgroup memory. Slice i is multiplied from copy i & 1 while the registers holding slice i+1 go into the
// other copy, then ONE barrier per slice instead of two. Same fma chains in the same order: bit-identical to
// PREFETCH alone with the same tiles.
// ROWS: where a fetched vec4 runs along k (A stored (M, K), B stored (N, K)), its 4 values are stored to 4
// k-rows of the tile one by one. By default neighbouring threads take neighbouring vec4s of a row, whose stores
// land on a few banks of workgroup memory (4-way conflicts at BM = 128); with ROWS they take neighbouring rows,
// whose stores land on neighbouring banks (global reads: 16 bytes from each of 32 rows instead of 64 bytes from
// each of 8). The products are the same, in the same order.
// GROUP: the order in which workgroups take the blocks of out. GPUs start workgroups in id order, x fastest;
// with the plain order (GROUP = 1: block row wg.y, column wg.x) the workgroups running at one time cover a few
// block rows across all of B's columns. With GROUP = 8 they go down 8 block rows of one block column, then the
// next column: the blocks in flight together share more of A's and B's tiles in the GPU's cache. 2% faster at
// 4096^3 on an H200 (79% -> 81% of cuBLAS), 1-2% on the other shapes measured; the same values either way.

override BM: u32 = 64u;
override BN: u32 = 64u;
override BK: u32 = 8u;
override TM: u32 = 4u;
override TN: u32 = 4u;
override SPREAD: bool = false;
override PREFETCH: bool = false;
override DOUBLE_BUFFER: bool = false;
override ROWS: bool = false;
override FENCE: bool = false;   // the next row's tile reads ordered after the row's first fma (below)
override ROW_STEP: bool = true;  // the next row's tile indices stepped by one add per row (below)
override GROUP: u32 = 8u;        // block rows per group of the workgroups' order (above); 1: the plain order
override LEAN: bool = true;      // PREFETCH's global reads planned once (plan_a, plan_b below)
override DB: bool = DOUBLE_BUFFER && PREFETCH;   // double buffering in effect
override N_BUF: u32 = select(1u, 2u, DB);        // copies of each tile
override WG_X: u32 = BN / TN;
override WG_Y: u32 = BM / TM;
override N_THREADS: u32 = WG_X * WG_Y;
override BIAS_G: u32 = N_THREADS / (BN / 4u);   // BIAS_ROW's row groups of threads (N_THREADS >= BN / 4)

// Slices of op(A) and op(B), k-major: as_tile[kk][m] and bs_tile[kk][n], as vec4 along m and n; with DB two
// copies one after the other (copy c starts at vec4 c*BK*BM/4 of as_tile and c*BK*BN/4 of bs_tile).
var<workgroup> as_tile: array<vec4<f32>, N_BUF * BK * BM / 4u>;
var<workgroup> bs_tile: array<vec4<f32>, N_BUF * BK * BN / 4u>;

// Vec4 number v (< BK*BM/4) of the op(A) slice at (m0, k0), read from global memory (zeros outside).
fn fetch_a(m0: u32, k0: u32, v: u32) -> vec4<f32> {
    var x = vec4(0.0);
    if (A_T) {
        // A (K, M): a vec4 runs along m, and lands as it is.
        // BIAS_ROW: A has mp.M - 1 columns (out's last row is the bias gradient's, made apart).
        let k = k0 + v / (BM / 4u);
        let m = m0 + 4u * (v % (BM / 4u));
        // #if GROUPED
        let cols = select(dim_m(), dim_m() - 1u, BIAS_ROW);
        if (k < mp.K && m < cols) {
            if (second) { x = a4_2[(k * cols + m) / 4u]; } else { x = a4[(k * cols + m) / 4u]; }
        }
        // #elif PAIRED
        if (k < mp.K && m < mp.M) {
            if (second) { x = a4_2[(a_off + k * bp2.lda + m) / 4u]; } else { x = a4[(a_off + k * bp.lda + m) / 4u]; }
        }
        // #elif BATCHED
        if (k < mp.K && m < mp.M) { x = a4[(a_off + k * bp.lda + m) / 4u]; }
        // #else
        let cols = select(mp.M, mp.M - 1u, BIAS_ROW);
        if (k < mp.K && m < cols) { x = a4[(k * cols + m) / 4u]; }
        // #endif
    } else {
        // A (M, K): a vec4 runs along k; its 4 values go to 4 k-rows of the tile.
        var m = m0 + v / (BK / 4u);
        var k = k0 + 4u * (v % (BK / 4u));
        if (ROWS) {
            m = m0 + v % BM;
            k = k0 + 4u * (v / BM);
        }
        // #if BATCHED
        if (m < mp.M && k < mp.K) { x = a4[(a_off + m * bp.lda + k) / 4u]; }
        // #else
        if (m < mp.M && k < mp.K) { x = a4[(m * mp.K + k) / 4u]; }
        // #endif
    }
    return x;
}

// Vec4 v of a fetched op(A) slice into the tile copy starting at vec4 o of as_tile.
fn put_a(o: u32, v: u32, x: vec4<f32>) {
    if (A_T) {
        as_tile[o + v] = x;
    } else {
        // float base of the tile: row k (4 rows, BM floats apart), column m; vec4 r, component c
        let base = select(4u * (v % (BK / 4u)) * BM + v / (BK / 4u), 4u * (v / BM) * BM + v % BM, ROWS);
        let r = o + base / 4u;
        let c = base % 4u;
        as_tile[r][c] = x.x;
        as_tile[r + BM / 4u][c] = x.y;
        as_tile[r + 2u * (BM / 4u)][c] = x.z;
        as_tile[r + 3u * (BM / 4u)][c] = x.w;
    }
}

// The same for op(B) at (k0, n0), v < BK*BN/4.
fn fetch_b(n0: u32, k0: u32, v: u32) -> vec4<f32> {
    var x = vec4(0.0);
    if (B_T) {
        // B (N, K): a vec4 runs along k.
        var n = n0 + v / (BK / 4u);
        var k = k0 + 4u * (v % (BK / 4u));
        if (ROWS) {
            n = n0 + v % BN;
            k = k0 + 4u * (v / BN);
        }
        // #if BATCHED
        if (n < mp.N && k < mp.K) { x = b4[(b_off + n * bp.ldb + k) / 4u]; }
        // #else
        if (n < mp.N && k < mp.K) { x = b4[(n * mp.K + k) / 4u]; }
        // #endif
    } else {
        // B (K, N): a vec4 runs along n.
        let k = k0 + v / (BN / 4u);
        let n = n0 + 4u * (v % (BN / 4u));
        // #if GROUPED
        let nn = dim_n();
        if (k < mp.K && n < nn) {
            if (second) { x = b4_2[(k * nn + n) / 4u]; } else { x = b4[(k * nn + n) / 4u]; }
        }
        // #elif PAIRED
        if (k < mp.K && n < mp.N) {
            if (second) { x = b4_2[(b_off + k * bp2.ldb + n) / 4u]; } else { x = b4[(b_off + k * bp.ldb + n) / 4u]; }
        }
        // #elif BATCHED
        if (k < mp.K && n < mp.N) { x = b4[(b_off + k * bp.ldb + n) / 4u]; }
        // #else
        if (k < mp.K && n < mp.N) { x = b4[(k * mp.N + n) / 4u]; }
        // #endif
    }
    return x;
}

// LEAN (with PREFETCH): each prefetch register's global reads planned once, before the loop over slices, instead
// of fetch_a / fetch_b working out row, column, bounds and index from scratch for every slice: Plan's i is the vec4
// of a4 (b4) the register reads for the first slice, step how far it moves each slice, and the register reads
// while k0 < lim (the slice's k and the register's row or column in range; lim 0: never). The same values land in
// the same registers: bit-identical to fetch_a / fetch_b. Every stored row length and offset is a multiple of 4,
// so (offset + row * length + column) / 4 moves by BK * length / 4 (A_T; B not B_T) or BK / 4 a slice.
struct Plan { i: u32, lim: u32, step: u32 }

fn plan_a(m0: u32, k0: u32, v: u32) -> Plan {
    let ok = v < BK * BM / 4u;
    if (A_T) {
        let kr = v / (BM / 4u);
        let m = m0 + 4u * (v % (BM / 4u));
        // #if GROUPED
        let cols = select(dim_m(), dim_m() - 1u, BIAS_ROW);
        let lda = cols;
        let i = (k0 + kr) * lda + m;
        // #elif PAIRED
        let cols = mp.M;
        let lda = select(bp.lda, bp2.lda, second);
        let i = a_off + (k0 + kr) * lda + m;
        // #elif BATCHED
        let cols = mp.M;
        let lda = bp.lda;
        let i = a_off + (k0 + kr) * lda + m;
        // #else
        let cols = select(mp.M, mp.M - 1u, BIAS_ROW);
        let lda = cols;
        let i = (k0 + kr) * lda + m;
        // #endif
        return Plan(i / 4u, select(0u, mp.K - kr, ok && m < cols && kr < mp.K), BK * (lda / 4u));
    }
    var m = m0 + v / (BK / 4u);
    var kq = 4u * (v % (BK / 4u));
    if (ROWS) {
        m = m0 + v % BM;
        kq = 4u * (v / BM);
    }
    // #if BATCHED
    let i = a_off + m * bp.lda + k0 + kq;
    // #else
    let i = m * mp.K + k0 + kq;
    // #endif
    return Plan(i / 4u, select(0u, mp.K - kq, ok && m < mp.M && kq < mp.K), BK / 4u);
}

fn plan_b(n0: u32, k0: u32, v: u32) -> Plan {
    let ok = v < BK * BN / 4u;
    if (B_T) {
        var n = n0 + v / (BK / 4u);
        var kq = 4u * (v % (BK / 4u));
        if (ROWS) {
            n = n0 + v % BN;
            kq = 4u * (v / BN);
        }
        // #if BATCHED
        let i = b_off + n * bp.ldb + k0 + kq;
        // #else
        let i = n * mp.K + k0 + kq;
        // #endif
        return Plan(i / 4u, select(0u, mp.K - kq, ok && n < mp.N && kq < mp.K), BK / 4u);
    }
    let kr = v / (BN / 4u);
    let n = n0 + 4u * (v % (BN / 4u));
    // #if GROUPED
    let cols = dim_n();
    let ldb = cols;
    let i = (k0 + kr) * ldb + n;
    // #elif PAIRED
    let cols = mp.N;
    let ldb = select(bp.ldb, bp2.ldb, second);
    let i = b_off + (k0 + kr) * ldb + n;
    // #elif BATCHED
    let cols = mp.N;
    let ldb = bp.ldb;
    let i = b_off + (k0 + kr) * ldb + n;
    // #else
    let cols = mp.N;
    let ldb = cols;
    let i = (k0 + kr) * ldb + n;
    // #endif
    return Plan(i / 4u, select(0u, mp.K - kr, ok && n < cols && kr < mp.K), BK * (ldb / 4u));
}

// A planned read for the slice at k0 (zeros where the plan says out of range), and the plan moved to the next slice.
fn read_a(p: ptr<function, Plan>, k0: u32) -> vec4<f32> {
    var x = vec4(0.0);
    if (k0 < (*p).lim) {
        // #if GROUPED || PAIRED
        if (second) { x = a4_2[(*p).i]; } else { x = a4[(*p).i]; }
        // #else
        x = a4[(*p).i];
        // #endif
    }
    (*p).i += (*p).step;
    return x;
}

fn read_b(p: ptr<function, Plan>, k0: u32) -> vec4<f32> {
    var x = vec4(0.0);
    if (k0 < (*p).lim) {
        // #if GROUPED || PAIRED
        if (second) { x = b4_2[(*p).i]; } else { x = b4[(*p).i]; }
        // #else
        x = b4[(*p).i];
        // #endif
    }
    (*p).i += (*p).step;
    return x;
}

fn put_b(o: u32, v: u32, x: vec4<f32>) {
    if (B_T) {
        let base = select(4u * (v % (BK / 4u)) * BN + v / (BK / 4u), 4u * (v / BN) * BN + v % BN, ROWS);
        let r = o + base / 4u;
        let c = base % 4u;
        bs_tile[r][c] = x.x;
        bs_tile[r + BN / 4u][c] = x.y;
        bs_tile[r + 2u * (BN / 4u)][c] = x.z;
        bs_tile[r + 3u * (BN / 4u)][c] = x.w;
    } else {
        bs_tile[o + v] = x;
    }
}

// Stage the BK-deep slice starting at k0 of op(A) rows m0.. and op(B) columns n0.. (zeros outside).
fn load_tiles(m0: u32, n0: u32, k0: u32, tid: u32) {
    for (var v = tid; v < BK * BM / 4u; v += N_THREADS) { put_a(0u, v, fetch_a(m0, k0, v)); }
    for (var v = tid; v < BK * BN / 4u; v += N_THREADS) { put_b(0u, v, fetch_b(n0, k0, v)); }
}

// A thread's prefetch registers (vec4s va.x, va.y, ... of the slice; n_a and n_b of them) into the tile copies
// at vec4 oa of as_tile and ob of bs_tile. A thread's last vec4 may lie past the slice when threads do not
// divide it. Registers pass by value: every index stays constant.
fn put_regs(oa: u32, ob: u32, va: vec4u, n_a: u32, n_b: u32, pa0: vec4<f32>, pa1: vec4<f32>, pa2: vec4<f32>,
            pa3: vec4<f32>, pb0: vec4<f32>, pb1: vec4<f32>, pb2: vec4<f32>, pb3: vec4<f32>) {
    let ta = BK * BM / 4u;
    let tb = BK * BN / 4u;
    if (va.x < ta) { put_a(oa, va.x, pa0); }
    if (n_a > 1u && va.y < ta) { put_a(oa, va.y, pa1); }
    if (n_a > 2u && va.z < ta) { put_a(oa, va.z, pa2); }
    if (n_a > 3u && va.w < ta) { put_a(oa, va.w, pa3); }
    if (va.x < tb) { put_b(ob, va.x, pb0); }
    if (n_b > 1u && va.y < tb) { put_b(ob, va.y, pb1); }
    if (n_b > 2u && va.z < tb) { put_b(ob, va.z, pb2); }
    if (n_b > 3u && va.w < tb) { put_b(ob, va.w, pb3); }
}

// acc + x * y for one output row and 4 columns, as 4 scalar fma: scalar chains are far faster than vec4 fma
// on NVIDIA through Vulkan. (Parameter names differ from the bindings': entry point layouts are found by name.)
fn outer4(acc: vec4<f32>, x: f32, y: vec4<f32>) -> vec4<f32> {
    return vec4(fma(x, y.x, acc.x), fma(x, y.y, acc.y), fma(x, y.z, acc.z), fma(x, y.w, acc.w));
}

// GELU, tanh form, and its derivative: elementwise.wgsl's gelu and gelu_grad, the same expressions.
const MM_GELU_SCALE: f32 = 0.7978845608028654;   // sqrt(2 / pi)

// gelu(x) and gelu'(x) at once, from one tanh (GELU_KEEP); mm_gelu and mm_gelu_grad take one of them (the
// compiler drops the other's arithmetic).
struct GeluKeep { value: vec4<f32>, grad: vec4<f32> }

fn mm_gelu_keep(x: vec4<f32>) -> GeluKeep {
    let u = MM_GELU_SCALE * (x + 0.044715 * x * x * x);
    let t = tanh(clamp(u, vec4(-10.0), vec4(10.0)));
    let du = MM_GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x);
    return GeluKeep(0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
}

fn mm_gelu(x: vec4<f32>) -> vec4<f32> {
    return mm_gelu_keep(x).value;
}

fn mm_gelu_grad(x: vec4<f32>) -> vec4<f32> {
    return mm_gelu_keep(x).grad;
}

// The fused epilogue on the final value y of out4[o] (after bias and accumulation), aux = aux4[o] read beforehand
// (RESIDUAL, GELU_GRAD, MUL): returns what out4[o] gets (GELU and GELU_KEEP also write aux4[o]). store_pre and
// matmul_split_sum.
fn epilogue4(o: u32, y: vec4<f32>, aux: vec4<f32>) -> vec4<f32> {
    if (EPILOGUE == 1u) { aux4[o] = mm_gelu(y); }
    if (EPILOGUE == 2u) { return y + aux; }
    if (EPILOGUE == 3u) { return y * mm_gelu_grad(aux); }
    if (EPILOGUE == 4u) {
        let g = mm_gelu_keep(y);
        aux4[o] = g.value;
        return g.grad;
    }
    if (EPILOGUE == 5u) { return y * aux; }
    return y;
}

// out4's index of out[m, n..n+4] (in the slab) and whether it is inside out: N % 4 == 0, so 4 columns are wholly
// inside or wholly outside.
fn out_at(slab: u32, m: u32, n: u32) -> u32 {
    // #if GROUPED
    return slab + (m * dim_n() + n) / 4u;
    // #elif BATCHED
    return (c_off + m * bp.ldc + n) / 4u;
    // #else
    return slab + (m * mp.N + n) / 4u;
    // #endif
}

fn out_has(m: u32, n: u32) -> bool {
    // #if GROUPED
    return m < select(dim_m(), dim_m() - 1u, BIAS_ROW) && n < dim_n();
    // #else
    return m < select(mp.M, mp.M - 1u, BIAS_ROW) && n < mp.N;
    // #endif
}

// What storing out4[o] reads first: out4[o] itself (ACCUMULATE) and aux4[o] (the RESIDUAL, GELU_GRAD and MUL
// epilogues, SOFTMAX_DS), zeros where not read or outside out.
struct Pre { acc: vec4<f32>, aux: vec4<f32> }

fn pre_read(inside: bool, o: u32) -> Pre {
    var p = Pre(vec4(0.0), vec4(0.0));
    if (inside) {
        if (ACCUMULATE) { p.acc = out4[o]; }
        if (READS_AUX) { p.aux = aux4[o]; }
        // #if SOFTMAX_DS
        p.aux = aux4[o];
        // #endif
    }
    return p;
}

// out[m, n..n+4] (+)= v (+ bias4[n / 4], read beforehand as bv), if inside, from its reads p (pre_read): then the
// epilogue (EPILOGUE is 0 with split-K: the slabs are partial sums).
fn store_pre(o: u32, inside: bool, m: u32, n: u32, v: vec4<f32>, bv: vec4<f32>, p: Pre) {
    if (!inside) { return; }
    var y = v;
    if (HAS_BIAS) { y += bv; }
    if (ACCUMULATE) { y += p.acc; }
    if (EPILOGUE != 0u) { y = epilogue4(o, y, p.aux); }
    // #if SOFTMAX_DS
    y = select(vec4(0.0), softmax_scale() * p.aux * (y - row_in[z_row + m]), on_or_below(m, n));
    // #elif SOFTMAX
    y = select(vec4(0.0), exp(softmax_scale() * y - row_in[z_row + m]), on_or_below(m, n));
    // #endif
    out4[o] = y;
}

// Rows m .. m + 3 of out at columns n .. n + 3 from v0 .. v3: the four rows' reads (and the bias) first, then
// their stores, so that the reads are in flight together, where storing row by row (each row's read, then its
// store) could wait for each read in turn. The same values either way (bench/results/h200/run81_*).
fn store_rows4(slab: u32, m: u32, n: u32, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) {
    let o0 = out_at(slab, m, n);
    let o1 = out_at(slab, m + 1u, n);
    let o2 = out_at(slab, m + 2u, n);
    let o3 = out_at(slab, m + 3u, n);
    let in0 = out_has(m, n);
    let in1 = out_has(m + 1u, n);
    let in2 = out_has(m + 2u, n);
    let in3 = out_has(m + 3u, n);
    let p0 = pre_read(in0, o0);
    let p1 = pre_read(in1, o1);
    let p2 = pre_read(in2, o2);
    let p3 = pre_read(in3, o3);
    var bv = vec4(0.0);
    if (HAS_BIAS && in0) { bv = bias4[n / 4u]; }
    store_pre(o0, in0, m, n, v0, bv, p0);
    store_pre(o1, in1, m + 1u, n, v1, bv, p1);
    store_pre(o2, in2, m + 2u, n, v2, bv, p2);
    store_pre(o3, in3, m + 3u, n, v3, bv, p3);
}

// BIAS_ROW: out's last row (mp.M - 1)[n..n+4] (+)= v.
fn store_bias_row(slab: u32, n: u32, v: vec4<f32>) {
    // #if GROUPED
    if (n >= dim_n()) { return; }
    let o = slab + ((dim_m() - 1u) * dim_n() + n) / 4u;
    // #else
    if (n >= mp.N) { return; }
    let o = slab + ((mp.M - 1u) * mp.N + n) / 4u;
    // #endif
    var y = v;
    if (ACCUMULATE) { y += out4[o]; }
    out4[o] = y;
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_tiled(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                @builtin(local_invocation_id) lid: vec3u) {
    // GROUP: workgroup id w = wg.y nwg.x + wg.x takes block (by, bx): groups of GROUP block rows (fewer in the
    // last), column by column within a group, down the group's rows within a column.
    // #if GROUPED
    // grid (blocks of out1 + blocks of out2, 1, slices): the first product's blocks, then the second's
    let gx1 = (mp.N + BN - 1u) / BN;
    let gy1 = (select(mp.M, mp.M - 1u, BIAS_ROW) + BM - 1u) / BM;
    second = wg.x >= gx1 * gy1;
    let gx = select(gx1, (mp2.N + BN - 1u) / BN, second);   // the product's blocks along x and y
    let gy = select(gy1, (select(mp2.M, mp2.M - 1u, BIAS_ROW) + BM - 1u) / BM, second);
    let w = select(wg.x, wg.x - gx1 * gy1, second);
    let group = w / (GROUP * gx);
    let first = group * GROUP;
    let rows = min(gy - first, GROUP);
    let r = w - group * GROUP * gx;
    // #else
    let w = wg.y * nwg.x + wg.x;
    let group = w / (GROUP * nwg.x);
    let first = group * GROUP;
    let rows = min(nwg.y - first, GROUP);
    let r = w - group * GROUP * nwg.x;
    // #endif
    let by = first + r % rows;
    let bx = r / rows;
    // #if BATCHED
    // CAUSAL 3: the block rows in reverse, the longest reductions (down to the last row) first, so that a product's
    // last workgroups are short ones (at T = 256 the attention backward 0.341-0.349 -> 0.326-0.328 ms on an H200:
    // bench/results/h200/run43_dq_longest_first.txt).
    let m0 = select(by, nwg.y - 1u - by, CAUSAL == 3u) * BM;
    // #else
    let m0 = by * BM;
    // #endif
    let n0 = bx * BN;
    let tid = lid.y * WG_X + lid.x;
    // #if PAIRED
    second = wg.z >= nwg.z / 2u;
    let z = select(wg.z, wg.z - nwg.z / 2u, second);
    let batch = z / bp.heads;
    let head = z % bp.heads;
    if (second) {
        a_off = bp2.a_0 + batch * bp2.a_b + head * bp2.a_h;
        b_off = bp2.b_0 + batch * bp2.b_b + head * bp2.b_h;
        c_off = bp2.c_0 + batch * bp2.c_b + head * bp2.c_h;
    } else {
        a_off = bp.a_0 + batch * bp.a_b + head * bp.a_h;
        b_off = bp.b_0 + batch * bp.b_b + head * bp.b_h;
        c_off = bp.c_0 + batch * bp.c_b + head * bp.c_h;
    }
    // #elif BATCHED
    let batch = wg.z / bp.heads;
    let head = wg.z % bp.heads;
    a_off = bp.a_0 + batch * bp.a_b + head * bp.a_h;
    b_off = bp.b_0 + batch * bp.b_b + head * bp.b_h;
    c_off = bp.c_0 + batch * bp.c_b + head * bp.c_h;
    // #endif
    // #if SOFTMAX
    z_row = wg.z * mp.M;
    // #endif
    // #if BATCHED
    if (CAUSAL == 1u && n0 > m0 + BM - 1u) { return; }   // the whole workgroup: before any barrier
    let k_begin = select(0u, m0, CAUSAL == 2u);
    let k_end = select(mp.K, min(mp.K, m0 + BM), CAUSAL == 3u);
    // #else
    // Split-K: workgroup z sums k in [k_begin, k_end) into slab z of out (M, N); chunk is a multiple of BK.
    let k_begin = wg.z * mp.chunk;
    let k_end = min(mp.K, k_begin + mp.chunk);
    // #endif
    // #if GROUPED
    let slab = select(0u, mp2.chunk, second) + wg.z * dim_m() * (dim_n() / 4u);
    // #elif BATCHED
    let slab = 0u;
    // #else
    let slab = wg.z * mp.M * (mp.N / 4u);
    // #endif
    // The thread's vec4 groups of rows (ga_lo, ga_hi < BM/4) and columns (gb_lo, gb_hi < BN/4).
    let ga_lo = select(lid.y * (TM / 4u), lid.y, SPREAD);
    let gb_lo = select(lid.x * (TN / 4u), lid.x, SPREAD);
    let ga_hi = select(ga_lo + 1u, ga_lo + BM / 8u, SPREAD);
    // TN = 16: four column groups gb_lo, gb_hi, gb_2, gb_3, a quarter block apart with SPREAD.
    let gb_step = select(1u, BN / (4u * (TN / 4u)), SPREAD);
    let gb_hi = gb_lo + gb_step;
    let gb_2 = gb_lo + 2u * gb_step;
    let gb_3 = gb_lo + 3u * gb_step;
    // acc[2 * i + q]: row i of the thread's TM rows, column group q; zero-initialised.
    // Every index below is a constant (the code is unrolled by hand), so the array lives in registers: one
    // dynamic index anywhere would move it to slow local memory. The same holds for the prefetch registers.
    // TN = 16 adds acc[16 + 2 * i + q - 2] for column groups q = 2, 3.
    var acc: array<vec4<f32>, 32>;
    let n_a = (BK * BM / 4u + N_THREADS - 1u) / N_THREADS;   // vec4s per thread and slice (<= 4 with PREFETCH)
    let n_b = (BK * BN / 4u + N_THREADS - 1u) / N_THREADS;
    let va = vec4(tid) + vec4(0u, N_THREADS, 2u * N_THREADS, 3u * N_THREADS);
    var pa0 = vec4(0.0);
    var pa1 = vec4(0.0);
    var pa2 = vec4(0.0);
    var pa3 = vec4(0.0);
    var pb0 = vec4(0.0);
    var pb1 = vec4(0.0);
    var pb2 = vec4(0.0);
    var pb3 = vec4(0.0);
    // LEAN: the registers' plans (those past n_a, n_b unused).
    var qa0 = plan_a(m0, k_begin, va.x);
    var qa1 = plan_a(m0, k_begin, va.y);
    var qa2 = plan_a(m0, k_begin, va.z);
    var qa3 = plan_a(m0, k_begin, va.w);
    var qb0 = plan_b(n0, k_begin, va.x);
    var qb1 = plan_b(n0, k_begin, va.y);
    var qb2 = plan_b(n0, k_begin, va.z);
    var qb3 = plan_b(n0, k_begin, va.w);
    if (PREFETCH && LEAN) {
        pa0 = read_a(&qa0, k_begin);
        if (n_a > 1u) { pa1 = read_a(&qa1, k_begin); }
        if (n_a > 2u) { pa2 = read_a(&qa2, k_begin); }
        if (n_a > 3u) { pa3 = read_a(&qa3, k_begin); }
        pb0 = read_b(&qb0, k_begin);
        if (n_b > 1u) { pb1 = read_b(&qb1, k_begin); }
        if (n_b > 2u) { pb2 = read_b(&qb2, k_begin); }
        if (n_b > 3u) { pb3 = read_b(&qb3, k_begin); }
    } else if (PREFETCH && k_begin < k_end) {
        pa0 = fetch_a(m0, k_begin, va.x);
        if (n_a > 1u) { pa1 = fetch_a(m0, k_begin, va.y); }
        if (n_a > 2u) { pa2 = fetch_a(m0, k_begin, va.z); }
        if (n_a > 3u) { pa3 = fetch_a(m0, k_begin, va.w); }
        pb0 = fetch_b(n0, k_begin, va.x);
        if (n_b > 1u) { pb1 = fetch_b(n0, k_begin, va.y); }
        if (n_b > 2u) { pb2 = fetch_b(n0, k_begin, va.z); }
        if (n_b > 3u) { pb3 = fetch_b(n0, k_begin, va.w); }
    }

    // DB: slice 0 into copy 0 before the loop. Then per slice i (from copy cur = i & 1): loads of slice i+1 into
    // the registers, the products of slice i, the registers into copy cur ^ 1, one barrier. Copy cur ^ 1 was
    // last read by the products of slice i-1, which every thread finished before the barrier ending slice i-1;
    // copy cur is next written in slice i+1, after the barrier ending slice i.
    if (DB) {
        put_regs(0u, 0u, va, n_a, n_b, pa0, pa1, pa2, pa3, pb0, pb1, pb2, pb3);
        workgroupBarrier();
    }
    let kzero = mp.K >> 31u;   // FENCE: 0
    var cur = 0u;   // DB: the tile copy of the slice being multiplied
    // BIAS_ROW: the first block row's workgroups also sum B's columns over k for out's last row. Thread tid =
    // g * BN/4 + c (g < BIAS_G row groups) adds rows g, g + BIAS_G, ... of each slice's column vec4 c, after the
    // slice's products; the groups' sums are added in order after the loop. So every warp takes a share outside
    // the loop over rows (one row of threads taking it all inside that loop held every warp at the barriers).
    var bsum = vec4(0.0);
    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        if (!PREFETCH) {
            load_tiles(m0, n0, k0, tid);
            workgroupBarrier();
        } else if (!DB) {
            put_regs(0u, 0u, va, n_a, n_b, pa0, pa1, pa2, pa3, pb0, pb1, pb2, pb3);
            workgroupBarrier();
        }
        // PREFETCH: the next slice's loads are in flight while this one is multiplied. They are made in the
        // last slice too (in range or zeros, and unused): guarded by k1 < k_end, the registers took a phi with
        // their old values, and NVIDIA's compiler resolved it with copies that waited for the loads before the
        // products (bench/sass.py; 5% of a training step on an H100).
        let k1 = k0 + BK;
        if (PREFETCH && LEAN) {
            pa0 = read_a(&qa0, k1);
            if (n_a > 1u) { pa1 = read_a(&qa1, k1); }
            if (n_a > 2u) { pa2 = read_a(&qa2, k1); }
            if (n_a > 3u) { pa3 = read_a(&qa3, k1); }
            pb0 = read_b(&qb0, k1);
            if (n_b > 1u) { pb1 = read_b(&qb1, k1); }
            if (n_b > 2u) { pb2 = read_b(&qb2, k1); }
            if (n_b > 3u) { pb3 = read_b(&qb3, k1); }
        } else if (PREFETCH) {
            pa0 = fetch_a(m0, k1, va.x);
            if (n_a > 1u) { pa1 = fetch_a(m0, k1, va.y); }
            if (n_a > 2u) { pa2 = fetch_a(m0, k1, va.z); }
            if (n_a > 3u) { pa3 = fetch_a(m0, k1, va.w); }
            pb0 = fetch_b(n0, k1, va.x);
            if (n_b > 1u) { pb1 = fetch_b(n0, k1, va.y); }
            if (n_b > 2u) { pb2 = fetch_b(n0, k1, va.z); }
            if (n_b > 3u) { pb3 = fetch_b(n0, k1, va.w); }
        }
        let oa = select(0u, cur * (BK * BM / 4u), DB);   // this slice's tile copy
        let ob = select(0u, cur * (BK * BN / 4u), DB);
        // The tile values of row kk are read during row kk - 1's products (software pipelining: the reads'
        // latency hides behind the fmas; 10% faster on an H100 than reading them at the top of each row).
        // ia, ib: the as_tile and bs_tile indices of the thread's first vec4 (ga_lo, gb_lo) of the row read next;
        // its other vec4s lie at constant distances (da, gb_step) from it.
        var ia = oa + ga_lo;
        var ib = ob + gb_lo;
        let da = ga_hi - ga_lo;
        var f_a_lo = as_tile[ia];
        var f_b_lo = bs_tile[ib];
        var f_a_hi = vec4(0.0);
        var f_b_hi = vec4(0.0);
        var f_b_2 = vec4(0.0);
        var f_b_3 = vec4(0.0);
        if (TM == 8u) { f_a_hi = as_tile[ia + da]; }
        if (TN >= 8u) { f_b_hi = bs_tile[ib + gb_step]; }
        if (TN == 16u) {
            f_b_2 = bs_tile[ib + 2u * gb_step];
            f_b_3 = bs_tile[ib + 3u * gb_step];
        }
        // LITERAL (a tile flag, ops/matmul.py): the BK rows written out (gpu.unroll_loops), each row's indices
        // constants; else a loop, which NVIDIA's compiler keeps as one.
        // #unroll LITERAL BK
        for (var kk = 0u; kk < BK; kk++) {
            let a_lo = f_a_lo;
            let b_lo = f_b_lo;
            let a_hi = f_a_hi;
            let b_hi = f_b_hi;
            let b_2 = f_b_2;
            let b_3 = f_b_3;
            // FENCE: the row's first fma before the next row's reads, whose addresses depend on its result
            // through a term that is always 0 (kzero: K < 2^31) but unknown to the compiler, so that they cannot
            // be moved above it. NVIDIA's compiler then orders the loop otherwise; faster on some shapes, slower
            // on others (bench_matmul_variants.py fence): the autotuner tries it on its fastest tile shape
            // (TUNE_REFINE in ops/matmul.py). acc[0] sees the same fmas in the same order.
            if (FENCE) { acc[0] = outer4(acc[0], a_lo.x, b_lo); }
            // ROW_STEP: ia and ib step one row ahead (one add each per row; the row's other reads at constant
            // offsets from them); else the row's indices are made from kk each time.
            ia += BM / 4u;
            ib += BN / 4u;
            if (kk + 1u < BK) {
                let dep = select(0u, bitcast<u32>(acc[0].x) & kzero, FENCE);
                let ra = select(oa + (kk + 1u) * (BM / 4u) + ga_lo, ia, ROW_STEP) + dep;
                let rb = select(ob + (kk + 1u) * (BN / 4u) + gb_lo, ib, ROW_STEP) + dep;
                f_a_lo = as_tile[ra];
                f_b_lo = bs_tile[rb];
                if (TM == 8u) { f_a_hi = as_tile[ra + da]; }
                if (TN >= 8u) { f_b_hi = bs_tile[rb + gb_step]; }
                if (TN == 16u) {
                    f_b_2 = bs_tile[rb + 2u * gb_step];
                    f_b_3 = bs_tile[rb + 3u * gb_step];
                }
            }
            // Row by row, both column groups of a row together: the order NVIDIA's compiler made the fastest code
            // of on an H200 (1-2% over column group by column group; bench_matmul_variants.py rowmajor). The
            // order changes no accumulator's chain.
            if (!FENCE) { acc[0] = outer4(acc[0], a_lo.x, b_lo); }
            if (TN >= 8u) { acc[1] = outer4(acc[1], a_lo.x, b_hi); }
            acc[2] = outer4(acc[2], a_lo.y, b_lo);
            if (TN >= 8u) { acc[3] = outer4(acc[3], a_lo.y, b_hi); }
            acc[4] = outer4(acc[4], a_lo.z, b_lo);
            if (TN >= 8u) { acc[5] = outer4(acc[5], a_lo.z, b_hi); }
            acc[6] = outer4(acc[6], a_lo.w, b_lo);
            if (TN >= 8u) { acc[7] = outer4(acc[7], a_lo.w, b_hi); }
            if (TM == 8u) {
                acc[8] = outer4(acc[8], a_hi.x, b_lo);
                if (TN >= 8u) { acc[9] = outer4(acc[9], a_hi.x, b_hi); }
                acc[10] = outer4(acc[10], a_hi.y, b_lo);
                if (TN >= 8u) { acc[11] = outer4(acc[11], a_hi.y, b_hi); }
                acc[12] = outer4(acc[12], a_hi.z, b_lo);
                if (TN >= 8u) { acc[13] = outer4(acc[13], a_hi.z, b_hi); }
                acc[14] = outer4(acc[14], a_hi.w, b_lo);
                if (TN >= 8u) { acc[15] = outer4(acc[15], a_hi.w, b_hi); }
            }
            if (TN == 16u) {
                acc[16] = outer4(acc[16], a_lo.x, b_2);
                acc[17] = outer4(acc[17], a_lo.x, b_3);
                acc[18] = outer4(acc[18], a_lo.y, b_2);
                acc[19] = outer4(acc[19], a_lo.y, b_3);
                acc[20] = outer4(acc[20], a_lo.z, b_2);
                acc[21] = outer4(acc[21], a_lo.z, b_3);
                acc[22] = outer4(acc[22], a_lo.w, b_2);
                acc[23] = outer4(acc[23], a_lo.w, b_3);
                if (TM == 8u) {
                    acc[24] = outer4(acc[24], a_hi.x, b_2);
                    acc[25] = outer4(acc[25], a_hi.x, b_3);
                    acc[26] = outer4(acc[26], a_hi.y, b_2);
                    acc[27] = outer4(acc[27], a_hi.y, b_3);
                    acc[28] = outer4(acc[28], a_hi.z, b_2);
                    acc[29] = outer4(acc[29], a_hi.z, b_3);
                    acc[30] = outer4(acc[30], a_hi.w, b_2);
                    acc[31] = outer4(acc[31], a_hi.w, b_3);
                }
            }
        }
        if (BIAS_ROW && by == 0u && tid < BIAS_G * (BN / 4u)) {
            for (var kk = tid / (BN / 4u); kk < BK; kk += BIAS_G) {
                bsum += bs_tile[ob + kk * (BN / 4u) + tid % (BN / 4u)];
            }
        }
        if (DB) {
            // Slice i+1 into the other copy (nothing after the last slice).
            if (k1 < k_end) {
                put_regs(select(0u, BK * BM / 4u, cur == 0u), select(0u, BK * BN / 4u, cur == 0u), va, n_a, n_b,
                         pa0, pa1, pa2, pa3, pb0, pb1, pb2, pb3);
            }
            cur = 1u - cur;
        }
        workgroupBarrier();
    }

    // BIAS_ROW: the row groups' sums, added in order, into out's last row (through the tiles' workgroup memory,
    // free once every thread has passed the loop's last barrier).
    if (BIAS_ROW) {
        let groups = min(BIAS_G, BK);   // the groups that had rows
        if (by == 0u && tid < groups * (BN / 4u)) { bs_tile[tid] = bsum; }
        workgroupBarrier();
        if (by == 0u && tid < BN / 4u) {
            var s = bs_tile[tid];
            for (var g = 1u; g < groups; g++) { s += bs_tile[g * (BN / 4u) + tid]; }
            store_bias_row(slab, n0 + 4u * tid, s);
        }
    }
    let m = m0 + 4u * ga_lo;
    let n = n0 + 4u * gb_lo;
    store_rows4(slab, m, n, acc[0], acc[2], acc[4], acc[6]);
    let m_hi = m0 + 4u * ga_hi;
    let n_hi = n0 + 4u * gb_hi;
    if (TN >= 8u) { store_rows4(slab, m, n_hi, acc[1], acc[3], acc[5], acc[7]); }
    if (TM == 8u) {
        store_rows4(slab, m_hi, n, acc[8], acc[10], acc[12], acc[14]);
        if (TN >= 8u) { store_rows4(slab, m_hi, n_hi, acc[9], acc[11], acc[13], acc[15]); }
    }
    if (TN == 16u) {
        let n_2 = n0 + 4u * gb_2;
        let n_3 = n0 + 4u * gb_3;
        store_rows4(slab, m, n_2, acc[16], acc[18], acc[20], acc[22]);
        store_rows4(slab, m, n_3, acc[17], acc[19], acc[21], acc[23]);
        if (TM == 8u) {
            store_rows4(slab, m_hi, n_2, acc[24], acc[26], acc[28], acc[30]);
            store_rows4(slab, m_hi, n_3, acc[25], acc[27], acc[29], acc[31]);
        }
    }
}

// Split-K, second pass: out (M, N) (+)= the slabs of split4 (n_slices, M, N) summed in slice order (+ bias),
// then the epilogue.
// GROUPED: both members of a grouped product in one pass: the threads past out1's vec4s sum out2's slabs (from vec4
// mp2.chunk of split4, as the grouped product wrote them, with mp's slice count) into out4_2 (mp2.M, mp2.N).
// #if GROUPED
@group(0) @binding(20) var<storage, read_write> out4_2: array<vec4<f32>>;
// #endif
@compute @workgroup_size(256)
fn matmul_split_sum(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                    @builtin(local_invocation_id) lid: vec3u) {
    // #if GROUPED
    let i_all = (wg.y * nwg.x + wg.x) * 256u + lid.x;
    let n4_1 = mp.M * (mp.N / 4u);
    second = i_all >= n4_1;
    let i = select(i_all, i_all - n4_1, second);
    let n4 = select(n4_1, mp2.M * (mp2.N / 4u), second);
    let j = select(0u, mp2.chunk, second) + i;       // the vec4 of the first slab
    // #else
    let i = (wg.y * nwg.x + wg.x) * 256u + lid.x;
    let n4 = mp.M * (mp.N / 4u);
    let j = i;
    // #endif
    if (i >= n4) { return; }
    let n_slices = (mp.K + mp.chunk - 1u) / mp.chunk;
    // Eight slabs a step with their loads in flight together (with one load a step, each waited for its memory
    // latency in turn: 28 of them one after the other for 29 slices), added in slice order. Past the last slice
    // the loads read the last slab again (in range) and are not added: the same sum to the bit.
    let last = n_slices - 1u;
    var y = split4[j];
    // What is added after the slices (out with ACCUMULATE, aux for the epilogue), read with the first slab so that
    // its latency is not waited for on its own after them.
    var prev = vec4(0.0);
    var aux = vec4(0.0);
    // #if GROUPED
    if (ACCUMULATE) {
        if (second) { prev = out4_2[i]; } else { prev = out4[i]; }
    }
    // #else
    if (ACCUMULATE) { prev = out4[i]; }
    // #endif
    if (READS_AUX) { aux = aux4[i]; }
    for (var z = 1u; z < n_slices; z += 8u) {
        let x0 = split4[z * n4 + j];
        let x1 = split4[min(z + 1u, last) * n4 + j];
        let x2 = split4[min(z + 2u, last) * n4 + j];
        let x3 = split4[min(z + 3u, last) * n4 + j];
        let x4 = split4[min(z + 4u, last) * n4 + j];
        let x5 = split4[min(z + 5u, last) * n4 + j];
        let x6 = split4[min(z + 6u, last) * n4 + j];
        let x7 = split4[min(z + 7u, last) * n4 + j];
        y += x0;
        y = select(y, y + x1, z + 1u <= last);
        y = select(y, y + x2, z + 2u <= last);
        y = select(y, y + x3, z + 3u <= last);
        y = select(y, y + x4, z + 4u <= last);
        y = select(y, y + x5, z + 5u <= last);
        y = select(y, y + x6, z + 6u <= last);
        y = select(y, y + x7, z + 7u <= last);
    }
    // #if GROUPED
    if (second) {                   // a pair's sums: no bias, no epilogue
        if (ACCUMULATE) { y += prev; }
        out4_2[i] = y;
        return;
    }
    // #endif
    if (HAS_BIAS) { y += bias4[i % (mp.N / 4u)]; }
    if (ACCUMULATE) { y += prev; }
    if (EPILOGUE != 0u) { y = epilogue4(i, y, aux); }
    out4[i] = y;
}

// ---------------------------------------------------------------------------------------------
// One thread per output, k in order: slow and obviously right, for any shape.

fn a_at(m: u32, k: u32) -> f32 {
    if (A_T) { return a[k * mp.M + m]; }
    return a[m * mp.K + k];
}

fn b_at(k: u32, n: u32) -> f32 {
    if (B_T) { return b[n * mp.K + k]; }
    return b[k * mp.N + n];
}

@compute @workgroup_size(16, 16)
fn matmul_simple(@builtin(global_invocation_id) gid: vec3u) {
    let n = gid.x;
    let m = gid.y;
    if (m >= mp.M || n >= mp.N) { return; }
    var s = 0.0;
    for (var k = 0u; k < mp.K; k++) {
        s = fma(a_at(m, k), b_at(k, n), s);
    }
    if (HAS_BIAS) { s += bias[n]; }
    let o = m * mp.N + n;
    if (ACCUMULATE) { s += out[o]; }
    out[o] = s;
}

// ---------------------------------------------------------------------------------------------
// Bias gradient, without atomics: per block of mp.chunk rows, 4 row lanes per column summed in a fixed
// order into partial (n_blocks, N); then each column's blocks summed in block order into dbias.

var<workgroup> lanes: array<f32, 256>;

@compute @workgroup_size(64, 4)
fn bias_grad_partial(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
    let n = wg.x * 64u + lid.x;
    let r0 = wg.y * mp.chunk;
    let r1 = min(r0 + mp.chunk, mp.M);
    var s = 0.0;
    if (n < mp.N) {
        for (var r = r0 + lid.y; r < r1; r += 4u) { s += dout[r * mp.N + n]; }
    }
    lanes[lid.y * 64u + lid.x] = s;
    workgroupBarrier();
    if (lid.y == 0u && n < mp.N) {
        partial[wg.y * mp.N + n] = (lanes[lid.x] + lanes[64u + lid.x]) + (lanes[128u + lid.x] + lanes[192u + lid.x]);
    }
}

@compute @workgroup_size(64)
fn bias_grad_sum(@builtin(global_invocation_id) gid: vec3u) {
    let n = gid.x;
    if (n >= mp.N) { return; }
    let n_blocks = (mp.M + mp.chunk - 1u) / mp.chunk;
    var s = 0.0;
    for (var blk = 0u; blk < n_blocks; blk++) { s += partial[blk * mp.N + n]; }
    dbias[n] = dbias[n] + s;
}
