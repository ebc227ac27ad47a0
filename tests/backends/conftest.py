import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models on a shared box: extra intra-op threads only spin
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
