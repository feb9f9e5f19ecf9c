"""Mixture-of-experts decoders with Llama-style attention: Mixtral and Qwen3-MoE.

Checkpoints store each expert's three projections separately; transformers 5 fuses them in memory
as `mlp.experts.gate_up_proj` [experts, 2*intermediate, hidden] (gate then up) and
`mlp.experts.down_proj` [experts, hidden, intermediate]. This adapter converts on load (and
takes a checkpoint already in the fused layout as it is). Qwen3-MoE may also keep dense MLP
layers (`mlp_only_layers`), which load like any other layer."""

import torch

from shared.models.checkpoint import Checkpoint
from shared.models.families.llama import LlamaFamily


class MixtralFamily(LlamaFamily):
    name = "mixtral"
    model_types = ("mixtral",)
    moe_prefix = "block_sparse_moe."  # where the checkpoint keeps the router and the experts
    projections = ("w1", "w3", "w2")  # gate, up, down

    def layer_tensors(self, checkpoint: Checkpoint, index: int, names: list[str]) -> dict[str, torch.Tensor]:
        prefix = f"{self.layers_path}.{index}."
        experts_prefix = f"{prefix}{self.moe_prefix}experts."
        if not checkpoint.names(experts_prefix) or f"{experts_prefix}gate_up_proj" in checkpoint:
            return super().layer_tensors(checkpoint, index, names)  # a dense layer, or fused already
        tensors = {}
        for name in checkpoint.names(prefix):
            short = name[len(prefix):]
            if not name.startswith(experts_prefix):
                tensors[short.replace(self.moe_prefix, "mlp.", 1)] = checkpoint.read(name)
        experts = sorted({int(n[len(experts_prefix):].split(".")[0]) for n in checkpoint.names(experts_prefix)})
        gate, up, down = self.projections

        def expert(e: int, w: str) -> torch.Tensor:
            return checkpoint.read(f"{experts_prefix}{e}.{w}.weight")

        tensors["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([expert(e, gate), expert(e, up)], dim=0) for e in experts])
        tensors["mlp.experts.down_proj"] = torch.stack([expert(e, down) for e in experts])
        return tensors


class Qwen3MoeFamily(MixtralFamily):
    name = "qwen3-moe"
    model_types = ("qwen3_moe",)
    moe_prefix = "mlp."
    projections = ("gate_proj", "up_proj", "down_proj")
