"""Prompts of any length for a text encoder that reads 77 tokens at a time.

A prompt that fits is encoded as the encoder was trained: start token, its tokens, end token, padding, 77 in all.
A longer one is cut into windows of 75 tokens, each encoded that way, and the encodings are joined along the
sequence, which the UNet's cross-attention takes at any length. This is how sd-webui and its text2video extension
read long prompts; diffusers and ModelScope cut them at 77 tokens. Written here: the library that does it for
diffusers (compel) does it within its prompt-weighting syntax, parsed from every prompt; this needs only the windows.
"""

from __future__ import annotations

import torch

# A window ends after the last comma or full stop among its last this many tokens, so that a phrase stays whole;
# without one, after its last whole word.
PHRASE_LOOKBACK = 20
PHRASE_ENDS = (",</w>", ".</w>")
WORD_END = "</w>"  # CLIP's byte-pair tokens mark the end of a word so


def token_windows(tokenizer, text: str) -> list[list[int]]:
    """The text's token ids (no start or end tokens) in windows the encoder can read, at least one."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids  # verbose: no warning about the length
    tokens = tokenizer.convert_ids_to_tokens(ids)
    size = tokenizer.model_max_length - 2  # room for the start and end tokens
    windows = []
    while len(ids) > size:
        end = _window_end(tokens, size)
        windows.append(ids[:end])
        ids, tokens = ids[end:], tokens[end:]
    windows.append(ids)
    return windows


def _window_end(tokens: list[str], size: int) -> int:
    for end in range(size, size - PHRASE_LOOKBACK, -1):
        if tokens[end - 1] in PHRASE_ENDS:
            return end
    for end in range(size, 0, -1):
        if tokens[end - 1].endswith(WORD_END):
            return end
    return size  # one word longer than a window


def encode_texts(tokenizer, text_encoder: torch.nn.Module, texts: list[str],
                 device: torch.device) -> list[torch.Tensor]:
    """Each text's encoding, 1 x (77 x its windows) x width: every window of every distinct text in one batch (the
    negative prompt is usually the empty one, which a generation also encodes)."""
    length = tokenizer.model_max_length
    distinct = list(dict.fromkeys(texts))
    windows = [token_windows(tokenizer, text) for text in distinct]
    rows = []
    for window in (w for text_windows in windows for w in text_windows):
        ids = [tokenizer.bos_token_id, *window, tokenizer.eos_token_id]
        rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
    encoded = text_encoder(torch.tensor(rows, device=device)).last_hidden_state
    width = encoded.shape[-1]
    by_text = dict(zip(distinct, (part.reshape(1, -1, width) for part in encoded.split([len(w) for w in windows]))))
    return [by_text[text] for text in texts]


def padded_to_match(first: torch.Tensor, second: torch.Tensor,
                    empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two encodings as long as the longer, the shorter extended with `empty` windows (the encoding of an empty
    prompt): a guided step puts the prompt and the negative prompt in one batch."""
    def extended(encoding: torch.Tensor, tokens: int) -> torch.Tensor:
        missing = (tokens - encoding.shape[1]) // empty.shape[1]
        return torch.cat([encoding, *[empty] * missing], dim=1) if missing else encoding
    tokens = max(first.shape[1], second.shape[1])
    return extended(first, tokens), extended(second, tokens)
