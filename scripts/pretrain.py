"""Pretrain (or reuse) the project's foundation model; the same as `fedpeat pretrain`.

    python scripts/pretrain.py                      # the default model, ~10 min on an idle 2-core CPU
    python scripts/pretrain.py --preset base        # the larger model, for accelerators
    python scripts/pretrain.py --steps 600 --lr 1e-3  # any PretrainConfig field is an option

The model is exported in Hugging Face format to ~/.cache/fedpeat_jax/foundation/<preset>-<fingerprint>
($FEDPEAT_CACHE or --cache-dir move the cache); a finished model is reused, an interrupted run resumes.
"""

import sys

from fedpeat_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
