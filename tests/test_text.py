"""Prompts longer than the text encoder's 77 tokens: read in windows, each encoded as the encoder was trained."""

import pytest
import torch

from vidsynth.text import encode_texts, padded_to_match, token_windows

CPU = torch.device("cpu")
WORDS = "a red circle moving left " * 20  # 100 words of one token each


@pytest.fixture
def tokenizer(tiny_pipeline):
    return tiny_pipeline.components.tokenizer


def plain_encoding(pipeline, texts):
    """Each text encoded as diffusers' pipeline does: one window, cut at 77 tokens."""
    tokenizer = pipeline.components.tokenizer
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return pipeline.components.text_encoder(ids).last_hidden_state


def test_a_prompt_that_fits_is_encoded_as_before(tiny_pipeline, tokenizer):
    texts = ["a red circle", "", "word " * 75]  # 75 tokens: the most a window holds beside the start and end tokens
    assert [len(token_windows(tokenizer, text)) for text in texts] == [1, 1, 1]
    with torch.no_grad():
        encoded = encode_texts(tokenizer, tiny_pipeline.components.text_encoder, texts, CPU)
        assert torch.equal(torch.cat(encoded), plain_encoding(tiny_pipeline, texts))


def test_a_text_given_twice_is_encoded_once(tiny_pipeline, tokenizer):
    """A generation encodes its negative prompt and the empty prompt, most often the same text."""
    encoder = tiny_pipeline.components.text_encoder
    batches = []
    hook = encoder.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            negative, empty, prompt, again = encode_texts(tokenizer, encoder, ["", "", WORDS, WORDS], CPU)
    finally:
        hook.remove()
    assert batches == [3]  # one window for "", two for the long prompt
    assert torch.equal(negative, empty) and torch.equal(prompt, again) and prompt.shape[1] == 2 * 77
    with torch.no_grad():
        assert torch.allclose(prompt, encode_texts(tokenizer, encoder, [WORDS], CPU)[0], atol=1e-6)  # batch apart


def test_windows_end_after_a_phrase_or_a_whole_word(tokenizer):
    windows = token_windows(tokenizer, WORDS)
    assert [len(window) for window in windows] == [75, 25]
    assert sum(windows, []) == tokenizer(WORDS, add_special_tokens=False).input_ids  # nothing lost, nothing added
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    windows = token_windows(tokenizer, "a red circle moving left, " * 20)  # six tokens a phrase
    assert [len(window) for window in windows] == [72, 48] and windows[0][-1] == comma
    words = "photorealistic " * 60  # several tokens a word
    windows = token_windows(tokenizer, words)
    assert len(windows) > 1 and all(len(window) <= 75 for window in windows)
    assert all(tokenizer.convert_ids_to_tokens(window)[-1].endswith("</w>") for window in windows)
    assert sum(windows, []) == tokenizer(words, add_special_tokens=False).input_ids


def test_each_window_is_encoded_as_a_prompt_of_its_own(tiny_pipeline, tokenizer):
    windows = token_windows(tokenizer, WORDS)
    with torch.no_grad():
        encoded, = encode_texts(tokenizer, tiny_pipeline.components.text_encoder, [WORDS], CPU)
        separately = plain_encoding(tiny_pipeline, [tokenizer.decode(window) for window in windows])
    assert encoded.shape == (1, 2 * 77, separately.shape[-1])
    assert torch.allclose(encoded, separately.reshape(encoded.shape), atol=1e-6)


def test_the_shorter_of_prompt_and_negative_gets_empty_windows():
    empty, short, long = torch.randn(1, 77, 8), torch.randn(1, 77, 8), torch.randn(1, 3 * 77, 8)
    for first, second in [(long, short), (short, long)]:
        first, second = padded_to_match(first, second, empty)
        assert first.shape == second.shape == long.shape
    assert torch.equal(second, long) and torch.equal(first[:, :77], short)
    assert torch.equal(first[:, 77:], torch.cat([empty, empty], dim=1))
    same = padded_to_match(short, empty, empty)
    assert same[0] is short and same[1] is empty
