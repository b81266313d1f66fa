import torch

from llm.training.tasks.regression_task import mlp


def test_dropout_leaves_the_mlp_weight_names_as_they_were():
    plain, dropped = mlp(4, 8, 2, 1), mlp(4, 8, 2, 1, dropout=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # checkpoints load either way
    assert sum(isinstance(m, torch.nn.Dropout) for m in dropped.modules()) == 2
    x = torch.randn(64, 4)
    dropped.load_state_dict(plain.state_dict())
    assert not torch.equal(dropped(x), plain(x)) and torch.equal(dropped.eval()(x), plain(x))
