"""`moetron-data`: turn text or JSONL files into a moetron token file for `data.path`.

    moetron-data corpus/*.jsonl --output data/my_corpus          # writes my_corpus.bin + .json
    moetron-data corpus/*.jsonl --output data/my_corpus --tokenizer path/to/hf_tokenizer --workers 8
    moetron-train data.path=data/my_corpus data.tokenizer=path/to/hf_tokenizer
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moetron.data.token_files import write_token_file
from moetron.data.tokenizers import get_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moetron-data", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help=".jsonl (one JSON object per line) or text files")
    parser.add_argument("--output", "-o", required=True, type=Path, help="output prefix (PREFIX.bin, PREFIX.json)")
    parser.add_argument("--jsonl-key", default="text", help="key of the text in each JSONL object (default: text)")
    parser.add_argument("--tokenizer", default="bytes",
                        help="bytes (default), or a Hugging Face tokenizer: a local folder or tokenizer.json")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="tokenizing processes (default: the cores, at most 8)")
    args = parser.parse_args(argv)
    try:
        tokenizer = get_tokenizer(args.tokenizer)
        meta = write_token_file(args.inputs, args.output, tokenizer, args.jsonl_key, max(args.workers, 1),
                                progress=None)
    except (FileNotFoundError, ValueError) as err:
        print(f"moetron-data: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}.bin: {meta['num_tokens']:,} tokens ({meta['dtype']}) in {meta['num_documents']:,} "
          "documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
