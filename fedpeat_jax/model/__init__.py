"""GPT-2: the pure-function model (`gpt2`), Hugging Face interop (`hf`) and generation (`generate`).

    from fedpeat_jax.model import generate, gpt2, hf
    params, cfg = hf.load_pretrained("path/to/gpt2")
    out = generate.generate(params, ids, mask, config=cfg, max_new_tokens=32)

`hf` imports transformers/torch only inside its functions, so importing this package is cheap.
(The function `generate` is not re-exported here: it would shadow its module's name.)
"""

from fedpeat_jax.model import generate, gpt2, hf

__all__ = ["gpt2", "hf", "generate"]
