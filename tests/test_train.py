"""companion.train: the loop learns, records, checkpoints, and resumes exactly."""
import pytest
import torch
from torch import nn

from companion.train import History, load_checkpoint, minibatch_indices, train


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    return x, y


def _noisy_mse(model, batch):
    # a loss that also draws from the global generator, as a reparameterized model does
    x, y = batch
    noise = 0.01 * torch.randn(x.shape[0])
    return ((model(x).squeeze(-1) + noise - y) ** 2).mean()


def _model():
    torch.manual_seed(123)
    return nn.Linear(3, 1)


def test_loss_falls_on_a_tiny_problem():
    hist = train(_model(), _noisy_mse, _problem(), steps=300, batch_size=32, lr=0.05, device="cpu")
    assert isinstance(hist, History) and len(hist.loss) == 300
    assert sum(hist.loss[-20:]) / 20 < 0.01 * sum(hist.loss[:20]) / 20


def test_train_draws_the_batches_of_minibatch_indices():
    # the loop draws each epoch's order once; its batches must be minibatch_indices' (resuming
    # relies on it)
    x = torch.arange(50.0).unsqueeze(1)
    seen = []

    def record(model, batch):
        seen.append(batch[:, 0].long())
        return model(batch).sum() * 0.0

    train(_model_1d(), record, x, steps=23, batch_size=7, seed=5, device="cpu")
    for t, rows in enumerate(seen):
        assert torch.equal(rows, minibatch_indices(t, 50, 7, 5))


def test_a_loss_that_is_not_finite_stops_the_run():
    def diverging(model, batch):
        return model(batch).sum() * float("nan")

    with pytest.raises(FloatingPointError, match="step 0"):
        train(_model_1d(), diverging, torch.ones(4, 1), steps=3, device="cpu")


def _model_1d():
    torch.manual_seed(0)
    return nn.Linear(1, 1)


def test_minibatches_cover_each_epoch_once():
    seen = torch.cat([minibatch_indices(t, 100, 10, seed=3) for t in range(10)])
    assert sorted(seen.tolist()) == list(range(100))
    assert torch.equal(minibatch_indices(4, 100, 10, 3), minibatch_indices(4, 100, 10, 3))
    assert not torch.equal(minibatch_indices(0, 100, 10, 3), minibatch_indices(10, 100, 10, 3))


def test_interrupted_and_resumed_run_equals_straight_run(tmp_path):
    straight = _model()
    h1 = train(straight, _noisy_mse, _problem(), steps=20, batch_size=32, lr=0.05, seed=1, device="cpu",
               callback=lambda t, m: {"w0": m.weight[0, 0]}, callback_every=5)

    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 11:  # dies during step 11, after the checkpoint at step 8
            raise KeyboardInterrupt
        return _noisy_mse(model, batch)

    path = tmp_path / "ckpt.pt"
    interrupted = _model()
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, crashing, _problem(), steps=20, batch_size=32, lr=0.05, seed=1, device="cpu",
              checkpoint_path=path, checkpoint_every=4, callback=lambda t, m: {"w0": m.weight[0, 0]},
              callback_every=5)
    assert load_checkpoint(path)["step"] == 8

    resumed = _model()
    torch.manual_seed(999)  # whatever the global state is now, the checkpoint restores it
    h2 = train(resumed, _noisy_mse, _problem(), steps=20, batch_size=32, lr=0.05, seed=1, device="cpu",
               checkpoint_path=path, checkpoint_every=4, resume=True,
               callback=lambda t, m: {"w0": m.weight[0, 0]}, callback_every=5)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert h1.loss == h2.loss and h1.evals == h2.evals
    state = torch.load(path, weights_only=True)  # plain tensors and values only
    assert state["step"] == 20


def test_data_none_and_full_batch():
    p = nn.Parameter(torch.tensor(3.0))
    m = nn.Module()
    m.p = p
    hist = train(m, lambda model, batch: (model.p - 1.0) ** 2, None, steps=200, lr=0.1, device="cpu")
    assert abs(p.item() - 1.0) < 1e-2 and len(hist.loss) == 200
    seen = []
    train(nn.Linear(3, 1), lambda model, batch: (seen.append(batch[0].shape[0]), model(batch[0]).sum())[1] * 0,
          _problem(), steps=2, device="cpu")
    assert seen == [256, 256]


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        train(_model(), _noisy_mse, _problem(), steps=-1)
    with pytest.raises(ValueError, match="checkpoint_path"):
        train(_model(), _noisy_mse, _problem(), steps=1, checkpoint_every=5)
    with pytest.raises(ValueError, match="checkpoint_path"):
        train(_model(), _noisy_mse, _problem(), steps=1, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_model(), _noisy_mse, _problem(), steps=1, resume=True, checkpoint_path="/nonexistent/x.pt")
    with pytest.raises(ValueError, match="batch_size"):
        train(_model(), _noisy_mse, _problem(), steps=1, batch_size=1000, device="cpu")
    with pytest.raises(ValueError, match="scalar"):
        train(_model(), lambda m, b: m(b[0]), _problem(), steps=1, device="cpu")
    with pytest.raises(ValueError, match="first dimension"):
        train(_model(), _noisy_mse, (torch.zeros(3, 3), torch.zeros(4)), steps=1, device="cpu")


def test_step_is_passed_to_a_loss_that_asks_for_it_and_survives_resume(tmp_path):
    seen = []

    def loss(model, batch, step):
        seen.append(step)
        return (model.weight**2).sum()

    path = tmp_path / "c.pt"
    train(nn.Linear(2, 1), loss, None, steps=4, device="cpu", checkpoint_path=path, checkpoint_every=2)
    train(nn.Linear(2, 1), loss, None, steps=7, device="cpu", checkpoint_path=path, checkpoint_every=2, resume=True)
    assert seen == [0, 1, 2, 3, 4, 5, 6]


def test_a_callback_may_record_nothing():
    hist = train(nn.Linear(2, 1), lambda m, b: (m.weight**2).sum(), None, steps=6, device="cpu",
                 callback=lambda t, m: None if t % 2 else {"t": t}, callback_every=1)
    assert [e["step"] for e in hist.evals] == [2, 4, 6]
