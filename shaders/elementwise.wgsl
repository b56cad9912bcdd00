// Elementwise kernels: GELU (tanh form) forward and backward, residual add, fill, copy, scale.
// One thread per element (vec4 kernels: per 4 elements); the grid may be folded into 2-D (x, y).
//
// gelu_forward:          inp (n/4,) vec4 f32 -> out (n/4,) vec4 f32             out = gelu(inp)
// gelu_backward:         inp, dout (n/4,) vec4 f32 -> dinp (n/4,) vec4 f32      dinp = gelu'(inp) * dout  (written)
// gelu_backward_inplace: inp (n/4,) vec4 f32, dio (n/4,) vec4 f32               dio = gelu'(inp) * dio
// add:                   a, b (n/4,) vec4 f32 -> out (n/4,) vec4 f32            out = a + b
// accumulate:            inp (n/4,) vec4 f32, dio (n/4,) vec4 f32               dio += inp
// fill:                  dst (n,) f32                                           dst = value
// scale:                 dst (n,) f32                                           dst *= value
// copy:                  src (n,) f32 -> dst (n,) f32                           dst = src
//
// n in the uniform counts vec4s for the vec4 kernels and floats for the scalar ones.

struct EwParams { n: u32, value: f32, _p0: u32, _p1: u32 }

@group(0) @binding(0) var<uniform> ep: EwParams;
@group(0) @binding(1) var<storage, read> inp: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> dinp: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> dio: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> dst: array<f32>;
@group(0) @binding(9) var<storage, read> src: array<f32>;

const WG: u32 = 256u;
const GELU_SCALE: f32 = 0.7978845608028654;   // sqrt(2 / pi)

fn flat_index(wg: vec3u, nwg: vec3u, lid: vec3u) -> u32 {
    return (wg.y * nwg.x + wg.x) * WG + lid.x;
}

fn gelu(x: vec4<f32>) -> vec4<f32> {
    let u = GELU_SCALE * (x + 0.044715 * x * x * x);
    // tanh saturates long before |u| = 10; the clamp keeps exp-based tanh implementations finite.
    return 0.5 * x * (1.0 + tanh(clamp(u, vec4(-10.0), vec4(10.0))));
}

fn gelu_grad(x: vec4<f32>) -> vec4<f32> {
    let u = GELU_SCALE * (x + 0.044715 * x * x * x);
    let t = tanh(clamp(u, vec4(-10.0), vec4(10.0)));
    let du = GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x);
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
}

@compute @workgroup_size(WG)
fn gelu_forward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                @builtin(local_invocation_id) lid: vec3u) {
    let i = flat_index(wg, nwg, lid);
    if (i >= ep.n) { return; }
    out[i] = gelu(inp[i]);
}

@compute @workgroup_size(WG)
fn gelu_backward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                 @builtin(local_invocation_id) lid: vec3u) {
    let i = flat_index(wg, nwg, lid);
    if (i >= ep.n) { return; }
    dinp[i] = gelu_grad(inp[i]) * dout[i];
}

@compute @workgroup_size(WG)
fn gelu_backward_inplace(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                         @builtin(local_invocation_id) lid: vec3u) {
    let i = flat_index(wg, nwg, lid);
    if (i >= ep.n) { return; }
    dio[i] = gelu_grad(inp[i]) * dio[i];
}

@compute @workgroup_size(WG)
fn add(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
       @builtin(local_invocation_id) lid: vec3u) {
    let i = flat_index(wg, nwg, lid);
    if (i >= ep.n) { return; }
    out[i] = a[i] + b[i];
}

@compute @workgroup_size(WG)
fn accumulate(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
              @builtin(local_invocation_id) lid: vec3u) {
    let i = flat_index(wg, nwg, lid);
    if (i >= ep.n) { return; }
    dio[i] = dio[i] + inp[i];
}

@compute @workgroup_size(WG)
fn fill(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_id) lid: vec3u) {
    let i = flat_index(wg, nwg, lid);
    if (i >= ep.n) { return; }
    dst[i] = ep.value;
}

@compute @workgroup_size(WG)
fn scale(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
         @builtin(local_invocation_id) lid: vec3u) {
    let i = flat_index(wg, nwg, lid);
    if (i >= ep.n) { return; }
    dst[i] = dst[i] * ep.value;
}

@compute @workgroup_size(WG)
fn copy(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_id) lid: vec3u) {
    let i = flat_index(wg, nwg, lid);
    if (i >= ep.n) { return; }
    dst[i] = src[i];
}
