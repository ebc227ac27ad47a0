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


def test_averaged_copy_holds_the_ema_weights_and_leaves_the_model_alone():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    ema.update(model)
    trained = {name: value.clone() for name, value in model.state_dict().items()}
    averaged = ema.averaged(model)
    assert averaged is not model and type(averaged) is type(model)
    for name, value in averaged.named_parameters():
        assert torch.equal(value, ema.shadow[name])
        assert not torch.equal(value, trained[name])  # the average lags the trained weights
    assert torch.equal(averaged.state_dict()["1.running_var"], trained["1.running_var"])  # buffers as trained
    assert all(torch.equal(value, trained[name]) for name, value in model.state_dict().items())


def test_loading_a_cpu_state_keeps_the_shadow_where_the_parameters_are():
    """Checkpoints are read on the CPU; the shadow must stay on the parameters' device (a GPU in
    training), or the next update mixes devices."""
    model = torch.nn.Linear(3, 2).to("meta")
    ema = EMA(model, decay=0.9)
    state = {name: torch.full(value.shape, 2.0) for name, value in ema.shadow.items()} | {"__updates__": torch.tensor(7)}
    ema.load_state_dict(state)
    assert {value.device.type for value in ema.shadow.values()} == {"meta"}
    assert ema.updates == 7
    ema.update(model)  # same-device update works

    cpu_model = torch.nn.Linear(3, 2)
    cpu_ema = EMA(cpu_model, decay=0.9)
    cpu_ema.load_state_dict(state)
    assert all(torch.equal(value, torch.full(value.shape, 2.0)) for value in cpu_ema.shadow.values())
    assert all(value.dtype == torch.float32 for value in cpu_ema.shadow.values())
