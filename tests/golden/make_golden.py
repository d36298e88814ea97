"""Writes the golden tensors of ``tests/test_golden.py``: what the networks computed before their reference code
and their speed paths were separated (run once, on the code of that commit; the tests compare against the files).

For each of four small networks (LGMSNet 2D/3D, GLIMS 2D/3D):

* the state-dict keys and shapes, and weights drawn per key from a seeded generator (:func:`synthetic_state`), so
  the same "checkpoint" can be loaded by any version of the code;
* a fixed input (:func:`golden_input`); eval outputs (deep supervision off, no autograd) of the plain path in
  float64 (in full) and as digests of the plain path in float32 and of the path as shipped (float64, float32);
* one training step (deep supervision on, a position-dependent loss over every output): digests of every parameter
  gradient and of the input gradient (:func:`digest`) and the BatchNorm running statistics after it, plain and as
  shipped, float64 and float32.

And the state-dict keys and shapes of the full-size networks (:func:`full_size_keys`).

Run: ``python tests/golden/make_golden.py`` (writes ``tests/golden/*.pt``).
"""
from __future__ import annotations

import copy
import sys
import zlib
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def network_configs():
    from nnunetv2_lgms.networks.glims import GLIMS
    from nnunetv2_lgms.networks.lgmsnet import LGMSNet
    return {
        "lgmsnet_2d": (lambda: LGMSNet(3, 2, nn.Conv2d, features_per_stage=(16, 32, 32, 32, 32)), (2, 3, 96, 96)),
        "lgmsnet_3d": (lambda: LGMSNet(1, 3, nn.Conv3d, strides=[(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2),
                                                                  (2, 2, 2)],
                                       kernel_sizes=[(1, 3, 3)] + [(3, 3, 3)] * 4,
                                       features_per_stage=(16, 16, 32, 32, 32)), (2, 1, 16, 32, 32)),
        "glims_2d": (lambda: GLIMS(3, 2, nn.Conv2d, patch_size=(64, 64), feature_size=12, depths=(2, 2, 2, 2)),
                     (2, 3, 64, 64)),
        "glims_3d": (lambda: GLIMS(1, 3, nn.Conv3d, patch_size=(16, 32, 32),
                                   strides=[(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 1, 1)],
                                   kernel_sizes=[(1, 3, 3)] + [(3, 3, 3)] * 5, feature_size=12,
                                   depths=(2, 2, 2, 2)), (2, 1, 16, 32, 32)),
    }


def synthetic_state(keys_and_shapes, reference_state):
    """Weights per key from a generator seeded with the key's CRC32: conv/linear weights ~ N(0, 1/fan_in), 1-D
    ``weight`` entries 1 + N(0, 0.1), running variances in [0.5, 1.5), other floats N(0, 0.1); integer buffers as
    in ``reference_state``. float64."""
    state = {}
    for key, shape in keys_and_shapes:
        ref = reference_state[key]
        if not ref.is_floating_point():
            state[key] = ref.clone()
            continue
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        if key.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        elif len(shape) >= 2 and not key.endswith(("pos_embed.weight", "relative_position_bias_table")):
            fan_in = max(1, torch.Size(shape).numel() // shape[0])
            value = torch.randn(shape, generator=g, dtype=torch.float64) / fan_in ** 0.5
        elif key.endswith(".weight") and len(shape) == 1:
            value = 1 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            value = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        state[key] = value
    return state


INPUT_SEED = 123


def golden_input(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(INPUT_SEED), dtype=torch.float64)


def digest(name: str, t: torch.Tensor) -> torch.Tensor:
    """``[sum, sum of squares, <t, R>]`` in float64, ``R`` ~ N(0, 1) of ``t``'s shape seeded with the CRC32 of
    ``name``: a changed element changes the projection."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7)
    r = torch.randn(t.shape, generator=g, dtype=torch.float64)
    t = t.detach().double()
    return torch.stack([t.sum(), (t * t).sum(), (t * r).sum()])


def position_loss(outputs):
    return sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outputs)


def eval_output(net, x):
    net.eval()
    net.decoder.deep_supervision = False
    with torch.no_grad():
        return net(x).detach().clone()


def training_step(net, x):
    net.train()
    net.decoder.deep_supervision = True
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = net(x)
    position_loss(out if isinstance(out, (list, tuple)) else [out]).backward()
    grads = {n: digest(n, p.grad) for n, p in net.named_parameters() if p.grad is not None}
    grads["<input>"] = digest("<input>", x.grad)
    stats = {n: b.detach().clone() for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var"))}
    return grads, stats


def make(name, build, shape, plain_of):
    torch.manual_seed(0)
    net = build()
    reference_state = net.state_dict()
    keys = [(k, tuple(v.shape)) for k, v in reference_state.items()]
    state64 = synthetic_state(keys, reference_state)
    x64 = golden_input(shape)
    record = {"keys": keys, "input_shape": tuple(shape), "input_seed": INPUT_SEED}
    for dtype, tag in ((torch.float64, "64"), (torch.float32, "32")):
        for path in ("plain", "shipped"):
            torch.manual_seed(0)
            model = build()
            model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state64.items()})
            model = model.to(dtype)
            if path == "plain":
                model = plain_of(model)
            out = eval_output(model, x64.to(dtype))
            # the reference's output in full, the others as digests
            record[f"eval_{path}{tag}"] = out if path + tag == "plain64" else digest("<output>", out)
            grads, stats = training_step(model, x64.to(dtype))
            record[f"grads_{path}{tag}"] = grads
            record[f"stats_{path}{tag}"] = stats
    torch.save(record, HERE / f"{name}.pt")
    print(name, "written", file=sys.stderr)


def full_size_keys():
    """State-dict keys and shapes of the networks the trainers build for a 2D (256 x 256, 7 stages) and the
    Hippocampus 3D plan (40 x 56 x 40, 4 stages): a checkpoint of a real training run loads only into these."""
    import json
    from nnunetv2_lgms.networks.glims import GLIMS
    from nnunetv2_lgms.networks.lgmsnet import LGMSNet
    plans = {"2d": ((256, 256), [[1, 1]] + [[2, 2]] * 6, [[3, 3]] * 7, 3),
             "3d": ((40, 56, 40), [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, 1)}
    out = {}
    for dim, (patch, strides, kernels, channels) in plans.items():
        for cls in (LGMSNet, GLIMS):
            net = cls.from_plan(patch, strides, kernels, channels, 3, deep_supervision=True)
            out[f"{cls.__name__}_{dim}"] = {k: list(v.shape) for k, v in net.state_dict().items()}
    (HERE / "full_size_state_dict_keys.json").write_text(json.dumps(out, indent=0))


def main():
    from nnunetv2_lgms.benchmark.speed_paths import disable_speed_paths
    torch.set_num_threads(2)
    full_size_keys()
    for name, (build, shape) in network_configs().items():
        make(name, build, shape, lambda m: disable_speed_paths(copy.deepcopy(m)))


if __name__ == "__main__":
    main()
