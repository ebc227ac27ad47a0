import torch

from ldm_cli.training.ema import EMA


def test_ema_warm_up_and_closed_form():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 0.0)
    ema = EMA(model, decay=0.9)
    expected = 0.0
    for n in range(30):
        model.weight.data.fill_(float(n + 1))
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * (n + 1)
        ema.update(model)
    assert abs(ema.shadow["weight"].item() - expected) < 1e-4
    restored = EMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 30 and torch.equal(restored.shadow["weight"], ema.shadow["weight"])
