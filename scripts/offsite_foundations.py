"""Does the offsite-tuning pattern depend on the foundation model? The table for several
foundation models that a 2-core CPU can pretrain: the default, the default pretrained twice as
long, and a deeper, narrower model (12 blocks of 192, GPT-2 small's depth, emulator 2-4-2).

    python scripts/offsite_foundations.py      # ~20 min with the foundations cached, ~45 min without

Each foundation is pretrained once (cached like any other, see `fedpeat pretrain`); each table is
`fedpeat offsite-table` with the emulator keeping half the middle blocks. Writes
benchmarks/results/offsite_foundations.json and .md: per foundation, how much its middle blocks
matter (zero-shot cost of dropping them all) and, per emulator and PEFT, the gap OT Plug-in minus
OT Emulator that the published pattern needs negative.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runnable as a plain script

from benchmarks.common import machine_info, write_json, write_markdown
from fedpeat_jax.config import GPT2Config
from fedpeat_jax.peat import offsite
from fedpeat_jax.peat.foundation import PretrainConfig, load_foundation

NAME = "offsite_foundations"
DEFAULT = GPT2Config.preset("default")
FOUNDATIONS = {  # name: (model shape, pretraining)
    "default (8 x 256, 300 steps)": (DEFAULT, PretrainConfig()),
    "default, pretrained 2x longer (600 steps)": (DEFAULT, PretrainConfig(steps=600, warmup=60)),
    "deeper (12 x 192, 300 steps)": (DEFAULT.replace(n_embd=192, n_layer=12, n_head=3), PretrainConfig()),
}


def main() -> int:
    results = []
    for name, (model, pretrain) in FOUNDATIONS.items():
        print(f"== {name}", flush=True)
        fm = load_foundation("default", model=model, pretrain_config=pretrain)
        cfg = offsite.OffsiteConfig(k=(model.n_layer - 4) // 2)  # 2-k-2 keeping half the middle
        table = offsite.run_table(cfg, foundation=fm)
        results.append(
            {
                "foundation": name,
                "n_layer": model.n_layer,
                "n_embd": model.n_embd,
                "params": model.param_count(),
                "pretrain_steps": pretrain.steps,
                "modern_heldout_ppl": fm.info.get("heldout_ppl"),
                "emulator": table["emulator"]["name"],
                "drop_whole_middle_cost": table["drop_whole_middle_cost"],
                "rows": table["rows"],
                "layer_drop_zero_shot": table["layer_drop_zero_shot"],
            }
        )
    write_json(NAME, {"results": results, "machine": machine_info()})

    rows = []
    for r in results:
        for row in r["rows"]:
            failed = [k for k, v in row["pattern"].items() if not v]
            rows.append(
                [
                    r["foundation"],
                    f"{r['modern_heldout_ppl']:.1f}",
                    f"{100 * r['drop_whole_middle_cost']:.1f}%",
                    r["emulator"],
                    row["emulator"],
                    row["peft"],
                    f"{row['Full ZS']:.2f}",
                    f"{row['Emulator ZS']:.2f}",
                    f"{row['OT Emulator']:.2f}",
                    f"{row['OT Plug-in']:.2f}",
                    f"{100 * (row['OT Plug-in'] / row['OT Emulator'] - 1):+.2f}%",
                    "yes" if not failed else "NO: " + ", ".join(failed),
                ]
            )
    m = machine_info()
    write_markdown(
        NAME,
        "Offsite-tuning pattern across foundation models",
        [
            "foundation",
            "modern held-out ppl",
            "ZS cost of dropping the whole middle",
            "emulator",
            "kind",
            "adapter tuning",
            "Full ZS",
            "Emulator ZS",
            "OT Emulator",
            "OT Plug-in",
            "Plug-in vs OT Emulator",
            "pattern",
        ],
        rows,
        notes=[
            "Pattern: OT Plug-in < Full ZS, OT Plug-in < OT Emulator, Emulator ZS > Full ZS (the published one needs the "
            "Plug-in vs OT Emulator column negative). Folio-spelling held-out perplexities; settings of `fedpeat offsite-table` "
            "(OffsiteConfig defaults) except the emulator's k.",
            f"Machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs, jax {m['jax']}; load average at the end {m['loadavg_1_5_15']}. Written by `python scripts/{NAME}.py`.",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
