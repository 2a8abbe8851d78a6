"""Federated rounds: one jitted round serves FedPEAT on emulators, LoRA or full fine-tuning on the
full model and local-only tuning (`FedConfig.trainable`, `FedConfig.algorithm`).

    sim = FedPEAT(model, peft, fed, n_clients=data.n_clients)        # holds no weights
    result = train(sim, params, data, seed=0, eval_data=heldout)      # chunks, logs, checkpoints

* :mod:`.simulation` ``FedPEAT`` (init / round / run_rounds / eval_nll), ``ServerState``
* :mod:`.learner`    what a client trains (adapter, all blocks or the whole model) and how
* :mod:`.client`     local steps and ``Hyper``, the traced hyperparameters
* :mod:`.stream`     clients in chunks with the aggregate streamed (memory flat in clients)
* :mod:`.aggregate`  FedAvg, LoRA-aware and robust aggregation; :mod:`.server_opt` FedOpt servers;
  :mod:`.drift` FedProx and SCAFFOLD; :mod:`.privacy` client-level DP
* :mod:`.data`       ``FedData`` and per-process slices; :mod:`.sharding` meshes and processes
* :mod:`.driver`     ``train`` (the host loop) and ``study`` (runs vmapped in one program)
"""

from fedpeat_jax.fed.client import Hyper
from fedpeat_jax.fed.data import FedData
from fedpeat_jax.fed.driver import TrainResult, study, train
from fedpeat_jax.fed.simulation import FedPEAT, RoundMetrics, ServerState

__all__ = ["FedData", "FedPEAT", "Hyper", "RoundMetrics", "ServerState", "TrainResult", "study", "train"]
