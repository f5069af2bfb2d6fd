"""The chat sample that ships with moetron: conversations written for the project (made by
build_conversations.py) and the byte tokenizer's chat template, for `moetron-data --chat` and
`stage=sft` on a fresh machine."""
from pathlib import Path

HERE = Path(__file__).parent
CONVERSATIONS = HERE / "conversations.jsonl"
BYTES_TEMPLATE = HERE / "bytes_chat.jinja"
