import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA or HIP GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_gpu(tmp_path_factory):
    """A tiny fp32 Llama built for this GPU (max_seq_len 128, max_batch 4), shared by the scheduling tests."""
    from compiler.build import build, local_target

    return build("tiny-llama", tmp_path_factory.mktemp("tiny-gpu") / "tiny", targets=[str(local_target())],
                 dtype="fp32", max_seq_len=128, max_batch=4, autotune=False, reference=False).out
