import pytest


@pytest.fixture(scope="session")
def qwen2_policy(tiny_models):
    """(megatron policy, architecture, HF folder) of the tiny Qwen2 model, single process."""
    from ebft_megatron.checkpoint import store
    from ebft_megatron.models.gpt import build_model
    from ebft_megatron.runtime import distributed

    distributed.initialize(1, 1)
    hf_dir, ckpt = tiny_models["qwen2"]
    arch = store.architecture_of(ckpt)
    model = build_model(arch)
    store.load_model_weights(model, ckpt)
    model.eval()
    return model, arch, hf_dir


@pytest.fixture(scope="session")
def qwen2_features(tiny_models, qwen2_policy):
    """The frozen feature network of the same checkpoint (layers 1-3 of 4)."""
    from ebft_megatron.features.network import load_feature_network

    return load_feature_network(tiny_models["qwen2"][1], (1, 2, 3))
