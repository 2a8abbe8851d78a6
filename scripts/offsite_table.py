"""The offsite-tuning table on our data (Full ZS, Emulator ZS, FT, OT Emulator, OT Plug-in); the
same as `fedpeat offsite-table`.

    python scripts/offsite_table.py                 # default: ~15 min on an idle 2-core CPU
    python scripts/offsite_table.py --offsite-steps 400 --distill-steps 1000 --offsite-eval-windows 0   # longer
    python scripts/offsite_table.py --preset base --out runs/offsite_base      # on an accelerator

Every OffsiteConfig field is an option (fields shared with DistillConfig are prefixed
--offsite-/--distill-); --config takes a JSON file with "offsite" and "distill" sections. Writes
<out>.json and <out>.md (default benchmarks/results/offsite_table) and exits with status 1 when
the published pattern does not hold in every row.
"""

import sys

from fedpeat_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["offsite-table", *sys.argv[1:]]))
