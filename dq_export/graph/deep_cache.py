"""DeepCache's split of a diffusers UNet into a full pass and a shallow pass (torch).

DeepCache (Ma et al., CVPR 2024) reuses the deep features of the UNet between sampler steps:
a full step runs the whole UNet and keeps the feature that enters the skip branch; a cached
step recomputes only the shallow branch (time embedding, ``conv_in``, the first layers of
the down path, the last layers of the up path, ``conv_out``) and reads that feature back.

Branch id ``b`` (DeepCacheSDHelper's ``cache_branch_id``) names the cache point: block
``b // 3`` from the top of the UNet, layer ``b % 3`` in it. The same rule as the
``deepcache`` package decides which sub-module a cached step skips (``skipped``), so the
graphs traced here compute what ``DeepCacheSDHelper`` computes. Of all the skipped
modules' outputs, the shallow branch reads exactly one: the input of the first fresh up
layer, which is the feature the full pass returns.

Works for ``UNet2DConditionModel`` and ``UNet2DModel`` (both are down blocks, a mid block
and up blocks of resnets, with or without attentions).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map

from deploy.feature_cache import FEATURE  # noqa: F401  (the graphs' name for it)
from dq_export.errors import UserError

DEFAULT_BRANCH = 0  # the shallowest: DeepCache's default, the most reuse


@dataclass(frozen=True)
class Wrapped:
    """One module DeepCache may skip, with its (block, layer) position counted from the top
    of the UNet (up blocks and their layers are counted from the output end)."""
    name: str  # torch module name
    block: int
    layer: int
    kind: str  # "down", "mid" or "up"


def cache_point(branch: int) -> tuple[int, int]:
    """(block, layer) of DeepCache's branch id."""
    return branch // 3, branch % 3


def wrapped_modules(unet) -> list[Wrapped]:
    """The modules DeepCacheSDHelper wraps, with the positions it gives them."""
    out = []
    for b, block in enumerate(unet.down_blocks):
        prefix = f"down_blocks.{b}"
        out += [Wrapped(f"{prefix}.attentions.{j}", b, j, "down")
                for j in range(len(getattr(block, "attentions", None) or []))]
        out += [Wrapped(f"{prefix}.resnets.{j}", b, j, "down") for j in range(len(block.resnets))]
        out += [Wrapped(f"{prefix}.downsamplers.{j}", b, len(block.resnets), "down")
                for j in range(len(block.downsamplers or []))]
        out.append(Wrapped(prefix, b, 0, "down"))
    out.append(Wrapped("mid_block", 0, 0, "mid"))
    count = len(unet.up_blocks)
    for i, block in enumerate(unet.up_blocks):
        prefix, b, n = f"up_blocks.{i}", count - i - 1, len(block.resnets)
        out += [Wrapped(f"{prefix}.attentions.{j}", b, n - j - 1, "up")
                for j in range(len(getattr(block, "attentions", None) or []))]
        out += [Wrapped(f"{prefix}.resnets.{j}", b, n - j - 1, "up") for j in range(n)]
        out += [Wrapped(f"{prefix}.upsamplers.{j}", b, 0, "up")
                for j in range(len(block.upsamplers or []))]
        out.append(Wrapped(prefix, b, 0, "up"))
    return out


def skipped(module: Wrapped, branch: int) -> bool:
    """Whether a cached step skips ``module`` (DeepCacheSDHelper.is_skip_step, uniform mode)."""
    block, layer = cache_point(branch)
    if module.block > block or module.kind == "mid":
        return True
    if module.block < block:
        return False
    return module.layer >= layer if module.kind == "down" else module.layer > layer


def valid_branches(unet) -> list[int]:
    """Branch ids whose cache point exists in this UNet: the layer must be one of the up
    block's resnets."""
    count = len(unet.up_blocks)
    return [3 * b + layer for b in range(count)
            for layer in range(min(3, len(unet.up_blocks[count - b - 1].resnets)))]


def check_branch(unet, branch: int) -> int:
    valid = valid_branches(unet)
    if branch not in valid:
        raise UserError(f"--cache-branch {branch} is not a cache point of this UNet: use one "
                        f"of {', '.join(map(str, valid))} (0 is the shallowest)")
    return branch


def feature_module(unet, branch: int) -> str:
    """The skipped module whose output the shallow branch reads: the one that feeds the
    first fresh up layer (the resnet at the cache point)."""
    block, layer = cache_point(branch)
    up = len(unet.up_blocks) - block - 1
    resnet = len(unet.up_blocks[up].resnets) - layer - 1
    if resnet > 0:
        kind = "attentions" if getattr(unet.up_blocks[up], "attentions", None) else "resnets"
        return f"up_blocks.{up}.{kind}.{resnet - 1}"
    return f"up_blocks.{up - 1}" if up > 0 else "mid_block"


def _first_tensor(output):
    """A module's output tensor: Transformer2DModel returns ``(sample,)``."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_first_tensor(output, tensor):
    return tensor if isinstance(output, torch.Tensor) else (tensor, *output[1:])


@contextmanager
def returning_feature(unet, branch: int):
    """Within the block the UNet runs whole, and ``box["feature"]`` holds the feature at the
    cache point after each call."""
    box = {}
    module = dict(unet.named_modules())[feature_module(unet, branch)]
    handle = module.register_forward_hook(
        lambda _m, _i, output: box.__setitem__("feature", _first_tensor(output)))
    try:
        yield box
    finally:
        handle.remove()


def record_outputs(unet, branch: int, inputs: tuple) -> dict:
    """What every module a cached step skips returned on ``inputs``: the stand-ins' shapes."""
    modules = dict(unet.named_modules())
    outputs, handles = {}, []
    for w in wrapped_modules(unet):
        if skipped(w, branch):
            handles.append(modules[w.name].register_forward_hook(
                lambda _m, _i, out, name=w.name: outputs.__setitem__(name, out)))
    try:
        with torch.no_grad():
            unet(*inputs, return_dict=False)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@contextmanager
def shallow(unet, branch: int, feature: torch.Tensor, recorded: dict):
    """Within the block the UNet runs DeepCache's cached step: every skipped module returns
    a stand-in without computing, zeros shaped as ``recorded`` (``record_outputs``) and dead
    in the traced graph, except the feature module, which returns ``feature``."""
    modules = dict(unet.named_modules())
    source = feature_module(unet, branch)
    patched = []
    for w in wrapped_modules(unet):
        if not skipped(w, branch):
            continue
        module, out = modules[w.name], recorded[w.name]
        if w.name == source:
            def stand_in(*_a, _out=out, **_k):
                return _with_first_tensor(_out, feature)
        else:
            def stand_in(*_a, _out=out, **_k):
                return tree_map(lambda t: torch.zeros_like(t) if isinstance(t, torch.Tensor)
                                else t, _out)
        module.forward = stand_in
        patched.append(module)
    try:
        yield unet
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


class FullUNetGraph(torch.nn.Module):
    """The whole UNet; returns the model output and the feature at the cache point."""

    def __init__(self, unet, branch: int):
        super().__init__()
        self.unet, self.branch = unet, branch

    def forward(self, sample, timestep, *encoder_hidden_states):
        with returning_feature(self.unet, self.branch) as box:
            out = self.unet(sample, timestep, *encoder_hidden_states, return_dict=False)[0]
        return out, box["feature"]


class ShallowUNetGraph(torch.nn.Module):
    """The shallow branch; its last input is the cached feature. ``example`` are inputs
    the stand-ins' shapes are recorded on (the traced graph keeps none of them)."""

    def __init__(self, unet, branch: int, example: tuple):
        super().__init__()
        self.unet, self.branch = unet, branch
        self.recorded = record_outputs(unet, branch, example)

    def forward(self, sample, timestep, *rest):
        *encoder_hidden_states, feature = rest
        with shallow(self.unet, self.branch, feature, self.recorded):
            return self.unet(sample, timestep, *encoder_hidden_states, return_dict=False)[0]
