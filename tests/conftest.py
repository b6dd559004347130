import os

import pytest
import torch
from launcher import launch

# Without a GPU, Triton kernels run in its interpreter; the variable must be set before
# anything imports triton (test modules import it at collection time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_two_rank_run(tmp_path_factory):
    """launcher.TINY trained uninterrupted on 2 gloo ranks under torchrun: the run that
    test_train, test_reliability and test_multinode compare against, launched once per
    session. Tests only read it; one that changes it works on a copy."""
    run_dir = tmp_path_factory.mktemp("tiny") / "two_ranks"
    launch(run_dir, 2, torchrun=True)  # the other launches of several ranks skip torchrun's start
    return run_dir
