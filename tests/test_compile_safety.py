"""torch.compile safety: TorchDynamo captures each network in one graph, without graph breaks, in training (deep
supervision, CPU speed paths) and in eval mode (BatchNorm folding). nnU-Net compiles the network on CUDA by default."""
import pytest
import torch

from nnunetv2_lgms.networks.glims import GLIMS
from nnunetv2_lgms.networks.lgmsnet import LGMSNet


def graph_breaks(net, x):
    explanation = torch._dynamo.explain(net)(x)
    return explanation.graph_count, [str(b.reason) for b in explanation.break_reasons]


@pytest.mark.parametrize("train", [True, False])
def test_lgmsnet_2d_compiles_to_one_graph(train):
    net = LGMSNet.from_plan((32, 32), [[1, 1]] + [[2, 2]] * 4, [[3, 3]] * 5, 3, 2, deep_supervision=train)
    net.train(train)
    assert graph_breaks(net, torch.randn(2, 3, 32, 32)) == (1, [])


def test_lgmsnet_3d_and_glims_compile_to_one_graph_when_training():
    lgms = LGMSNet.from_plan((8, 16, 16), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                             [[1, 3, 3]] + [[3, 3, 3]] * 4, 1, 2, deep_supervision=True)
    assert graph_breaks(lgms, torch.randn(1, 1, 8, 16, 16)) == (1, [])
    glims = GLIMS.from_plan((32, 32, 32), [[1, 1, 1]] + [[2, 2, 2]] * 4, [[3, 3, 3]] * 5, 1, 2, True,
                            feature_size=12)
    assert graph_breaks(glims, torch.randn(1, 1, 32, 32, 32)) == (1, [])
