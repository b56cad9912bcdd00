// Parameter initialisation on the GPU: a counter-based generator (PCG hash of seed and index), so every
// element is a pure function of (seed, index): the same seed gives the same weights on every device, and no
// random numbers cross from the CPU.
//
// fill_normal: dst (n,) f32 = mean + std * N(0, 1)     (Box-Muller on two hashed uniforms)
// fill_const:  dst (n,) f32 = mean

struct InitParams { n: u32, seed: u32, std: f32, mean: f32 }

@group(0) @binding(0) var<uniform> ip: InitParams;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;

fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn uniform01(a: u32, b: u32) -> f32 {
    // 24 random bits -> (0, 1]: never 0, so log() below is finite.
    return (f32(pcg(a ^ pcg(b)) >> 8u) + 1.0) / 16777216.0;
}

fn flat_index(wg: vec3u, nwg: vec3u, lid: vec3u) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid.x;
}

@compute @workgroup_size(256)
fn fill_normal(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
               @builtin(local_invocation_id) lid: vec3u) {
    let i = flat_index(wg, nwg, lid);
    if (i >= ip.n) { return; }
    let u1 = uniform01(ip.seed, 2u * i);
    let u2 = uniform01(ip.seed ^ 0x9e3779b9u, 2u * i + 1u);
    let z = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
    dst[i] = ip.mean + ip.std * z;
}

@compute @workgroup_size(256)
fn fill_const(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
              @builtin(local_invocation_id) lid: vec3u) {
    let i = flat_index(wg, nwg, lid);
    if (i >= ip.n) { return; }
    dst[i] = ip.mean;
}
