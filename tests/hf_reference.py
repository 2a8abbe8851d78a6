"""Reference PyTorch GPT-2 models for the model tests (imported by test_model_parity,
test_hf_interop and test_generate; not a test module itself).

Everything is built from tiny random `transformers.GPT2Config`s: no hub, no network.
"""

import numpy as np
import torch
from transformers import GPT2Config as HFGPT2Config
from transformers import GPT2LMHeadModel

# Shapes chosen to catch layout bugs: an odd head count, head_dim 1-ish widths, n_positions and
# vocab sizes that are not powers of two, a custom MLP width, a single block.
CONFIGS = {
    "odd_heads": dict(vocab_size=203, n_positions=37, n_embd=30, n_layer=3, n_head=5),
    "n_inner": dict(vocab_size=97, n_positions=23, n_embd=24, n_layer=2, n_head=3, n_inner=50),
    "one_head_one_block": dict(vocab_size=130, n_positions=50, n_embd=16, n_layer=1, n_head=1),
    "pow2": dict(vocab_size=256, n_positions=64, n_embd=32, n_layer=4, n_head=4),
}


def random_hf_model(shape: dict, seed: int = 0, attn_implementation: str = "eager", scale: float = 0.2):
    """A GPT2LMHeadModel in eval mode whose every parameter (biases and LayerNorms included) is
    perturbed away from transformers' init, so that no mapping error hides behind a zero or a one."""
    torch.manual_seed(seed)
    config = HFGPT2Config(**shape, bos_token_id=None, eos_token_id=None, attn_implementation=attn_implementation)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def hf_logits(model, ids: np.ndarray, mask: np.ndarray = None) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.as_tensor(ids), attention_mask=None if mask is None else torch.as_tensor(mask))
    return out.logits.float().numpy()


def batch(vocab_size: int, seq_len: int, seed: int = 0):
    """(3, seq_len) ids and a right-padded mask: row 0 full, rows 1 and 2 padded after 60% / 1 token."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, vocab_size, (3, seq_len)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, max(1, int(0.6 * seq_len)) :] = 0
    mask[2, 1:] = 0
    return ids, mask
