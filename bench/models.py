"""The models the benchmarks average: parameter lists with the shapes of real workloads, built locally
(no download). Each builder returns an nn.Module; `smoke=True` gives a miniature of the same structure
for the smoke tests."""

import torch
from torch import nn


def wide(smoke: bool = False) -> nn.Module:
    """200 tensors, 26.06M fp32 (99.4 MiB): 100 x Linear(510, 510)."""
    layers, width = (4, 32) if smoke else (100, 510)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def tiny(smoke: bool = False) -> nn.Module:
    """2000 tensors, 0.6M fp32 (2.3 MiB): 1000 x Linear(24, 24)."""
    return nn.Sequential(*[nn.Linear(24, 24) for _ in range(20 if smoke else 1000)])


class BertShapes(nn.Module):
    """BERT-base's parameter list (google-research/bert, uncased): 199 tensors, 109.5M fp32 (417.6 MiB),
    in the order a BertModel registers them. Only the shapes matter for averaging."""

    def __init__(self, layers=12, hidden=768, intermediate=3072, vocab=30522, positions=512):
        super().__init__()

        def param(*shape):
            return nn.Parameter(torch.randn(*shape) * 0.02)

        self.embeddings = nn.ParameterList(
            [param(vocab, hidden), param(positions, hidden), param(2, hidden), param(hidden), param(hidden)]
        )
        self.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.ParameterList()
            for _ in range(4):  # query, key, value, attention output
                block.extend([param(hidden, hidden), param(hidden)])
            block.extend([param(hidden), param(hidden)])  # attention LayerNorm
            block.extend([param(intermediate, hidden), param(intermediate), param(hidden, intermediate), param(hidden)])
            block.extend([param(hidden), param(hidden)])  # output LayerNorm
            self.layers.append(block)
        self.pooler = nn.ParameterList([param(hidden, hidden), param(hidden)])


def transformer(smoke: bool = False) -> nn.Module:
    if smoke:
        return BertShapes(layers=1, hidden=32, intermediate=64, vocab=100, positions=16)
    return BertShapes()


class MixedPrecisionBlocks(nn.Module):
    """A mixed fp32/bf16 model: bf16 Linear layers with fp32 LayerNorms between them, the way
    mixed-precision models keep their normalization in fp32. 24 blocks of 2 x Linear(768, 768) bf16 +
    LayerNorm(768) fp32: 144 tensors, 28.4M bf16 + 37k fp32 (54.2 MiB)."""

    def __init__(self, blocks=24, hidden=768):
        super().__init__()
        layers = []
        for _ in range(blocks):
            layers += [nn.Linear(hidden, hidden).to(torch.bfloat16), nn.Linear(hidden, hidden).to(torch.bfloat16)]
            layers.append(nn.LayerNorm(hidden))
        self.layers = nn.ModuleList(layers)


def mixed(smoke: bool = False) -> nn.Module:
    return MixedPrecisionBlocks(blocks=2, hidden=32) if smoke else MixedPrecisionBlocks()


SHAPES = {"wide": wide, "tiny": tiny, "transformer": transformer, "mixed": mixed}
