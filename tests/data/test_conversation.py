"""Chat templates, image-token expansion, label masks and skip reasons (data/conversation.py)."""
import numpy as np
import pytest

from tokenflow_jax.data import conversation as conv
from tokenflow_jax.data import text

IMG = conv.IMAGE_TOKEN_INDEX
TWO_TURNS = [
    {"from": "human", "value": "<image>\nWhat is in the picture?"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "Top left."},
]
ONE_TURN = TWO_TURNS[:2]

# Hand-written from LLaVA's conversation.py (SeparatorStyle.TWO / CHATML / PLAIN) and TokenFlow's
# i2t/llava/train/train.py (preprocess_plain keeps only "<image>" of the question).
EXPECTED = {
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the picture? "
        "ASSISTANT: A red circle.</s>USER: Where is it? ASSISTANT: Top left.</s>"
    ),
    "qwen_2_5": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n"
        "<|im_start|>user\nWhere is it?<|im_end|>\n"
        "<|im_start|>assistant\nTop left.<|im_end|>\n"
    ),
}
EXPECTED_PLAIN = "<image>A red circle.\n"
TRAINED = {  # the decoded text of each run of trained tokens
    "vicuna_v1": [" A red circle.</s>", " Top left.</s>"],
    "qwen_2_5_replies": ["A red circle.<|im_end|>\n", "Top left.<|im_end|>\n"],
}
LLAMA3_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
    "<|end_header_id|>\n\n{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]


def _bpe_tokenizer(add_bos: bool, chat_template: str | None = None):
    """A byte-level BPE trained on the test strings (decoding is exact), Llama-style BOS if ``add_bos``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([*EXPECTED.values(), EXPECTED_PLAIN] * 3, trainer)
    if add_bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def llama_like():
    return _bpe_tokenizer(add_bos=True)


@pytest.fixture(scope="module")
def qwen_like():
    return _bpe_tokenizer(add_bos=False)


def _runs(labels: np.ndarray) -> list[list[int]]:
    """Contiguous runs of trained labels."""
    runs, current = [], []
    for label in labels.tolist() + [conv.IGNORE_INDEX]:
        if label != conv.IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs


@pytest.mark.parametrize("template", ["vicuna_v1", "qwen_2_5_replies"])
def test_rendered_text_and_trained_replies(template, llama_like):
    expected = EXPECTED[template.removesuffix("_replies")]
    rendered = conv.render(TWO_TURNS, template)
    assert rendered.text == expected
    assert [rendered.text[s:e] for s, e in rendered.trained_spans] == TRAINED[template]

    enc = conv.encode_conversation(TWO_TURNS, llama_like, template, num_image_tokens=5, max_length=512)
    assert enc.input_ids.dtype == np.int32 and enc.labels.dtype == np.int32 and enc.has_image and not enc.truncated
    # Labels are the input ids (HF alignment) where trained, and decode to exactly the replies + separators.
    trained = enc.labels != conv.IGNORE_INDEX
    np.testing.assert_array_equal(enc.labels[trained], enc.input_ids[trained])
    assert [llama_like.decode(run) for run in _runs(enc.labels)] == TRAINED[template]
    # The image: 5 sentinels right where "<image>" was, never trained; the text decodes back around it.
    image_at = np.flatnonzero(enc.input_ids == IMG)
    assert len(image_at) == 5 and np.all(np.diff(image_at) == 1) and not trained[image_at].any()
    before, after = expected.split("<image>")
    bos = "<s>" if template == "vicuna_v1" else ""  # Llama-style BOS for vicuna; chat templates add none
    assert llama_like.decode(enc.input_ids[: image_at[0]]) == bos + before
    assert llama_like.decode(enc.input_ids[image_at[-1] + 1:]) == after


REFERENCE_QWEN_CHAT_TEMPLATE = (  # preprocess_qwen's reset chat template, verbatim
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _preprocess_qwen_reference(conversations, tokenizer, *, has_image: bool, num_image_tokens: int,
                               newline_id: int, system_message: str = "You are a helpful assistant."):
    """(input_ids, labels) as TokenFlow's ``preprocess_qwen`` (ByteFlow-AI/TokenFlow, i2t/llava/train/train.py)
    builds them, re-written here from its rules rather than from our module:

    - LLaVA's ``preprocess_multimodal`` first moves "<image>" to the front of its turn, followed by "\\n";
    - a copy of the tokenizer gets "<image>" as an added special token (when there is an image) and the
      chat template above; ``im_start`` / ``im_end`` are the ids of the additional special tokens whose
      names contain "im_start" / "im_end";
    - the system message, then each turn, goes through ``apply_chat_template`` on its own; system and user
      turns get IGNORE_INDEX, assistant turns are their own targets (whole, "<|im_start|>assistant\\n"
      included); a leading non-human turn is dropped;
    - every position whose id is in ``[198, im_start, im_end]`` becomes its own target (198: Qwen2's
      newline token; here ``newline_id``, this tokenizer's byte-level "\\n");
    - the "<image>" id becomes IMAGE_TOKEN_INDEX, which LLaVA's ``prepare_inputs_labels_for_multimodal``
      later replaces by the image features, labelled IGNORE_INDEX (here ``num_image_tokens`` of them).
    """
    import copy

    ignore, roles = conv.IGNORE_INDEX, {"human": "user", "gpt": "assistant"}
    source = [dict(turn) for turn in conversations]
    for turn in source:  # preprocess_multimodal
        if "<image>" in turn["value"]:
            turn["value"] = ("<image>\n" + turn["value"].replace("<image>", "").strip()).strip()
    tokenizer = copy.deepcopy(tokenizer)
    if has_image:
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    # transformers 5 renamed additional_special_tokens to extra_special_tokens.
    names = getattr(tokenizer, "additional_special_tokens", None) or tokenizer.extra_special_tokens
    for name in names:
        if "im_start" in name:
            im_start = tokenizer.convert_tokens_to_ids(name)
        elif "im_end" in name:
            im_end = tokenizer.convert_tokens_to_ids(name)
    unmask_tokens_idx = [newline_id, im_start, im_end]
    tokenizer.chat_template = REFERENCE_QWEN_CHAT_TEMPLATE
    if roles[source[0]["from"]] != "user":
        source = source[1:]
    # return_dict=False: the list of ids, as apply_chat_template returned it in the reference's transformers.
    input_id = tokenizer.apply_chat_template([{"role": "system", "content": system_message}], return_dict=False)
    target = [ignore] * len(input_id)
    for turn in source:
        role = roles.get(turn["from"], turn["from"])
        encode_id = tokenizer.apply_chat_template([{"role": role, "content": turn["value"]}], return_dict=False)
        input_id += encode_id
        target += [ignore] * len(encode_id) if role in ("user", "system") else encode_id
    for idx, encode_id in enumerate(input_id):
        if encode_id in unmask_tokens_idx:
            target[idx] = encode_id
    ids, labels = [], []
    for token, label in zip(input_id, target):  # prepare_inputs_labels_for_multimodal
        if token == image_token_index and has_image:
            ids += [IMG] * num_image_tokens
            labels += [ignore] * num_image_tokens
        else:
            ids.append(token)
            labels.append(label)
    return np.asarray(ids), np.asarray(labels)


def test_qwen_2_5_labels_equal_preprocess_qwen(qwen_like):
    newline = qwen_like.convert_tokens_to_ids("\u010a")  # byte-level "\n" ("Ċ"), as 198 is in Qwen2's vocabulary
    assert qwen_like.decode([newline]) == "\n"
    for turns, has_image in [(TWO_TURNS, True), ([{"from": "gpt", "value": "dropped"}] + TWO_TURNS, True),
                             ([{"from": "human", "value": "Hi\nthere"}, {"from": "gpt", "value": "Hello.\n"}],
                              False)]:
        ids, labels = _preprocess_qwen_reference(turns, qwen_like, has_image=has_image, num_image_tokens=5,
                                                 newline_id=newline)
        enc = conv.encode_conversation(turns, qwen_like, "qwen_2_5", num_image_tokens=5, max_length=512,
                                       has_image=has_image)
        np.testing.assert_array_equal(enc.input_ids, ids)
        np.testing.assert_array_equal(enc.labels, labels)

    # What that mask is: whole assistant turns, and the markers of the system and user turns (the newline
    # after "<image>" too), never the role names, the system prompt, the questions or the image.
    enc = conv.encode_conversation(TWO_TURNS, qwen_like, "qwen_2_5", num_image_tokens=5, max_length=512)
    assert [qwen_like.decode(run) for run in _runs(enc.labels)] == [
        "<|im_start|>", "\n", "<|im_end|>\n<|im_start|>", "\n", "\n",
        "<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n<|im_start|>", "\n",
        "<|im_end|>\n<|im_start|>assistant\nTop left.<|im_end|>\n"]
    replies = conv.encode_conversation(TWO_TURNS, qwen_like, "qwen_2_5_replies", num_image_tokens=5, max_length=512)
    np.testing.assert_array_equal(replies.input_ids, enc.input_ids)
    assert (replies.labels != conv.IGNORE_INDEX).sum() < (enc.labels != conv.IGNORE_INDEX).sum()
    assert conv.marker_ids(qwen_like, "qwen_2_5") == (qwen_like.convert_tokens_to_ids("<|im_start|>"),
                                                      qwen_like.convert_tokens_to_ids("<|im_end|>"), newline)
    assert conv.marker_ids(qwen_like, "qwen_2_5_replies") == ()
    with pytest.raises(ValueError, match="trains every"):
        conv.encode_conversation(ONE_TURN, text.load_text_tokenizer("builtin:shapes"), "qwen_2_5",
                                 num_image_tokens=5, max_length=512)


def test_plain_template_keeps_only_the_image_and_the_caption(llama_like, qwen_like):
    question_ignored = [{"from": "human", "value": "Describe this.\n<image>"}, ONE_TURN[1]]
    assert conv.render(question_ignored, "plain").text == EXPECTED_PLAIN
    enc = conv.encode_conversation(question_ignored, llama_like, "plain", num_image_tokens=3, max_length=64)
    assert enc.input_ids[:4].tolist() == [llama_like.bos_token_id, IMG, IMG, IMG]
    assert llama_like.decode(enc.input_ids[4:]) == "A red circle.\n"
    assert [llama_like.decode(r) for r in _runs(enc.labels)] == ["A red circle.\n"]  # the newline is trained
    enc = conv.encode_conversation(question_ignored, qwen_like, "plain", num_image_tokens=3, max_length=64)
    assert enc.input_ids[:3].tolist() == [IMG] * 3  # no BOS when the tokenizer adds none (Qwen)
    with pytest.raises(conv.ConversationError) as info:
        conv.encode_conversation(TWO_TURNS, llama_like, "plain", num_image_tokens=3, max_length=64)
    assert info.value.reason == "bad_roles"


def test_image_placeholder_moves_to_the_front_and_text_only_records(qwen_like):
    late = [{"from": "human", "value": "What is this? <image> <image>"}, ONE_TURN[1]]
    assert conv.render(late, "vicuna_v1").text.endswith("USER: <image>\nWhat is this? ASSISTANT: A red circle.</s>")
    alone = [{"from": "human", "value": "<image>"}, ONE_TURN[1]]
    assert "USER: <image> ASSISTANT:" in conv.render(alone, "vicuna_v1").text  # LLaVA strips the lone newline
    text_only = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    enc = conv.encode_conversation(text_only, qwen_like, "qwen_2_5_replies", num_image_tokens=4, max_length=64,
                                   has_image=False)
    assert not enc.has_image and not (enc.input_ids == IMG).any()
    assert [qwen_like.decode(r) for r in _runs(enc.labels)] == ["Hello.<|im_end|>\n"]
    # A leading assistant turn is dropped, as LLaVA does.
    lead = [{"from": "gpt", "value": "ignored"}] + ONE_TURN
    assert conv.render(lead, "qwen_2_5").text == conv.render(ONE_TURN, "qwen_2_5").text


def test_truncation(llama_like):
    full = conv.encode_conversation(TWO_TURNS, llama_like, "vicuna_v1", num_image_tokens=5, max_length=512)
    first_reply_end = np.flatnonzero(full.labels != conv.IGNORE_INDEX)[len(llama_like.encode(
        " A red circle.</s>", add_special_tokens=False)) - 1] + 1
    cut = conv.encode_conversation(TWO_TURNS, llama_like, "vicuna_v1", num_image_tokens=5,
                                   max_length=first_reply_end + 2)
    assert cut.truncated and len(cut.input_ids) == first_reply_end + 2
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[: first_reply_end + 2])
    np.testing.assert_array_equal(cut.labels, full.labels[: first_reply_end + 2])
    exact = conv.encode_conversation(TWO_TURNS, llama_like, "vicuna_v1", num_image_tokens=5,
                                     max_length=len(full.input_ids))
    assert not exact.truncated


def _reason(conversations, tokenizer, max_length=256, has_image=True, template="vicuna_v1"):
    with pytest.raises(conv.ConversationError) as info:
        conv.encode_conversation(conversations, tokenizer, template, num_image_tokens=5, max_length=max_length,
                                 has_image=has_image)
    assert info.value.reason in conv.SKIP_REASONS
    return info.value.reason


def test_skip_reasons(llama_like):
    human, gpt = TWO_TURNS[0], TWO_TURNS[1]
    assert _reason([], llama_like) == "bad_roles"
    assert _reason([human, human, gpt], llama_like) == "bad_roles"
    assert _reason([human, gpt, TWO_TURNS[2]], llama_like) == "bad_roles"  # ends on a question
    assert _reason([human, {"from": "robot", "value": "x"}], llama_like) == "bad_roles"
    assert _reason([human, {"from": "gpt", "value": "  "}], llama_like) == "empty_reply"
    assert _reason([{"from": "human", "value": "No image here"}, gpt], llama_like) == "no_image_placeholder"
    assert _reason([human, gpt], llama_like, has_image=False) == "unexpected_image_placeholder"
    assert _reason([human, gpt, {"from": "human", "value": "<image>\nAgain?"}, gpt], llama_like) == (
        "unexpected_image_placeholder")
    plain_text_only = [{"from": "human", "value": "Hi"}, gpt]
    assert _reason(plain_text_only, llama_like, template="plain", has_image=False) == "no_image_placeholder"
    full = conv.encode_conversation(ONE_TURN, llama_like, "vicuna_v1", num_image_tokens=5, max_length=512)
    image_end = np.flatnonzero(full.input_ids == IMG)[-1] + 1
    assert _reason(ONE_TURN, llama_like, max_length=image_end - 1) == "image_truncated"
    first_trained = np.flatnonzero(full.labels != conv.IGNORE_INDEX)[0]
    assert _reason(ONE_TURN, llama_like, max_length=first_trained) == "no_trained_tokens"
    conv.encode_conversation(ONE_TURN, llama_like, "vicuna_v1", num_image_tokens=5, max_length=first_trained + 1)


def test_generation_prompt_is_the_prefix_of_the_training_sequence(llama_like):
    question = "What is in the picture?"
    for template in ("plain", "vicuna_v1", "qwen_2_5_replies"):
        prompt = conv.generation_prompt(question, llama_like, template, num_image_tokens=5)
        full = conv.encode_conversation(ONE_TURN, llama_like, template, num_image_tokens=5, max_length=512)
        first_trained = np.flatnonzero(full.labels != conv.IGNORE_INDEX)[0]
        assert prompt.dtype == np.int32
        np.testing.assert_array_equal(prompt, full.input_ids[:first_trained], err_msg=template)
    # qwen_2_5 trains its markers from position 0 on, but prompts exactly as qwen_2_5_replies.
    prompt = conv.generation_prompt(question, llama_like, "qwen_2_5", num_image_tokens=5)
    full = conv.encode_conversation(ONE_TURN, llama_like, "qwen_2_5", num_image_tokens=5, max_length=512)
    np.testing.assert_array_equal(prompt, conv.generation_prompt(question, llama_like, "qwen_2_5_replies",
                                                                 num_image_tokens=5))
    np.testing.assert_array_equal(prompt, full.input_ids[: len(prompt)])
    text = conv.render_generation_prompt(question, "vicuna_v1")
    assert text.endswith("USER: <image>\nWhat is in the picture? ASSISTANT:")
    assert conv.render_generation_prompt(question, "qwen_2_5").endswith("<|im_start|>assistant\n")
    no_image = conv.generation_prompt(question, llama_like, "qwen_2_5", num_image_tokens=5, with_image=False)
    assert not (no_image == IMG).any()
    assert llama_like.decode(no_image).endswith(f"user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def test_stop_ids(llama_like):
    ids = llama_like.convert_tokens_to_ids
    assert conv.stop_ids(llama_like, "vicuna_v1") == (ids("</s>"),)
    assert conv.stop_ids(llama_like, "qwen_2_5") == (ids("<|im_end|>"), ids("</s>"))
    assert conv.stop_ids(llama_like, "qwen_2_5_replies") == (ids("<|im_end|>"), ids("</s>"))
    newline = conv.stop_ids(llama_like, "plain")[0]
    assert llama_like.decode([newline]) == "\n"


def test_tokenizer_chat_template():
    tok = _bpe_tokenizer(add_bos=False, chat_template=LLAMA3_TEMPLATE)
    rendered = conv.render(TWO_TURNS, "tokenizer", tok)
    expected = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is in the picture?"
                "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA red circle.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nWhere is it?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nTop left.<|eot_id|>")
    assert rendered.text == expected
    enc = conv.encode_conversation(TWO_TURNS, tok, "tokenizer", num_image_tokens=2, max_length=256)
    assert [tok.decode(r) for r in _runs(enc.labels)] == ["A red circle.<|eot_id|>", "Top left.<|eot_id|>"]
    assert enc.input_ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>") and (enc.input_ids == IMG).sum() == 2
    assert conv.stop_ids(tok, "tokenizer") == (tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id)
    prompt = conv.generation_prompt("Where?", tok, "tokenizer", num_image_tokens=2)
    assert tok.decode(prompt[prompt >= 0]).endswith("Where?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")

    # The builtin chat tokenizer's ChatML template renders exactly the qwen_2_5 format.
    chat = text.load_text_tokenizer("builtin:shapes_chat")
    assert conv.render(TWO_TURNS, "tokenizer", chat).text == EXPECTED["qwen_2_5"]

    with pytest.raises(ValueError, match="chat_template"):
        conv.render(TWO_TURNS, "tokenizer", _bpe_tokenizer(add_bos=False))
    # A template that rewrites earlier turns (here: only the last reply is shown) cannot be label-masked.
    moving = _bpe_tokenizer(False, "{% for m in messages %}{% if loop.last or m['role'] == 'user' %}"
                                   "{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="does not extend its prefix"):
        conv.render(TWO_TURNS, "tokenizer", moving)
    with pytest.raises(ValueError, match="template 'chatml'"):
        conv.render(TWO_TURNS, "chatml")
