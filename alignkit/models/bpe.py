"""Train a small byte-level BPE tokenizer for models built from scratch (the built-in world).

    tok = train_bpe_tokenizer(corpus, vocab_size=2048, out_dir="runs/tokenizer")
    tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                            add_generation_prompt=True)   # 'Human: 2+2?\\nAssistant:'

Choices:
- Byte-level BPE with no normaliser, so every string (any unicode) decodes back exactly.
- Special tokens, in this id order: <|pad|> = 0, <|eos|> = 1, <|bos|> = 2. Pad is distinct from
  eos, so padding never hides an end of sequence. No unk token: the 256 byte symbols cover all
  text. Nothing is added automatically when encoding (no BOS, no EOS); the data tokeniser
  appends EOS to responses.
- The chat template renders turns as "Human: ...", "Assistant: ...", "System: ..." joined by
  newlines; the generation prompt ends with "Assistant:" so a response starts with a space,
  exactly like the built-in world's prompts. The template adds no EOS.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS = "<|pad|>", "<|eos|>", "<|bos|>"
SPECIAL_TOKENS = [PAD, EOS, BOS]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n' }}{% endif -%}"
    "{%- if message['role'] == 'user' -%}{{ 'Human: ' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Assistant: ' + message['content'] }}"
    "{%- elif message['role'] == 'system' -%}{{ 'System: ' + message['content'] }}"
    "{%- else -%}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{% if messages %}{{ '\\n' }}{% endif %}{{ 'Assistant:' }}{%- endif -%}"
)


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`; the same texts always give the same vocab.

    `vocab_size` counts the 256 byte symbols and the 3 special tokens. When `out_dir` is given the
    tokenizer is saved there with `save_pretrained`, so `AutoTokenizer.from_pretrained` loads it.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be at least {minimum} (256 bytes + special tokens), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        clean_up_tokenization_spaces=False,  # the default cleanup would turn " ." into "."
        chat_template=CHAT_TEMPLATE,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
