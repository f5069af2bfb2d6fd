"""`moetron-data`: turn text or JSONL files into a moetron token file for `data.path`.

    moetron-data corpus/*.jsonl --output data/my_corpus          # writes my_corpus.bin + .json
    moetron-train data.path=data/my_corpus
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moetron.train.data import TOKENIZERS, get_tokenizer, write_token_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moetron-data", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help=".jsonl (one JSON object per line) or text files")
    parser.add_argument("--output", "-o", required=True, type=Path, help="output prefix (PREFIX.bin, PREFIX.json)")
    parser.add_argument("--jsonl-key", default="text", help="key of the text in each JSONL object (default: text)")
    parser.add_argument("--tokenizer", default="bytes", choices=sorted(TOKENIZERS))
    args = parser.parse_args(argv)
    try:
        meta = write_token_file(args.inputs, args.output, get_tokenizer(args.tokenizer), args.jsonl_key)
    except (FileNotFoundError, ValueError) as err:
        print(f"moetron-data: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}.bin: {meta['num_tokens']:,} tokens in {meta['num_documents']:,} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
