"""A small byte-level BPE tokenizer trained on the synthetic task corpus.

Why byte-level BPE: it is lossless (decode(encode(x)) == x for any text, spaces and newlines
included, with no unknown token), it is the scheme Qwen2 itself uses so every consumer
(transformers, vLLM's incremental detokenizer) handles it without special cases, and its
training is deterministic. WordPiece drops whitespace on decode and Unigram needs an unknown
token for unseen characters; neither buys anything on a corpus this regular.

Digits are split into single tokens before BPE runs, so no merge ever glues digits together:
the column-by-column chain of thought needs one token per digit to line columns up.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
# A pad distinct from eos, so masking padding by id can never mask the end of a response.
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
DEFAULT_VOCAB_SIZE = 512
# ChatML turns, each ended by the tokenizer's EOS: the token the engine stops on is the one
# that ends an assistant turn (a template ending turns with a token that is not a stop
# token makes every response run to max_tokens; `k1rl doctor` checks for it).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|endoftext|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_alphabet_size() -> int:
    return len(pre_tokenizers.ByteLevel.alphabet())


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2
) -> Tokenizer:
    """Train byte-level BPE with single-digit pre-tokens; special tokens get ids 0 and 1."""
    floor = _byte_level_alphabet_size() + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ValueError(
            f"vocab_size {vocab_size} is below the byte alphabet plus special tokens ({floor})"
        )
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(texts)
    if not texts:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int,
                   chat_template: str | None = None) -> Path:
    """Write tokenizer.json + tokenizer_config.json loadable by AutoTokenizer (and so vLLM)."""
    # Imported here: transformers is heavy and only needed when writing the HF files.
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        # Cleanup would turn "5 ." into "5." on decode and break the exact round trip.
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        hf_tokenizer.chat_template = chat_template
    hf_tokenizer.save_pretrained(str(out_dir))
    return out_dir


def load_tokenizer(path: str | Path):
    """The saved tokenizer through transformers, exactly as a trainer or vLLM would load it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
