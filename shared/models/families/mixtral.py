"""Mixtral: Llama-style attention with a mixture-of-experts MLP.

Checkpoints store each expert's w1/w2/w3 separately under `block_sparse_moe`; transformers 5 fuses
them in memory as `mlp.experts.gate_up_proj` [experts, 2*intermediate, hidden] (w1 then w3) and
`mlp.experts.down_proj` [experts, hidden, intermediate] (w2). This adapter converts on load.
"""

import torch

from shared.models.checkpoint import Checkpoint
from shared.models.families.llama import LlamaFamily


class MixtralFamily(LlamaFamily):
    name = "mixtral"
    model_types = ("mixtral",)

    def layer_tensors(self, checkpoint: Checkpoint, index: int, names: list[str]) -> dict[str, torch.Tensor]:
        prefix = f"{self.layers_path}.{index}."
        moe = prefix + "block_sparse_moe."
        if not checkpoint.names(moe):  # already in the fused in-memory layout
            return super().layer_tensors(checkpoint, index, names)
        tensors = {}
        for name in checkpoint.names(prefix):
            short = name[len(prefix):]
            if not short.startswith("block_sparse_moe.experts."):
                tensors[short.replace("block_sparse_moe.", "mlp.", 1)] = checkpoint.read(name)
        experts = sorted({int(n[len(moe + "experts."):].split(".")[0]) for n in checkpoint.names(moe + "experts.")})

        def expert(e: int, w: str) -> torch.Tensor:
            return checkpoint.read(f"{moe}experts.{e}.{w}.weight")

        tensors["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([expert(e, "w1"), expert(e, "w3")], dim=0) for e in experts])
        tensors["mlp.experts.down_proj"] = torch.stack([expert(e, "w2") for e in experts])
        return tensors
