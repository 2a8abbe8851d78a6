"""Ship a pretrained foundation model in the package: `fedpeat_jax/assets/foundation/<preset>/`.

    fedpeat pretrain --preset default                    # ~6 min on an idle 2-core CPU (cached)
    python scripts/ship_foundation.py --preset default   # pretrains first if the cache has no model

The model is the one `fedpeat pretrain` makes with the preset's recorded settings (the cached
one when there is one). Its weights are rounded to float16; foundation.json records the
pretraining settings and record (fingerprint, time, machine), the held-out perplexity measured
with the ROUNDED weights (all held-out windows, and the first few that the tests re-measure), this
command, the machine of the export and the sha256 of every file. `load_foundation(preset)` then
uses it instead of pretraining. Pretraining is not bit-reproducible across runs and machines:
shipping one model is what makes every result refer to the same weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeat_jax.peat import foundation  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=sorted(foundation.PRETRAIN_PRESETS))
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)

    fm = foundation.load_foundation(
        args.preset, cache_dir=args.cache_dir, shipped=False
    )  # what `fedpeat pretrain` gives
    command = f"fedpeat pretrain --preset {args.preset}; python scripts/ship_foundation.py --preset {args.preset}"
    shipped = foundation.ship(fm, foundation.SHIPPED_ROOT / args.preset, command=command, cache_dir=args.cache_dir)
    info = shipped.info
    print(f"shipped {fm.path} as {shipped.path} (fingerprint {info['fingerprint']})")
    print(
        f"  held-out perplexity: {info['shipped']['float32_heldout_ppl']:.4f} (float32) -> {info['heldout_ppl']:.4f} ({info['shipped']['weights_dtype']})"
    )
    for name, digest in info["sha256"].items():
        print(f"  {name}: {(shipped.path / name).stat().st_size:,} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
