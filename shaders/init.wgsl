// Parameter initialisation on the GPU: a counter-based generator (PCG hash of seed and index), so every
// element is a pure function of (seed, index) and no random numbers cross from the CPU.
//
// fill_normal: dst (n,) f32 = mean + stddev * z, z ~ N(0, 1) approximated by the sum of 12 uniforms (Irwin-Hall,
//              so |z| <= 6, as a truncated normal). Only integer arithmetic and exact float steps make z:
//              the same seed gives bit-identical weights on every device, where sin/cos/log would differ in
//              their last bits from one GPU (or browser) to the next.
// fill_const:  dst (n,) f32 = mean

struct InitParams { n: u32, seed: u32, stddev: f32, mean: f32 }

@group(0) @binding(0) var<uniform> ip: InitParams;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;

fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn flat_index(wg: vec3u, nwg: vec3u, lid: vec3u) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid.x;
}

// A standard normal deviate for element i: 12 uniform integers of 20 bits sum to S < 12 * 2^20 < 2^24, exact in
// f32; S has mean 6 (2^20 - 1) and standard deviation 2^20 (to 1 part in 2^40), so z = (S - mean) / 2^20.
fn normal(i: u32) -> f32 {
    var s = 0u;
    for (var k = 0u; k < 12u; k++) {
        s += pcg(ip.seed ^ pcg(12u * i + k)) >> 12u;
    }
    return (f32(s) - 6291450.0) * (1.0 / 1048576.0);
}

@compute @workgroup_size(256)
fn fill_normal(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
               @builtin(local_invocation_id) lid: vec3u) {
    let i = flat_index(wg, nwg, lid);
    if (i >= ip.n) { return; }
    dst[i] = ip.mean + ip.stddev * normal(i);
}

@compute @workgroup_size(256)
fn fill_const(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
              @builtin(local_invocation_id) lid: vec3u) {
    let i = flat_index(wg, nwg, lid);
    if (i >= ip.n) { return; }
    dst[i] = ip.mean;
}
