"""A study's folder, shared by federated and controller studies: the resolved spec (a study of
another spec is refused), the runs of every finished group (JSON) and the checkpoints of the
group in progress. Rerunning a study in the same folder resumes it.

    out/spec.json            the spec as run, with its fingerprint
    out/cohorts/<name>.json  a finished group's (or Optuna batch's) runs
    out/checkpoints/<name>/  the group in progress, after every chunk
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from fedpeat_jax.sweep.report import write_json


def fingerprint(spec) -> str:
    """A digest of what determines the results (the resolved spec without its name and run chunk)."""
    blob = {k: v for k, v in spec.resolved.items() if k not in ("name", "run_chunk")}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Store:
    """The study's folder: the resolved spec, finished cohorts (JSON), in-progress checkpoints."""

    def __init__(self, out: Path, spec):
        self.out, self.spec, self.digest = out, spec, fingerprint(spec)
        path = out / "spec.json"
        if path.is_file():
            old = json.loads(path.read_text()).get("fingerprint")
            if old != self.digest:
                raise spec.error(
                    "out",
                    f"{out} holds a study of another spec (fingerprint {old} != {self.digest}); use --fresh to set "
                    "it aside, or another --out",
                )
        elif out.exists() and any(out.iterdir()):
            raise spec.error("out", f"{out} exists and holds no study; choose a new folder (nothing was written)")

    def commit(self) -> None:
        """Write the resolved spec: from here on the folder is this study's."""
        (self.out / "cohorts").mkdir(parents=True, exist_ok=True)
        write_json(
            self.out / "spec.json", {"fingerprint": self.digest, "spec": self.spec.resolved, "source": self.spec.path}
        )

    def cohort(self, name: str) -> Optional[dict]:
        path = self.out / "cohorts" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, name: str, data: dict) -> None:
        write_json(self.out / "cohorts" / f"{name}.json", data)

    def checkpoints(self, name: str) -> Path:
        return self.out / "checkpoints" / name


__all__ = ["Store", "fingerprint"]
