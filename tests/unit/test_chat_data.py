"""Chat data (`moetron-data --chat`): conversations rendered by the tokenizer's chat template, only the
assistant turns counted, each turn's end token included, whatever the template (the byte
tokenizer's own, Qwen-style with the EOS token inside assistant turns, DeepSeek-style with EOS
after them, several turns and a system prompt); bad input refused naming its file and line."""
import json

import numpy as np
import pytest

from moetron.data.chat import ChatError, ChatTemplate, encode_chat, messages_of
from moetron.data.chat_files import open_chat_file, write_chat_file
from moetron.data.chat_sample import CONVERSATIONS
from moetron.data.cli import main as data_main
from moetron.data.token_files import open_token_file
from moetron.data.tokenizers import ByteTokenizer, HFTokenizer

QWEN_STYLE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{% endif %}")
DEEPSEEK_STYLE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
                  "{{ message['content'] }}{% elif message['role'] == 'user' %}{{ '<|User|>' + message['content'] }}"
                  "{% else %}{{ '<|Assistant|>' + message['content'] + eos_token }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|Assistant|>' }}{% endif %}")
TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
         {"role": "assistant", "content": "6!"}]


def _counted_text(ids, counts, tokenizer) -> list[str]:
    """The text of each run of counted tokens."""
    runs, run = [], []
    for token, counted in zip(ids, counts):
        if counted:
            run.append(int(token))
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer.decode(r) for r in runs]


def _hf_tokenizer(folder, template, eos, bos=None):
    """A byte-level BPE tokenizer (no merges) with the chat markers as special tokens, saved as a
    Hugging Face folder with `template` in its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|User|>", "<|Assistant|>", "<eos>", "<bos>"])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": eos, "chat_template": template}
    if bos:
        config["bos_token"] = bos
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return HFTokenizer(str(folder))


def test_the_byte_tokenizer_counts_assistant_turns_and_their_eos():
    tokenizer = ByteTokenizer()
    template = ChatTemplate.of_tokenizer(tokenizer)
    ids, counts = encode_chat(TURNS, template, tokenizer, "t")
    eos = tokenizer.eos_id
    assert _counted_text(ids, counts, tokenizer) == ["4", "6!"]  # decode drops EOS: check it apart
    counted_ids = ids[counts == 1].tolist()
    # hand-counted: "4" EOS and "6!" EOS, nothing of the system prompt, the user turns or the headers
    assert counted_ids == [ord("4"), eos, ord("6"), ord("!"), eos]
    assert int(counts.sum()) == 5 and len(ids) == len(tokenizer.encode_with_offsets(template.render(TURNS))[0])


@pytest.mark.parametrize("style,eos,bos,expected", [
    ("qwen", "<|im_end|>", None, ["4<|im_end|>\n", "6!<|im_end|>\n"]),  # EOS inside the assistant turn
    ("deepseek", "<eos>", "<bos>", ["4<eos>", "6!<eos>"]),  # EOS after the assistant turn, BOS from the template
])
def test_hf_templates_count_each_assistant_turn_with_its_end_token(tmp_path, style, eos, bos, expected):
    tokenizer = _hf_tokenizer(tmp_path / "tok", QWEN_STYLE if style == "qwen" else DEEPSEEK_STYLE, eos, bos)
    template = ChatTemplate.of_tokenizer(tokenizer)
    ids, counts = encode_chat(TURNS, template, tokenizer, "t")
    counted = ids[counts == 1].tolist()
    assert counted == [t for piece in expected for t in tokenizer.encode_with_offsets(piece)[0].tolist()]
    assert counted.count(tokenizer.eos_id) == 2  # each turn's end token counts
    if style == "deepseek":
        assert int(ids[0]) == tokenizer._tok.token_to_id("<bos>") and not counts[0]  # BOS once, not counted


def test_a_prompt_completion_pair_is_one_user_and_one_assistant_turn():
    messages = messages_of({"prompt": "hi", "completion": "hello"}, "f:1")
    assert messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("record,match", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "f.jsonl:2: the conversation has no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "f.jsonl:2: message 0 has role 'robot'"),
    ({"text": "hi"}, "f.jsonl:2: expected"),
])
def test_bad_conversations_are_refused_naming_file_and_line(tmp_path, record, match):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ChatError, match=match):
        write_chat_file([path], tmp_path / "out", ByteTokenizer(), ChatTemplate.of_tokenizer(ByteTokenizer()))
    assert not list(tmp_path.glob("out*"))  # nothing half-written


def test_a_template_that_fails_to_render_is_named_with_the_line(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% if messages|length > 2 %}{{ raise_exception('only one exchange') }}{% endif %}x")
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"messages": TURNS}) + "\n")
    with pytest.raises(ChatError, match=r"f.jsonl:1: the chat template of .*t.jinja failed to render it: only one"):
        write_chat_file([path], tmp_path / "out", ByteTokenizer(), ChatTemplate.of_tokenizer(ByteTokenizer(), str(template)))


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # drops the content of every assistant turn but the last (as templates that strip reasoning do)
    rewriting = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] != 'assistant' or loop.last %}"
                 "{{ m['content'] }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    template = ChatTemplate(rewriting, "rewriting.jinja")
    with pytest.raises(ChatError, match="w:3: .* renders assistant turn 2 otherwise once later turns follow"):
        encode_chat(TURNS, template, ByteTokenizer(), "w:3")


def test_a_tokenizer_without_a_chat_template_is_named(tmp_path):
    tokenizer = _hf_tokenizer(tmp_path / "tok", None, "<eos>")
    with pytest.raises(ChatError, match=r"tok has no chat template .*--chat-template FILE"):
        ChatTemplate.of_tokenizer(tokenizer)


def test_the_shipped_sample_makes_a_chat_file_and_shows_its_mask(tmp_path, capsys):
    prefix = tmp_path / "chat"
    assert data_main([str(CONVERSATIONS), "--chat", "--output", str(prefix), "--workers", "2"]) == 0
    source = open_chat_file(str(prefix))
    lines = [line for line in CONVERSATIONS.read_text().splitlines() if line.strip()]
    assert source.num_samples == len(lines) >= 300
    assert 0 < int(source.counts.sum()) < len(source.tokens)
    tokens, counts = source.sample(1)  # {"user": "How many letters are in 'attention'?", ...}
    text = ByteTokenizer().decode(tokens[counts == 1])
    assert text == "'attention' has 9 letters." and tokens[-1] == ByteTokenizer.eos_id and counts[-1] == 1
    # one process and two write the same file
    assert data_main([str(CONVERSATIONS), "--chat", "--output", str(tmp_path / "one"), "--workers", "1"]) == 0
    for suffix in (".bin", ".mask.bin", ".samples.bin"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"chat{suffix}").read_bytes()
    capsys.readouterr()
    assert data_main(["--show", str(prefix)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("[<|user|>\nWrite 'memory' in capitals.\n<|assistant|>\n]MEMORY<|eos|>[\n<|user|>")
    with pytest.raises(ValueError, match="chat data .*stage=sft"):
        open_token_file(str(prefix))  # pre-training does not read it as plain text


def test_offsets_of_the_byte_tokenizer_follow_characters():
    ids, starts = ByteTokenizer().encode_with_offsets("é<|eos|>a")
    assert ids.tolist() == [0xC3, 0xA9, 256, ord("a")] and starts.tolist() == [0, 0, 1, 8]
    assert np.array_equal(ByteTokenizer().encode_with_offsets("plain")[0], ByteTokenizer().encode("plain"))


def test_show_writes_the_special_tokens_of_an_hf_tokenizer(tmp_path):
    from moetron.data.cli import show_sample

    tokenizer = _hf_tokenizer(tmp_path / "tok", QWEN_STYLE, "<|im_end|>")
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": TURNS[1:3]}) + "\n")
    write_chat_file([path], tmp_path / "c", tokenizer, ChatTemplate.of_tokenizer(tokenizer))
    shown = show_sample(open_chat_file(str(tmp_path / "c")), tokenizer)
    assert shown == "[<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n]4<|im_end|>\n"
