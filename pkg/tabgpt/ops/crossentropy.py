"""Fused softmax + cross-entropy (shaders/crossentropy.wgsl) over the real vocabulary V of padded logits.

    ce = await CrossEntropy.create(dev, N=B*T, V=V, Vp=Vp)
    ce.forward_backward(seq, losses=losses, logits=logits, targets=targets)  # logits become dlogits, in place
    ce.mean(seq, loss=loss_slot, losses=losses)                             # loss_slot[0] = mean(losses)

Shapes: logits (N, Vp) f32 with Vp a multiple of 4 (the model pads to 64); targets (N,) u32 in [0, V);
losses (N,) f32; loss a buffer or view of at least one f32. Columns V..Vp are padding: no part of the softmax,
zero gradient. dlogits = (softmax - onehot) * grad_scale, WRITTEN over the logits (as llm.c: no second
(N, Vp) buffer). grad_scale and loss_scale default to 1/N, the mean over rows; with gradient accumulation over
k micro-batches pass 1/(N*k) for both and call mean(..., accumulate=True) after zeroing the slot.

With subgroups=True, or TABGPT_SUBGROUPS=1 where the device has subgroup operations (Device.subgroup_reductions;
off by default), the row kernels of crossentropy_subgroups.wgsl combine the threads' (max, sum) pairs by
subgroupMax / subgroupAdd and one barrier instead of an eight-level tree; loss_mean (one workgroup) keeps its tree.
"""

from __future__ import annotations

import struct

from tabgpt.gpu import Device, GPUError, Sequence
from tabgpt.ops.elementwise import TREE_WG, TREE_WG_CPU, fold_grid, workgroup_threads

FILE = "crossentropy.wgsl"
SG_FILE = "crossentropy_subgroups.wgsl"
ROW_KERNELS = ("crossentropy_forward", "crossentropy_forward_backward")


class CrossEntropy:
    def __init__(self, dev, N, V, Vp, kernels, params, mean_params, subgroups=False):
        self.dev, self.N, self.V, self.Vp = dev, N, V, Vp
        self.subgroups = subgroups        # the row kernels of SG_FILE
        self.k = kernels
        self.params = params              # uniform CEParams
        self.mean_params = mean_params    # {accumulate: uniform MeanParams}

    @classmethod
    async def create(cls, dev: Device, N: int, V: int, Vp: int, grad_scale: float | None = None,
                     loss_scale: float | None = None, subgroups: bool | None = None,
                     threads: int | None = None) -> "CrossEntropy":
        """subgroups: the subgroup kernels (True) or the trees (False) instead of the device's default; threads:
        a row's threads (a power of two, 1..256) instead of the adapter's (elementwise.TREE_WG; TREE_WG_CPU on CPU
        drivers, but for the subgroup kernels)."""
        if Vp % 4 or not 0 < V <= Vp:
            raise GPUError(f"CrossEntropy needs 0 < V <= Vp and Vp a multiple of 4, got V={V}, Vp={Vp}")
        if subgroups is None:
            subgroups = dev.subgroup_reductions()
        elif subgroups and not dev.has_subgroup_ops():
            raise GPUError("this device has no subgroup operations (the subgroups feature and the subgroup_id "
                           "builtin): create CrossEntropy with subgroups=False")
        grad_scale = 1.0 / N if grad_scale is None else grad_scale
        loss_scale = 1.0 / N if loss_scale is None else loss_scale
        wg = {"WG": workgroup_threads(dev, threads, "CrossEntropy", cpu=TREE_WG if subgroups else TREE_WG_CPU)}
        kernels = {"loss_mean": await dev.kernel(FILE, "loss_mean", constants=wg)}
        for name in ROW_KERNELS:
            kernels[name] = (await dev.kernel_of([SG_FILE, FILE], name + "_sg", constants=wg) if subgroups
                             else await dev.kernel(FILE, name, constants=wg))
        params = dev.uniform(struct.pack("<3If", N, V, Vp // 4, grad_scale), "crossentropy-params")
        mean_params = {acc: dev.uniform(struct.pack("<2IfI", N, int(acc), loss_scale, 0), "loss-mean-params")
                       for acc in (False, True)}
        return cls(dev, N, V, Vp, kernels, params, mean_params, subgroups)

    def forward(self, seq: Sequence, losses, logits, targets):
        """losses (N,) = cross-entropy of each row of logits (N, Vp) against targets (N,); logits untouched."""
        seq.dispatch(self.k["crossentropy_forward"], fold_grid(self.N), cp=self.params,
                     losses=losses, logits=logits, targets=targets)

    def forward_backward(self, seq: Sequence, losses, logits, targets):
        """losses (N,) as forward(), and logits (N, Vp) overwritten IN PLACE with dlogits."""
        seq.dispatch(self.k["crossentropy_forward_backward"], fold_grid(self.N), cp=self.params,
                     losses=losses, dlogits=logits, targets=targets)

    def mean(self, seq: Sequence, loss, losses, accumulate: bool = False):
        """loss[0] = loss_scale * sum(losses (N,)) (the mean by default); += instead when accumulate."""
        seq.dispatch(self.k["loss_mean"], (1,), mp=self.mean_params[bool(accumulate)], loss=loss, losses=losses)
