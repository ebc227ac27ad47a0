"""Prompt weights (A1111 syntax), 75-token chunks and clip skip: hand-computed expectations on the tiny CLIP."""

from types import SimpleNamespace

import pytest
import torch

from ldm_cli.diffusion.prompt_weights import BREAK, chunk_tokens, parse_prompt_weights
from ldm_cli.diffusion.text import TextEncoderConfig, load_text_encoder
from ldm_cli.errors import ConfigError


@pytest.fixture(scope="module")
def tiny():
    return load_text_encoder(TextEncoderConfig(tiny=True, max_length=16))  # chunks of 14 tokens


# A1111's own examples (modules/prompt_parser.py, parse_prompt_attention's docstring)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)],
        ),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("a cat BREAK a dog", [("a cat", 1.0), (BREAK, -1.0), ("a dog", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_prompt_weights_follows_a1111(text, expected):
    parsed = parse_prompt_weights(text)
    assert [fragment for fragment, _ in parsed] == [fragment for fragment, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


def test_chunks_are_wrapped_padded_and_broken_by_break():
    def tokenize(text):  # one token per character, ids = code points
        return [ord(character) for character in text]

    chunks = chunk_tokens([("abcde", 1.0), ("fg", 2.0)], tokenize, chunk_length=3, bos=1, eos=2, pad=0)
    assert [chunk.ids for chunk in chunks] == [[1, 97, 98, 99, 2], [1, 100, 101, 102, 2], [1, 103, 2, 0, 0]]
    assert [chunk.weights for chunk in chunks] == [[1, 1, 1, 1, 1], [1, 1, 1, 2, 1], [1, 2, 1, 1, 1]]
    exactly_full = chunk_tokens([("abc", 1.0)], tokenize, 3, 1, 2, 0)
    assert [chunk.ids for chunk in exactly_full] == [[1, 97, 98, 99, 2]]  # no empty chunk after a full one
    broken = chunk_tokens([("a", 1.0), (BREAK, -1.0), ("b", 1.0)], tokenize, 3, 1, 2, 0)
    assert [chunk.ids for chunk in broken] == [[1, 97, 2, 0, 0], [1, 98, 2, 0, 0]]
    assert [chunk.ids for chunk in chunk_tokens([("", 1.0)], tokenize, 3, 1, 2, 0)] == [[1, 2, 0, 0, 0]]


def test_a_plain_short_prompt_encodes_bit_identically_to_encode(tiny):
    for prompt in ("a cat", "", "a red square"):
        assert torch.equal(tiny.encode_prompt(prompt), tiny.encode([prompt])[0])
        assert torch.equal(tiny.encode_prompt(prompt, weighting=False), tiny.encode([prompt])[0])


def _model_on(tiny, ids):
    return tiny.model(input_ids=torch.tensor(ids)).last_hidden_state


def test_a_long_prompt_is_encoded_in_chunks_not_truncated(tiny):
    prompt = "a red square on a blue sky"  # 20 byte tokens (spaces are none): chunks of 14 + 6
    ids = tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) == 20
    bos, eos, pad = tiny.tokenizer.bos_token_id, tiny.tokenizer.eos_token_id, tiny.tokenizer.pad_token_id
    expected = _model_on(tiny, [[bos, *ids[:14], eos], [bos, *ids[14:], eos, *[pad] * 8]]).reshape(-1, 32)
    embedding = tiny.encode_prompt(prompt)
    assert embedding.shape == (32, 32)
    torch.testing.assert_close(embedding, expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def biased():
    """The tiny CLIP with a final layer-norm bias: chunks then have a clear mean (as real CLIP's do)."""
    encoder = load_text_encoder(TextEncoderConfig(tiny=True, max_length=16))
    with torch.no_grad():
        encoder.model.final_layer_norm.bias.fill_(0.5)
    return encoder


def test_weights_scale_tokens_and_keep_the_chunk_mean(biased):
    tiny = biased
    ids_cat = tiny.tokenizer("cat", add_special_tokens=False)["input_ids"]
    ids_rest = tiny.tokenizer(" a mat", add_special_tokens=False)["input_ids"]
    bos, eos, pad = tiny.tokenizer.bos_token_id, tiny.tokenizer.eos_token_id, tiny.tokenizer.pad_token_id
    ids = [bos, *ids_cat, *ids_rest, eos]
    ids += [pad] * (16 - len(ids))
    z = _model_on(tiny, [ids])[0]
    weights = torch.ones(16)
    weights[1 : 1 + len(ids_cat)] = 1.5
    weighted = z * weights[:, None]
    expected = weighted * (z.mean() / weighted.mean())
    embedding = tiny.encode_prompt("(cat:1.5) a mat")
    torch.testing.assert_close(embedding, expected)
    assert embedding.mean().item() == pytest.approx(z.mean().item(), abs=1e-6)
    # literally: the brackets are text
    literal = tiny.encode_prompt("(cat:1.5) a mat", weighting=False)
    assert torch.equal(literal, tiny.encode(["(cat:1.5) a mat"])[0])


def test_a_chunk_with_a_mean_near_zero_is_scaled_without_renormalising(tiny):
    # the unbiased tiny CLIP's final layer norm makes every chunk's mean ~0: the weights alone apply
    ids = tiny.tokenizer("cat", add_special_tokens=False)["input_ids"]
    plain = tiny.encode(["cat"])[0]
    weighted = tiny.encode_prompt("(cat:2)")
    assert weighted.isfinite().all()
    torch.testing.assert_close(weighted[1 : 1 + len(ids)], 2 * plain[1 : 1 + len(ids)])
    torch.testing.assert_close(weighted[1 + len(ids) :], plain[1 + len(ids) :])


def test_break_starts_a_new_chunk(tiny):
    embedding = tiny.encode_prompt("a cat BREAK a dog")
    assert embedding.shape == (32, 32)
    # the chunks are encoded as one batch: equal to each alone up to float rounding (batch-dependent sums)
    torch.testing.assert_close(embedding[:16], tiny.encode(["a cat"])[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(embedding[16:], tiny.encode(["a dog"])[0], rtol=1e-6, atol=1e-6)


class _Callable:
    """The text model, also reachable as `.text_model` (as diffusers expects)."""

    def __init__(self, model):
        self.model, self.text_model, self.config, self.dtype = model, model, model.config, model.dtype

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def test_clip_skip_matches_diffusers_encode_prompt(tiny):
    from diffusers import StableDiffusionPipeline

    # diffusers' clip_skip counts the layers skipped: its 1 is A1111's (and our) 2
    model = tiny.model
    # diffusers 0.42 reaches the final layer norm through `.text_model`, which transformers 5 flattened away
    host = SimpleNamespace(text_encoder=_Callable(model), tokenizer=tiny.tokenizer, unet=None)
    for ours, theirs in ((1, None), (2, 1)):
        expected, _ = StableDiffusionPipeline.encode_prompt(
            host, "a cat", torch.device("cpu"), 1, False, clip_skip=theirs
        )
        torch.testing.assert_close(tiny.encode_prompt("a cat", clip_skip=ours), expected[0], rtol=0, atol=0)
    assert not torch.allclose(tiny.encode_prompt("a cat", clip_skip=2), tiny.encode_prompt("a cat"))
    with pytest.raises(ConfigError, match="between 1 and 2"):
        tiny.encode_prompt("a cat", clip_skip=3)
