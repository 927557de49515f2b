"""Which UNet layers are quantized, and the roles the method gives some of them.

- every Conv2d and Linear gets int8 per-channel weights and a per-tensor input quantizer;
- the time-embedding path (time_embedding.linear_1/2, each ResNet's time_emb_proj) sees
  inputs that depend only on t, so it gets one input scale per sampler step (TFMQ-DM);
- each up-path ResNet's conv_shortcut reads the concatenation [hidden, skip]; its two
  halves get their own scales (Q-Diffusion's split shortcut quantization);
- each attention's products Q.K^T and A.V get int8 q, k and v (the outputs of to_q, to_k,
  to_v) and, if the recipe says so, a uint8 softmax output A (Q-Diffusion keeps A above
  8 bits; OpenVINO on CPU has no 16-bit kernels, so the choice is float or uint8).
"""

from __future__ import annotations


def quantized_layers(unet) -> dict:
    """name -> module for every Conv2d and Linear of the UNet, in module order."""
    import torch

    return {name: module for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))}


def is_time_embedding_layer(name: str) -> bool:
    return name.startswith("time_embedding.") or name.endswith("time_emb_proj")


def shortcut_splits(unet) -> dict[str, int]:
    """up-path conv_shortcut name -> channels of the first (hidden) half of its input.

    Follows diffusers' up blocks: resnet j of up block b reads cat([hidden, skip]) where
    hidden comes from the previous resnet, or from the previous block (the mid block for b=0).
    """
    splits = {}
    hidden = unet.config.block_out_channels[-1]
    for b, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            if resnet.conv_shortcut is not None:
                splits[f"up_blocks.{b}.resnets.{j}.conv_shortcut"] = hidden
            hidden = resnet.out_channels
    return splits


PROJECTIONS = ("q", "k", "v")  # outputs of to_q, to_k, to_v
ATTENTION_OPERANDS = PROJECTIONS + ("p",)  # p: the softmax output, A in A.V


def attention_modules(unet) -> dict[str, tuple[str, str, str]]:
    """attention module name -> the names of its to_q, to_k, to_v projections."""
    import torch

    found = {}
    for name, module in unet.named_modules():
        projections = [getattr(module, f"to_{x}", None) for x in PROJECTIONS]
        if all(isinstance(p, torch.nn.Linear) for p in projections):
            found[name] = tuple(f"{name}.to_{x}" for x in PROJECTIONS)
    return found


def attention_keys(name: str, operands=ATTENTION_OPERANDS) -> list[str]:
    """Quantizer names of one attention's operands: ``<attention>@q``, ``@k``, ``@v``, ``@p``."""
    return [f"{name}@{x}" for x in operands]


def owner(key: str) -> str:
    """The module a quantizer belongs to: a layer (``name``, ``name#half``) or an
    attention (``name@operand``)."""
    return key.split("#")[0].split("@")[0]


def activation_keys(name: str, splits: dict[str, int]) -> list[str]:
    """Names of the input quantizers of one layer: two for a split shortcut, else one."""
    return [f"{name}#0", f"{name}#1"] if name in splits else [name]
