"""Run logging: TensorBoard scalars (tensorboardX), a JSON-lines copy, and progress bars.

The JSONL file makes every logged number readable without TensorBoard (reports and plots read
it); on resume, records past the restored step are dropped so a re-run does not duplicate them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm


def _scalar(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value


class RunLogger:
    """Scalars to TensorBoard and `<logdir>/metrics.jsonl`.

    >>> with RunLogger("runs/x") as log:
    ...     log.scalars(step, {"loss": 1.2})
    """

    def __init__(self, logdir, resume_step: Optional[int] = None, tensorboard: bool = True):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.path = self.logdir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._truncate(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        self._writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.logdir))

    def _truncate(self, step: int) -> None:
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        record = {"step": int(step)}
        for name, value in values.items():
            value = _scalar(value)
            if value is None:
                continue
            record[prefix + name] = value
            if self._writer is not None and math.isfinite(value):
                self._writer.add_scalar(prefix + name, value, int(step))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(logdir) -> list:
    """The records of `<logdir>/metrics.jsonl`, in order."""
    path = Path(logdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics log at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def progress(total: int, desc: str, initial: int = 0, disable: bool = False):
    """A tqdm progress bar (quiet under `disable` or when FEDPEAT_NO_PROGRESS is set)."""
    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        disable=disable or bool(os.environ.get("FEDPEAT_NO_PROGRESS")),
        dynamic_ncols=True,
    )
