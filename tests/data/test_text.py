"""Text tokenizers and the t2i text prefix ([PAD].., BOS, caption, "<img>" left-padded to P)."""
import numpy as np
import pytest

from tokenflow_jax.data import text
from tokenflow_jax.shapes import detector as shapes_eval
from tokenflow_jax.shapes import scenes as shapes


@pytest.fixture(scope="module")
def tokenizer():
    return text.load_text_tokenizer("builtin:shapes")


def test_builtin_tokenizer_knows_every_caption_and_eval_prompt_word(tokenizer):
    unk = tokenizer.unk_token_id
    captions = [shapes.caption(shapes.sample_scene(shapes.scene_rng(i, 0))) for i in range(2000)]
    captions += [p.text for p in shapes_eval.make_prompts(10, 0)]
    ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
    assert all(unk not in row for row in ids)
    # Words and punctuation are separate tokens, so decoding gives the caption back.
    assert tokenizer.decode(ids[0]).replace(" ,", ",") == captions[0]
    assert text.vocab_size(tokenizer) == len(tokenizer.get_vocab())


def test_prefix_layout_left_padding_and_truncation(tokenizer):
    encoder = text.PromptEncoder(tokenizer, length=10, image_marker="<img>")
    vocab = tokenizer.get_vocab()
    bos, pad, marker = vocab["<s>"], vocab["[PAD]"], vocab["<img>"]
    out = encoder(["a red circle", "", "two red circles , a blue square and a green triangle"])
    words = [vocab[w] for w in ("a", "red", "circle")]
    np.testing.assert_array_equal(out.ids[0], [pad] * 5 + [bos] + words + [marker])
    np.testing.assert_array_equal(out.mask[0], [0] * 5 + [1] * 5)
    np.testing.assert_array_equal(out.ids[1], [pad] * 8 + [bos, marker])  # the empty (unconditional) caption
    long_words = "two red circles , a blue square and".split()[:8]
    np.testing.assert_array_equal(out.ids[2], [bos] + [vocab[w] for w in long_words] + [marker])
    np.testing.assert_array_equal(out.truncated, [False, False, True])
    assert out.ids.dtype == np.int32 and out.mask.dtype == np.int32


def test_tokenizer_without_bos_and_with_a_split_marker(tmp_path):
    """Qwen-style (no BOS) and Llama-style (the marker is several ordinary tokens): the marker's own ids end
    every prefix and nothing is prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "a": 2, "cat": 3, "<": 4, "img": 5, ">": 6}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # "<img>" -> "<", "img", ">"
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
    assert tok.bos_token_id is None
    out = text.PromptEncoder(tok, length=6, image_marker="<img>")(["a cat"])
    np.testing.assert_array_equal(out.ids[0], [0, 2, 3, 4, 5, 6])
    # A local directory loads through AutoTokenizer with the same ids.
    tok.save_pretrained(tmp_path)
    again = text.load_text_tokenizer(str(tmp_path))
    np.testing.assert_array_equal(text.PromptEncoder(again, 6)(["a cat"]).ids, out.ids)


def test_errors_name_the_field(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="builtin:nope"):
        text.load_text_tokenizer("builtin:nope")
    with pytest.raises(FileNotFoundError, match="config.text.tokenizer"):
        text.load_text_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="text_length"):
        text.PromptEncoder(tokenizer, length=1)
