"""The trained tokenizer round-trips exactly and survives AutoTokenizer, also beside a qwen2 config.json."""

from __future__ import annotations

import json
import shutil
import time
import unicodedata

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, Qwen2Config
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from dibs.data.synthetic import corpus, make_task
from dibs.data.tokenizer import (
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    PAD_TOKEN,
    QWEN2_SPLIT_REGEX,
    TOKENIZER_FILES,
    load_tokenizer,
    train_tokenizer,
)

ODD_TEXTS = [
    "héllo ∑ 日本 \t\n  x",
    "a . b 's  ,x  don't\r\n\r\n",  # nothing may "clean up" spaces before punctuation
    "emoji 🙂, NUL \x00, tabs\t\t, trailing spaces   ",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    task = make_task(seed=0, n_train=400, n_test=50)
    return corpus(task.train + task.test)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, texts):
    """(tokenizer-only folder, model folder = same files + a tiny qwen2 config.json, returned tokenizer)."""
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    trained = train_tokenizer(texts, tokenizer_dir)
    model_dir = tmp_path_factory.mktemp("model")
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, model_dir / name)
    config = Qwen2Config(
        vocab_size=len(trained),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
    )
    config.save_pretrained(model_dir)
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen2"
    return tokenizer_dir, model_dir, trained


@pytest.fixture(scope="module")
def trained(folders):
    return folders[2]


@pytest.fixture(scope="module")
def beside_model(folders):
    """What the model+tokenizer folder gives: transformers 5 rebuilds a Qwen2Tokenizer here."""
    return AutoTokenizer.from_pretrained(str(folders[1]))


def test_round_trip_is_exact_on_the_task_corpus(trained, beside_model, texts):
    for tokenizer in (trained, beside_model):
        for text in texts:
            assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_round_trip_is_exact_on_odd_text(trained, beside_model, text):
    for tokenizer in (trained, beside_model):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_ids_identical_trained_saved_and_reloaded_beside_a_qwen2_config(folders, beside_model, texts):
    tokenizer_dir, _, trained = folders
    as_saved = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))  # the pipeline exactly as trained
    for text in texts + ODD_TEXTS + ["e\u0301 A\u030a"]:  # decomposed accents: NFC in every pipeline
        assert as_saved.encode(text).ids == trained.encode(text) == beside_model.encode(text), text


def test_reloaded_backend_is_the_saved_one(folders, beside_model):
    """Qwen2Tokenizer rebuilds normalizer, pre-tokenizer, decoder and model itself: all must agree."""
    tokenizer_dir, _, trained = folders
    saved = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for tokenizer in (trained, beside_model):
        assert type(tokenizer).__name__ == "Qwen2Tokenizer"
        assert json.loads(tokenizer.backend_tokenizer.to_str()) == saved
    assert QWEN2_SPLIT_REGEX == PRETOKENIZE_REGEX


def test_decomposed_unicode_comes_back_composed(trained):
    # The one inexactness, forced by Qwen2Tokenizer's NFC normalizer: same text, canonical form.
    decomposed = "cafe\u0301"
    assert trained.decode(trained.encode(decomposed)) == unicodedata.normalize("NFC", decomposed) == "café"


def test_chat_template_is_chatml(trained, beside_model):
    messages = [{"role": "user", "content": "Ava has 2 pens."}]
    expected = "<|im_start|>user\nAva has 2 pens.<|im_end|>\n<|im_start|>assistant\n"
    system = [{"role": "system", "content": "Be brief."}]
    system_turn = "<|im_start|>system\nBe brief.<|im_end|>\n"
    kwargs = {"add_generation_prompt": True, "tokenize": False}
    for tokenizer in (trained, beside_model):
        assert tokenizer.apply_chat_template(messages, **kwargs) == expected
        assert tokenizer.apply_chat_template(system + messages, **kwargs) == system_turn + expected
        no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
        assert no_prompt == expected.removesuffix("<|im_start|>assistant\n")
        # transformers 5: tokenize=True gives a BatchEncoding (a dict), not a list of ids.
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert encoded["input_ids"] == tokenizer.encode(expected)


def test_special_tokens(trained, beside_model):
    for tokenizer in (trained, beside_model):
        assert (tokenizer.eos_token, tokenizer.eos_token_id) == (EOS_TOKEN, 2)
        assert (tokenizer.pad_token, tokenizer.pad_token_id) == (PAD_TOKEN, 0)
        assert tokenizer.bos_token is None
        assert tokenizer.encode("<|im_start|>user<|im_end|>") == [1, *tokenizer.encode("user"), 2]
        assert tokenizer("x")["input_ids"] == tokenizer.encode("x", add_special_tokens=False)  # no BOS/EOS
        ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|><|endoftext|>")
        assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_digits_are_one_token_each(trained, texts):
    for text in texts[:200] + ["0123456789 x12y 3.14 1,000"]:
        for token in trained.convert_ids_to_tokens(trained.encode(text)):
            assert not any(c.isdigit() for c in token) or len(token) == 1, token


def test_vocab_size_is_a_cap(tmp_path, texts):
    small = train_tokenizer(texts, tmp_path / "small", vocab_size=300)
    assert len(small) == 300
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, tmp_path / "tiny", vocab_size=MIN_VOCAB_SIZE - 1)


def test_training_on_2000_problems_is_fast(tmp_path):
    texts = corpus(make_task(seed=0, n_train=2000, n_test=0).train)
    start = time.perf_counter()
    tokenizer = train_tokenizer(texts, tmp_path / "tok")
    assert time.perf_counter() - start < 5.0  # measured ~0.1 s (train, save and reload) on 2 CPU cores
    assert len(tokenizer) <= 512


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer folder not found or incomplete: .*nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json, tokenizer_config.json"):
        load_tokenizer(tmp_path / "empty")
