"""A Qwen2-style byte-level BPE tokenizer trained on the task corpus, saved as a Hugging Face folder.

No tokenizer can be downloaded here, so the embedded default trains its own (in well under a second). It is
built to survive `transformers.AutoTokenizer` unchanged, including beside a `config.json` with
`model_type: qwen2` (the model+tokenizer folder). In that case transformers 5 does NOT load tokenizer.json as
saved: it instantiates `Qwen2Tokenizer`, which keeps only the vocab, the merges and the post-processor and
rebuilds the rest from its own code (NFC normalizer, the Qwen2 split regex, a ByteLevel pre-tokenizer without
its own regex, a ByteLevel decoder). Any other pipeline, e.g. a char-level vocab, is silently replaced and
loses characters. So the pipeline trained here IS that pipeline:

- NFC normalizer: Qwen2Tokenizer applies it anyway; doing it here too keeps the ids of the trained and the
  reloaded tokenizer identical for every input (a decomposed "e" + U+0301 decodes as the composed "é");
- the Qwen2 split regex (`\\p{N}` alone: one token per digit, which arithmetic needs) + ByteLevel, and
  `initial_alphabet=ByteLevel.alphabet()` so that every byte has a token and nothing is ever unknown;
- `tokenizer_class: Qwen2Tokenizer` in tokenizer_config.json, so that a tokenizer-only folder loads as the
  same class as the model folder, on every later run and in every backend.

Special tokens: `<|endoftext|>` (pad, and unk as in Qwen2), `<|im_start|>`, `<|im_end|>` (eos, ends a turn).
The chat template is ChatML without a default system prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from transformers import PreTrainedTokenizerFast as TokenizerFast

# Copied from transformers' Qwen2Tokenizer (PRETOKENIZE_REGEX); a test checks it still matches.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, EOS_TOKEN)  # ids 0, 1, 2
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 512) -> TokenizerFast:
    """Train on `texts`, save to `out_dir` (tokenizer.json + tokenizer_config.json) and return it reloaded.

    The returned object is what `AutoTokenizer` gives for the folder (a Qwen2Tokenizer), so the run that
    trains the tokenizer and every later run that loads it share one code path.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + 3 specials), not {vocab_size}")
    backend = qwen2_pipeline()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        continuing_subword_prefix="",  # as Qwen2Tokenizer rebuilds the model (the trainer's default is None)
        end_of_word_suffix="",
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    _save(backend, Path(out_dir))
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """`AutoTokenizer` on a local folder; a missing folder or file is a clear error, never a Hub lookup."""
    from transformers import AutoTokenizer

    path = Path(path)
    missing = [name for name in TOKENIZER_FILES if not (path / name).is_file()]
    if missing and not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise FileNotFoundError(
            f"tokenizer folder not found or incomplete: {path} (missing {', '.join(missing)}); "
            "train one with dibs.data.tokenizer.train_tokenizer"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def qwen2_pipeline() -> Tokenizer:
    """An untrained BPE with exactly the normalizer, pre-tokenizer and decoder Qwen2Tokenizer rebuilds."""
    backend = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # ids unchanged; as Qwen2 ships it
    return backend


def _save(backend: Tokenizer, out_dir: Path) -> None:
    """Write the folder through transformers (so the config has what it expects), then name the class."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,  # Qwen2Tokenizer's default; byte-level BPE never emits it
        extra_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,  # "a ." must decode as "a .", not "a."
        model_max_length=1 << 30,
    )
    wrapped.save_pretrained(str(out_dir), save_jinja_files=False)  # template inside tokenizer_config.json
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "Qwen2Tokenizer"
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False)
    config_file.write_text(text + "\n", encoding="utf-8")
