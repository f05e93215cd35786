"""Byte-level BPE tokenizer for the demo pair, trained with the `tokenizers` library.

Owns the special tokens, the on-disk layout (`tokenizer.json` + `tokenizer_config.json`, which
`transformers.AutoTokenizer` and our own `dflash_ray.tokenizer.Tokenizer` both read) and the ChatML
chat template.

Byte-level pre-tokenization with a byte-level decoder makes `decode(encode(x)) == x` for any text,
which the engine's incremental detokenizer relies on.

    python -m dflash_ray.train.tokenizer --out DIR [--vocab-size 4096] [--max-files N]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import iter_texts, split_files

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK = "<|MASK|>"
# Order fixes the ids: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2, <|MASK|>=3.
SPECIAL_TOKENS = [EOS, IM_START, IM_END, MASK]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(files: Sequence[Path], vocab_size: int = 4096) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would break exact round-trips of raw source text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(files), trainer=trainer, length=len(files))
    return tok


def save_tokenizer(tok: Tokenizer, out: str | Path, model_max_length: int = 2048) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "mask_token": MASK,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "eos_token": EOS,
                "pad_token": EOS,
                "mask_token": MASK,
                "additional_special_tokens": [IM_START, IM_END],
            },
            indent=2,
        )
        + "\n"
    )
    return out


def build_tokenizer(out: str | Path, vocab_size: int = 4096, max_files: int | None = None) -> Path:
    """Train on the training split (optionally its first `max_files` files) and save to `out`."""
    train_files, _ = split_files()
    if max_files is not None:
        train_files = train_files[:max_files]
    return save_tokenizer(train_tokenizer(train_files, vocab_size), out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-files", type=int, default=None)
    args = ap.parse_args(argv)
    out = build_tokenizer(args.out, args.vocab_size, args.max_files)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    print(f"saved {out} vocab={tok.get_vocab_size()} special={ids}")


if __name__ == "__main__":
    main()
