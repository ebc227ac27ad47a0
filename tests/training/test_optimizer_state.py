import pytest
import torch

from ldm_cli.checkpoint import CheckpointManager
from ldm_cli.training.optimizer_state import load_optimizer_state


def _steps(optimizer: torch.optim.Optimizer, parameter: torch.nn.Parameter, grads: list[torch.Tensor]) -> None:
    for grad in grads:
        parameter.grad = grad.contiguous(memory_format=torch.channels_last)
        optimizer.step()


@pytest.mark.parametrize("fused", [True, False])
def test_resumed_optimizer_updates_a_channels_last_parameter_as_an_uninterrupted_one(fused, tmp_path):
    """Checkpoints store moments contiguous; fused AdamW must get them back in the parameter's layout."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(8, 16, 3, 3, generator=generator)
    grads = [torch.randn(8, 16, 3, 3, generator=generator) for _ in range(4)]

    def fresh() -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
        parameter = torch.nn.Parameter(start.clone().contiguous(memory_format=torch.channels_last))
        return parameter, torch.optim.AdamW([parameter], lr=0.1, fused=fused)

    straight, straight_optimizer = fresh()
    _steps(straight_optimizer, straight, grads)

    first, first_optimizer = fresh()
    _steps(first_optimizer, first, grads[:2])
    manager = CheckpointManager(tmp_path)
    manager.save(2, {"parameter": first.detach(), "optimizer": first_optimizer.state_dict()})
    state = manager.load()
    assert state["optimizer"]["state"][0]["exp_avg"].is_contiguous()  # stored without the layout

    resumed, resumed_optimizer = fresh()
    with torch.no_grad():
        resumed.copy_(state["parameter"])
    load_optimizer_state(resumed_optimizer, state["optimizer"])
    moments = resumed_optimizer.state[resumed]
    assert moments["exp_avg"].stride() == resumed.stride() == moments["exp_avg_sq"].stride()
    torch.testing.assert_close(moments["exp_avg"], first_optimizer.state[first]["exp_avg"], rtol=0, atol=0)
    _steps(resumed_optimizer, resumed, grads[2:])
    torch.testing.assert_close(resumed.detach(), straight.detach(), rtol=0, atol=1e-6)
