"""The request side of KV-event routing: token ids as the engine makes them, for completions and chats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pdproxy.mock_kv_events import word_token_id
from pdproxy.routing.prompt_tokens import HfPromptTokens, WordPromptTokens, make_prompt_tokens

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello world, the cache holds every block"] * 20, trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    return out


def test_a_completion_gets_the_special_tokens_and_a_chat_its_template(model_dir: Path) -> None:
    tokens = HfPromptTokens.from_files(str(model_dir / "tokenizer.json"))
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tokens.ids({"prompt": "hello world"}) == raw.encode("hello world").ids
    assert tokens.ids({"prompt": "hello world"})[0] == 1  # <s>, as vLLM's completions add it
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    rendered = tokens.render_chat(messages)
    assert rendered == "<|system|>\nbe brief</s>\n<|user|>\nhello</s>\n<|assistant|>\n"
    assert tokens.ids({"messages": messages}) == raw.encode(rendered, add_special_tokens=False).ids
    assert tokens.ids({"prompt": [5, 6, 7]}) == [5, 6, 7]  # token ids are the engine's already
    assert tokens.ids({"prompt": 3}) is None


def test_a_given_template_wins_and_a_broken_one_gives_no_ids(model_dir: Path, tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{{ raise_exception('no chats here') }}")
    tokens = HfPromptTokens.from_files(str(model_dir / "tokenizer.json"), str(template))
    assert tokens.ids({"messages": [{"role": "user", "content": "x"}]}) is None
    assert tokens.ids({"prompt": "hello"})  # completions are unaffected


def test_missing_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot load tokenizer file"):
        make_prompt_tokens(str(tmp_path / "none.json"))
    assert make_prompt_tokens(None) is None


def test_words_are_the_mock_engines_tokens() -> None:
    tokens = make_prompt_tokens("words")
    assert isinstance(tokens, WordPromptTokens)
    assert tokens.ids({"prompt": "a b"}) == [word_token_id("a"), word_token_id("b")]
    assert tokens.ids({"messages": [{"role": "user", "content": "hi there"}]}) == [
        word_token_id(w) for w in ("user", "hi", "there")]
