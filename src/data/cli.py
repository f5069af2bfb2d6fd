"""`moetron-data`: turn text or JSONL files into a moetron token file for `data.path`.

    moetron-data corpus/*.jsonl --output data/my_corpus          # writes my_corpus.bin + .json
    moetron-data corpus/*.jsonl --output data/my_corpus --tokenizer path/to/hf_tokenizer --workers 8
    moetron-train data.path=data/my_corpus data.tokenizer=path/to/hf_tokenizer

    moetron-data chat.jsonl --chat --output data/chat --tokenizer TOK   # conversations, assistant turns counted
    moetron-data --show data/chat                                        # a conversation, masked tokens marked
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moetron.data.chat import ChatTemplate
from moetron.data.chat_files import open_chat_file, write_chat_file
from moetron.data.token_files import read_header, write_token_file
from moetron.data.tokenizers import get_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moetron-data", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", type=Path,
                        help=".jsonl (one JSON object per line) or text files; with --chat, `builtin` is the chat "
                             "sample that ships with moetron")
    parser.add_argument("--output", "-o", type=Path, help="output prefix (PREFIX.bin, PREFIX.json)")
    parser.add_argument("--jsonl-key", default="text", help="key of the text in each JSONL object (default: text)")
    parser.add_argument("--tokenizer", default="bytes",
                        help="bytes (default), or a Hugging Face tokenizer: a local folder or tokenizer.json")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="tokenizing processes (default: the cores, at most 8)")
    parser.add_argument("--chat", action="store_true",
                        help="the inputs are conversations ({\"messages\": [...]} or {\"prompt\", \"completion\"}): "
                             "rendered with the tokenizer's chat template, only assistant turns counted in the loss")
    parser.add_argument("--chat-template", help="a Jinja chat template file, in place of the tokenizer's own")
    parser.add_argument("--show", type=Path, metavar="PREFIX",
                        help="print a chat file's first conversation, the tokens that do not count in [brackets]")
    args = parser.parse_args(argv)
    try:
        if args.show:  # the file's own tokenizer, unless --tokenizer names another
            made_with = read_header(args.show).get("tokenizer", "bytes")
            tokenizer = get_tokenizer(args.tokenizer if args.tokenizer != "bytes" else made_with)
            print(show_sample(open_chat_file(str(args.show)), tokenizer))
            return 0
        if not args.inputs or args.output is None:
            parser.error("give the input files and --output (or --show PREFIX)")
        tokenizer = get_tokenizer(args.tokenizer)
        if args.chat:
            from moetron.data.chat_sample import CONVERSATIONS

            args.inputs = [CONVERSATIONS if str(p) == "builtin" else p for p in args.inputs]
            template = ChatTemplate.of_tokenizer(tokenizer, args.chat_template)
            meta = write_chat_file(args.inputs, args.output, tokenizer, template, max(args.workers, 1))
            print(f"wrote {args.output}.bin: {meta['num_tokens']:,} tokens ({meta['dtype']}) in "
                  f"{meta['num_samples']:,} conversations, {meta['counted_tokens']:,} of them in assistant turns "
                  "(counted in the loss)")
            return 0
        meta = write_token_file(args.inputs, args.output, tokenizer, args.jsonl_key, max(args.workers, 1),
                                progress=None)
    except (FileNotFoundError, ValueError) as err:
        print(f"moetron-data: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}.bin: {meta['num_tokens']:,} tokens ({meta['dtype']}) in {meta['num_documents']:,} "
          "documents")
    return 0


def show_sample(source, tokenizer, index: int = 0) -> str:
    """Conversation `index` as text, each run of tokens that does not count in the loss in [brackets]."""
    tokens, counts = source.sample(index)
    runs, start = [], 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or counts[i] != counts[start]:
            text = _decode(tokenizer, tokens[start:i])
            runs.append(text if counts[start] else f"[{text}]")
            start = i
    return "".join(runs)


def _decode(tokenizer, ids) -> str:
    """Text of `ids`, EOS written as the tokenizer's EOS text."""
    pieces, start = [], 0
    for i, token in enumerate(list(ids) + [None]):
        if token is None or int(token) == tokenizer.eos_id:
            pieces.append(tokenizer.decode(ids[start:i], keep_special=True))
            if token is not None:
                pieces.append(tokenizer.eos_token)
            start = i + 1
    return "".join(pieces)


if __name__ == "__main__":
    sys.exit(main())
