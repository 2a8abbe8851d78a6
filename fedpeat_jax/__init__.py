"""fedpeat_jax: a vectorized JAX/Flax simulator of FedPEAT.

Federated, parameter-efficient, emulator-assisted tuning of GPT-2-family models, with an
action-branching PPO controller trained inside a jitted mobile-edge-computing environment.
"""

__version__ = "0.1.0"
