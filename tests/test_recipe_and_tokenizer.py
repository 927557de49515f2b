import json

import pytest

from dq_export.errors import UserError
from dq_export.recipe import BITS, Recipe, check_image_size, parse_bits
from dq_export.tiny_tokenizer import TOKENIZER_DIR, WORDS, build_vocab_and_merges


@pytest.mark.parametrize("bits", BITS)
def test_every_bits_value_parses_and_round_trips(bits):
    recipe = Recipe(bits=parse_bits(bits.upper()), image_size=256)
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_four_bit_activations_are_refused_with_a_reason():
    with pytest.raises(UserError, match="activations below 8 bits"):
        parse_bits("w4a4")


def test_unknown_bits_lists_valid_values():
    with pytest.raises(UserError, match="fp32, fp16, w8a8, w8a16, w4a16, w4a8"):
        parse_bits("int3")


@pytest.mark.parametrize("settings", [dict(bits="fp32"), dict(bits="w8a16"),
                                      dict(bits="w8a8", method="nncf")])
def test_target_cpu_needs_our_int8_activations(settings):
    with pytest.raises(UserError, match="--target-cpu"):
        Recipe(target_cpu="auto", **settings).check()
    assert Recipe(bits="w8a8", target_cpu="auto").check().target_cpu == "auto"
    with pytest.raises(UserError, match="target_cpu 'fast' is not valid"):
        Recipe(bits="w8a8", target_cpu="fast").check()


def test_recipe_from_newer_writer_is_refused():
    with pytest.raises(UserError, match="unknown fields"):
        Recipe.from_dict({"bits": "fp32", "magic": 1})
    with pytest.raises(UserError, match="newer"):
        Recipe.from_dict({"bits": "fp32", "version": 99})


@pytest.mark.parametrize("size", [0, -8, 63, 100])
def test_image_size_must_be_a_multiple_of_8(size):
    with pytest.raises(UserError, match="multiple of 8"):
        check_image_size(size)


def test_committed_tokenizer_matches_its_generator():
    vocab, merges = build_vocab_and_merges(WORDS.split())
    assert json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8")) == vocab
    assert (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] == merges


def test_caption_words_are_single_tokens():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    for word in WORDS.split():
        assert len(tokenizer(word).input_ids) == 3, word  # <start> word <end>
    assert len(tokenizer("a handwritten digit 7").input_ids) == 6


def test_recipe_of_version_1_read_back_as_float_attention():
    """Exports written before attention was quantized say so when read back."""
    old = {k: v for k, v in Recipe(bits="w8a8").to_dict().items() if k != "attention"}
    assert Recipe.from_dict({**old, "version": 1}).attention == "float"
    assert Recipe.from_dict(Recipe(bits="w8a8", attention="qkv").to_dict()).attention == "qkv"
    with pytest.raises(UserError, match="attention 'fp8' is not valid"):
        Recipe(bits="w8a8", attention="fp8").check()
