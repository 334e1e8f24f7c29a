import pytest
import torch
from torch import nn

from companion.models.layers import mlp


def test_mlp_shapes_and_structure():
    net = mlp([4, 8, 8, 2], activation=nn.Tanh)
    assert net(torch.zeros(5, 4)).shape == (5, 2)
    assert [type(m) for m in net] == [nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear]


@pytest.mark.parametrize("bad", [[3], [3, 0], [3, 2.5]])
def test_mlp_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="sizes"):
        mlp(bad)
