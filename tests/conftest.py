import pytest

from dibs.data.synthetic import corpus, make_task


@pytest.fixture(scope="session")
def task():
    return make_task(seed=0, n_train=300, n_test=40)


@pytest.fixture(scope="session")
def tokenizer(task, tmp_path_factory):
    from dibs.data.tokenizer import train_tokenizer

    return train_tokenizer(corpus(task.train), tmp_path_factory.mktemp("tokenizer"), vocab_size=400)


def build_tiny(tokenizer, tie_word_embeddings: bool = True):
    """The tests' tiny Qwen2 (hidden 32, 2 layers), randomly initialised with seed 0."""
    from dibs.modeling import build_tiny_qwen2

    return build_tiny_qwen2(
        tokenizer,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=tie_word_embeddings,
        seed=0,
    )


@pytest.fixture()
def tiny_model(tokenizer):
    return build_tiny(tokenizer)


@pytest.fixture()
def tiny_model_factory(tokenizer):
    return lambda tied=True: build_tiny(tokenizer, tie_word_embeddings=tied)
