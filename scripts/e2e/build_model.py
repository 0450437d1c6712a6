"""Build the e2e suite's tiny model: a random-weight Llama with a byte-level BPE tokenizer.

No model hub is reachable, so the model is made here: 2 layers, hidden size 128, 4 heads, a 2048-token
byte-level BPE vocabulary trained on the Python standard library's own sources, and a chat template.
Weights come from a fixed seed and are stored in float32, so greedy decoding is deterministic.

    python scripts/e2e/build_model.py OUT_DIR

Writes OUT_DIR atomically (a temporary directory renamed into place); an existing OUT_DIR is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

VOCAB_SIZE = 2048
MAX_POSITIONS = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# A fixed, sorted set of standard-library sources: the same text, so the same tokenizer, every build.
CORPUS_MODULES = [
    "argparse.py", "asyncio/base_events.py", "asyncio/streams.py", "collections/__init__.py",
    "dataclasses.py", "email/message.py", "enum.py", "functools.py", "http/client.py", "http/server.py",
    "inspect.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py", "pathlib.py", "random.py",
    "shutil.py", "socket.py", "statistics.py", "string.py", "subprocess.py", "textwrap.py",
    "threading.py", "typing.py", "unittest/case.py", "urllib/parse.py", "zipfile.py",
]


def corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in CORPUS_MODULES:
        path = stdlib / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    if not texts:
        raise SystemExit(f"no standard-library sources found under {stdlib}")
    return texts


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # Older and newer transformers read the template from different places: write both.
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))


def build_model(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        # Wide random weights: logits far apart, so greedy picks never hinge on rounding.
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1]).resolve()
    if (out / "config.json").is_file():
        print(f"model already built: {out}")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        build_tokenizer(tmp)
        build_model(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"model built: {out}")


if __name__ == "__main__":
    main()
