"""PEFT library: zero init, merge, closed-form counts, gradients, placement, HF peft parity, dropout.

Everything runs on a tiny random GPT-2. Base weights are filled with numpy (biases and LayerNorm
parameters nonzero, so BitFit and placement errors show) instead of `gpt2.init`, which costs a
compile. Forwards go through one jitted `gpt2.apply` with static configs, and the tests reuse a
small set of PeftConfigs so that compiled functions are shared between tests. The test jits ask
XLA for a cheap compile (no backend optimization, no fusion emitters): 3-4x faster to compile on
CPU, same semantics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedpeat_jax import peft
from fedpeat_jax.config import LORA_TARGETS, GPT2Config, PeftConfig
from fedpeat_jax.model import gpt2

CFG = GPT2Config(
    vocab_size=97, n_positions=32, n_embd=24, n_layer=4, n_head=3, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
)
B, T = 2, 9
LAYERS = (1, 3)  # non-contiguous: four segments (plain, PEFT, plain, PEFT)

# The configs the forward tests share (equal configs hash equal, so the jit cache is reused).
PC = {
    "lora": PeftConfig(kind="lora", layers=LAYERS, lora_rank=3, lora_alpha=12.0),
    "adapter": PeftConfig(kind="adapter", layers=LAYERS, adapter_size=5),
    "bitfit": PeftConfig(kind="bitfit", layers=LAYERS),
    "full": PeftConfig(kind="full", layers=LAYERS),
    "prompt": PeftConfig(kind="prompt", n_prompt_tokens=4),
}
LORA_SUB = PeftConfig(kind="lora", layers=(0, 2), lora_rank=2, lora_alpha=5.0, lora_targets=("attn.c_proj", "mlp.c_fc"))
LORA_FFA = PeftConfig(kind="lora", layers=LAYERS, lora_rank=3, lora_alpha=12.0, lora_freeze_a=True)


def _fast_compile_options():
    options = {
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False,
    }
    try:  # options unknown to this jaxlib: compile normally
        jax.jit(lambda x: x + 1, compiler_options=options)(np.float32(0))
        return options
    except Exception:  # noqa: BLE001
        return None


FAST = _fast_compile_options()


def jit(fun, **kwargs):
    return jax.jit(fun, compiler_options=FAST, **kwargs)


forward = jit(gpt2.apply, static_argnames=("config", "peft_config"))
_peft_init = jit(peft.init, static_argnums=(2, 3))


def init_state(params, pc: PeftConfig, seed: int = 3, model: GPT2Config = CFG):
    """`peft.init`, jitted (one compile per config instead of one per random op). LoRA's dropout
    and FFA flag do not enter its init, so configs differing only there share one compile."""
    if pc.kind == "lora":
        pc = pc.replace(lora_dropout=0.0, lora_freeze_a=False)
    return _peft_init(jax.random.key(seed), params, model, pc)


def random_params(config: GPT2Config, seed: int = 0):
    """GPT-2 params of the right structure with random values everywhere (numpy, no compile)."""
    rs = np.random.RandomState(seed)
    shapes = jax.eval_shape(lambda: gpt2.init(jax.random.key(0), config))

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            x = 1.0 + 0.1 * rs.randn(*s.shape)
        elif name.endswith("['bias']"):
            x = 0.02 * rs.randn(*s.shape)
        else:
            x = 0.1 * rs.randn(*s.shape)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def randomize(tree, seed: int, std: float = 0.1):
    """Same structure and shapes, fresh random values (e.g. LoRA B or adapter `up` made nonzero)."""
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda x: jnp.asarray(std * rs.randn(*x.shape), jnp.float32), tree)


def _with_random_b(state, seed=9):
    """A LoRA state with its (zero-initialized) B factors made random."""
    lora = state["blocks"]["lora"]
    lora = {g: {n: dict(p, b=randomize(p["b"], seed)) for n, p in v.items()} for g, v in lora.items()}
    return {"blocks": {"lora": lora}}


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


@pytest.fixture(scope="module")
def batch():
    rs = np.random.RandomState(1)
    ids = jnp.asarray(rs.randint(0, CFG.vocab_size, (B, T)), jnp.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, 6:] = 0  # right-padded second row
    return ids, jnp.asarray(mask)


def real(x, mask):
    """Rows of (B, T, ...) at real (unpadded) tokens."""
    return np.asarray(x)[np.asarray(mask).astype(bool)]


# ------------------------------------------------------------------------------------------
# A plain numpy GPT-2 with PEFT, written from the papers (float64): the placement reference.
# ------------------------------------------------------------------------------------------
def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _ln(p, x, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def numpy_forward(params, ids, mask, config: GPT2Config, pc: PeftConfig | None = None, state=None):
    params, state = _np(params), _np(state)
    ids, mask = np.asarray(ids), np.asarray(mask)
    kind = None if pc is None else pc.kind
    d, H = config.n_embd, config.n_head
    hd = d // H
    h = params["wte"][ids]
    if kind == "prompt":
        h = np.concatenate([np.broadcast_to(state["prompt"], (ids.shape[0],) + state["prompt"].shape), h], axis=1)
        mask = np.concatenate([np.ones((ids.shape[0], pc.n_prompt_tokens), mask.dtype), mask], axis=1)
    Bn, Tn, _ = h.shape
    h = h + params["wpe"][:Tn]
    allowed = np.tril(np.ones((Tn, Tn), bool))[None, None] & (mask[:, None, None, :] > 0)
    ids_peft = list(pc.block_ids(config.n_layer)) if kind in ("lora", "adapter", "bitfit", "full") else []
    for i in range(config.n_layer):
        p = jax.tree.map(lambda x: x[i], params["blocks"])
        row = ids_peft.index(i) if i in ids_peft else None
        lora = adapter = None
        if row is not None:
            s = jax.tree.map(lambda x: x[row], state["blocks"])
            if kind in ("bitfit", "full"):
                for path, leaf in jax.tree_util.tree_flatten_with_path(s)[0]:
                    node = p
                    for k in path[:-1]:
                        node = node[k.key]
                    node[path[-1].key] = leaf
            elif kind == "lora":
                lora = s["lora"]
            else:
                adapter = s["adapter"]

        def lin(group, name, x):
            y = x @ p[group][name]["kernel"] + p[group][name]["bias"]
            if lora is not None and name in lora.get(group, {}):
                y = y + pc.lora_scale * (x @ lora[group][name]["a"]) @ lora[group][name]["b"]
            return y

        def adapt(group, x):
            if adapter is None:
                return x
            q = adapter[group]
            return x + np.maximum(x @ q["down"]["kernel"] + q["down"]["bias"], 0) @ q["up"]["kernel"] + q["up"]["bias"]

        x = _ln(p["ln_1"], h, config.layer_norm_epsilon)
        q, k, v = np.split(lin("attn", "c_attn", x), 3, axis=-1)
        q, k, v = (t.reshape(Bn, Tn, H, hd).transpose(0, 2, 1, 3) for t in (q, k, v))
        scores = np.where(allowed, q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd), -1e30)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        a = (probs @ v).transpose(0, 2, 1, 3).reshape(Bn, Tn, d)
        h = h + adapt("attn", lin("attn", "c_proj", a))
        x = _ln(p["ln_2"], h, config.layer_norm_epsilon)
        h = h + adapt("mlp", lin("mlp", "c_proj", _gelu(lin("mlp", "c_fc", x))))
    h = _ln(params["ln_f"], h, config.layer_norm_epsilon)
    logits = h @ params["wte"].T
    return logits[:, Tn - ids.shape[1] :]


# ------------------------------------------------------------------------------------------
# Zero init and placement
# ------------------------------------------------------------------------------------------
def test_numpy_reference_matches_base_model(params, batch):
    ids, mask = batch
    ours = forward(params, ids, mask, config=CFG)
    np.testing.assert_allclose(real(ours, mask), real(numpy_forward(params, ids, mask, CFG), mask), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["lora", "adapter", "bitfit", "full"])
def test_zero_init_peft_leaves_logits_unchanged(kind, params, batch):
    ids, mask = batch
    pc = PC[kind]
    state = init_state(params, pc, seed=3)
    if kind == "lora":  # B starts at zero, A does not
        for leaf in jax.tree.leaves({g: {n: p["b"] for n, p in v.items()} for g, v in state["blocks"]["lora"].items()}):
            assert not np.any(np.asarray(leaf))
        for v in state["blocks"]["lora"].values():  # A: Kaiming-uniform as in peft, bound 1/sqrt(fan_in)
            for p in v.values():
                a, bound = np.abs(np.asarray(p["a"])), 1.0 / math.sqrt(p["a"].shape[1])
                assert a.max() <= bound and a.max() > 0.5 * bound and a.mean() > 0.3 * bound
    if kind == "adapter":  # `up` starts at zero, `down` does not
        for v in state["blocks"]["adapter"].values():
            assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(v["up"]))
            assert np.any(np.asarray(v["down"]["kernel"]))
    base = forward(params, ids, mask, config=CFG)
    out = forward(params, ids, mask, config=CFG, peft=state, peft_config=pc)
    assert out.shape == (B, T, CFG.vocab_size)
    np.testing.assert_allclose(real(out, mask), real(base, mask), atol=1e-6, rtol=0)


def test_prompt_tuning_is_wired_in(params, batch):
    ids, mask = batch
    pc = PC["prompt"]
    state = init_state(params, pc, seed=3)
    assert state["prompt"].shape == (pc.n_prompt_tokens, CFG.n_embd)
    # Initialized from rows of wte.
    wte = np.asarray(params["wte"])
    assert all(np.any(np.all(wte == row, axis=1)) for row in np.asarray(state["prompt"]))
    base = forward(params, ids, mask, config=CFG)
    out = forward(params, ids, mask, config=CFG, peft=state, peft_config=pc)
    assert out.shape == (B, T, CFG.vocab_size)  # soft tokens are dropped from the output
    assert np.abs(real(out, mask) - real(base, mask)).max() > 1e-3
    np.testing.assert_allclose(
        real(out, mask), real(numpy_forward(params, ids, mask, CFG, pc, state), mask), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("kind", ["lora", "adapter", "bitfit", "full"])
def test_layer_restricted_peft_matches_reference(kind, params, batch):
    """PEFT with nonzero state lives exactly in blocks `layers` (1 and 3): blocks 0 and 2 run
    plain, and each PEFT row is applied to its own block. Checked against a numpy GPT-2 that
    applies the module block by block."""
    ids, mask = batch
    pc = PC[kind]
    state = randomize(init_state(params, pc, seed=3), seed=11, std=0.05)
    if kind in ("bitfit", "full"):  # perturb the copied weights rather than replace them
        state = jax.tree.map(lambda s, p: p + s, state, init_state(params, pc, seed=3))
    out = forward(params, ids, mask, config=CFG, peft=state, peft_config=pc)
    ref = numpy_forward(params, ids, mask, CFG, pc, state)
    base = forward(params, ids, mask, config=CFG)
    assert np.abs(real(out, mask) - real(base, mask)).max() > 1e-3  # the state matters
    np.testing.assert_allclose(real(out, mask), real(ref, mask), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------
# Merge
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["all_targets", "subset", "ffa"])
def test_merged_lora_equals_unmerged(which, params, batch):
    ids, mask = batch
    pc = {"all_targets": PC["lora"], "subset": LORA_SUB, "ffa": LORA_FFA}[which]
    state = init_state(params, pc, seed=4)
    lora = state["blocks"]["lora"]
    lora = {
        g: {n: dict(p, b=randomize(p["b"], seed=sum(map(ord, g + n)))) for n, p in v.items()} for g, v in lora.items()
    }
    state = {"blocks": {"lora": lora}}
    if which == "subset":
        assert {(g, n) for g, v in lora.items() for n in v} == {("attn", "c_proj"), ("mlp", "c_fc")}
    unmerged = forward(params, ids, mask, config=CFG, peft=state, peft_config=pc)
    merged_params = peft.merge(params, state, CFG, pc)
    merged = forward(merged_params, ids, mask, config=CFG)
    base = forward(params, ids, mask, config=CFG)
    assert np.abs(real(unmerged, mask) - real(base, mask)).max() > 1e-2
    np.testing.assert_allclose(real(merged, mask), real(unmerged, mask), atol=1e-4, rtol=0)

    # Only the targeted kernels of the PEFT blocks changed; the input params are untouched.
    ids_set = set(pc.block_ids(CFG.n_layer))
    for target in LORA_TARGETS:
        g, n = target.split(".")
        new, old = np.asarray(merged_params["blocks"][g][n]["kernel"]), np.asarray(params["blocks"][g][n]["kernel"])
        for i in range(CFG.n_layer):
            changed = not np.array_equal(new[i], old[i])
            assert changed == (i in ids_set and target in pc.lora_targets), (target, i)
        np.testing.assert_array_equal(merged_params["blocks"][g][n]["bias"], params["blocks"][g][n]["bias"])
    np.testing.assert_array_equal(merged_params["wte"], params["wte"])


def test_merge_of_selective_kinds_writes_blocks_back(params, batch):
    ids, mask = batch
    pc = PC["bitfit"]
    state = jax.tree.map(lambda x: x + 0.1, init_state(params, pc, seed=0))
    merged = peft.merge(params, state, CFG, pc)
    np.testing.assert_allclose(
        real(forward(merged, ids, mask, config=CFG), mask),
        real(forward(params, ids, mask, config=CFG, peft=state, peft_config=pc), mask),
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(ValueError, match="cannot be merged"):
        peft.merge(params, init_state(params, PC["adapter"], seed=0), CFG, PC["adapter"])


def test_client_axis_by_vmap(params, batch):
    """The PEFT state is separate from the frozen params, so clients are a vmap over states."""
    ids, mask = batch
    pc = PC["lora"]
    states = [_with_random_b(init_state(params, pc, seed=s), seed=s) for s in (1, 2)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    per_client = jit(jax.vmap(lambda s: gpt2.apply(params, ids, mask, config=CFG, peft=s, peft_config=pc)))(stacked)
    assert per_client.shape == (2, B, T, CFG.vocab_size)
    for c, s in enumerate(states):
        one = forward(params, ids, mask, config=CFG, peft=s, peft_config=pc)
        np.testing.assert_allclose(real(per_client[c], mask), real(one, mask), atol=1e-5, rtol=0)
    assert np.abs(real(per_client[0], mask) - real(per_client[1], mask)).max() > 1e-3


@pytest.mark.parametrize("vmapped", [False, True])
def test_low_rank_backward_equals_autodiff(vmapped):
    """LoRA's hand-written backward (`lora.low_rank`) against autodiff of (x @ a) @ b, alone and
    vmapped over clients (per-client factors, inputs, cotangents)."""
    rs = np.random.RandomState(0)
    lead = (3,) if vmapped else ()
    x, a, b, g = (jnp.asarray(rs.standard_normal(lead + s), jnp.float32) for s in [(10, 6), (6, 2), (2, 5), (10, 5)])

    def grads(fn):
        f = lambda x, a, b, g: jax.vjp(fn, x, a, b)[1](g)  # noqa: E731
        return jax.jit(jax.vmap(f) if vmapped else f)(x, a, b, g)

    ours, ref = grads(peft.lora.low_rank), grads(lambda x, a, b: (x @ a) @ b)
    for got, want in zip(ours, ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Counts (shapes only: jax.eval_shape, nothing is computed)
# ------------------------------------------------------------------------------------------
def _shapes(model: GPT2Config, pc: PeftConfig):
    p = jax.eval_shape(lambda: gpt2.init(jax.random.key(0), model))
    return jax.eval_shape(lambda p: peft.init(jax.random.key(0), p, model, pc), p)


@pytest.mark.parametrize("d,n_head,n_layer,r", [(24, 3, 4, 2), (64, 4, 3, 5), (768, 12, 2, 4)])
def test_lora_four_targets_is_16_r_d_per_block(d, n_head, n_layer, r):
    model = GPT2Config(vocab_size=50, n_positions=16, n_embd=d, n_layer=n_layer, n_head=n_head)
    assert model.d_mlp == 4 * d
    pc = PeftConfig(kind="lora", lora_rank=r)
    assert pc.lora_targets == LORA_TARGETS
    state = _shapes(model, pc)
    assert peft.count(state) == pc.param_count(model) == 16 * r * d * n_layer
    pc2 = pc.replace(layers=(0, n_layer - 1))
    assert peft.count(_shapes(model, pc2)) == pc2.param_count(model) == 16 * r * d * 2
    # GPT-2 small block size, from the reference card.
    assert GPT2Config.preset("gpt2").block_param_count() == 7_087_872


KIND_CASES = [
    PeftConfig(kind="lora", lora_rank=3),
    PeftConfig(kind="lora", lora_rank=2, layers=(0, 3), lora_targets=("attn.c_attn", "mlp.c_proj")),
    PeftConfig(kind="lora", lora_rank=2, layers=(1,), lora_targets=("mlp.c_fc",)),
    PeftConfig(kind="adapter", adapter_size=7),
    PeftConfig(kind="adapter", adapter_size=3, layers=(0, 1)),
    PeftConfig(kind="bitfit"),
    PeftConfig(kind="bitfit", layers=(2,)),
    PeftConfig(kind="full", layers=(0, 3)),
    PeftConfig(kind="full"),
    PeftConfig(kind="prompt", n_prompt_tokens=5),
]


@pytest.mark.parametrize("model", [CFG, CFG.replace(n_inner=40)], ids=["d_mlp=4d", "n_inner=40"])
@pytest.mark.parametrize("pc", KIND_CASES, ids=lambda pc: f"{pc.kind}-{pc.layers}")
def test_count_matches_closed_form(pc, model):
    state = _shapes(model, pc)
    assert peft.count(state) == pc.param_count(model)
    mask = peft.trainable_mask(state, pc)
    assert all(jax.tree.leaves(mask))
    assert sum(s.size for s, m in zip(jax.tree.leaves(state), jax.tree.leaves(mask)) if m) == pc.param_count(model)


def test_full_and_bitfit_closed_forms_by_hand():
    d, m = CFG.n_embd, CFG.d_mlp
    assert PeftConfig(kind="bitfit").param_count(CFG) == CFG.n_layer * (4 * d + 3 * d + d + m + d)
    assert PeftConfig(kind="full", layers=(1,)).param_count(CFG) == CFG.block_param_count()
    blocks = jax.eval_shape(lambda: gpt2.init(jax.random.key(0), CFG))["blocks"]
    assert sum(s.size for s in jax.tree.leaves(blocks)) == CFG.n_layer * CFG.block_param_count()
    assert PeftConfig(kind="none").param_count(CFG) == 0
    assert _shapes(CFG, PeftConfig(kind="none")) is None


@pytest.mark.parametrize("targets", [LORA_TARGETS, ("attn.c_proj", "mlp.c_fc")])
def test_ffa_lora_counts_only_b_and_masks_exactly_b(targets):
    pc = PeftConfig(kind="lora", lora_rank=3, layers=(1, 2), lora_targets=targets, lora_freeze_a=True)
    state = _shapes(CFG, pc)
    mask = peft.trainable_mask(state, pc)
    assert jax.tree.structure(mask) == jax.tree.structure(state)
    flat_mask = jax.tree_util.tree_flatten_with_path(mask)[0]
    assert flat_mask and all(m == (path[-1].key == "b") for path, m in flat_mask)
    n_b = sum(s.size for (path, s) in jax.tree_util.tree_flatten_with_path(state)[0] if path[-1].key == "b")
    assert pc.param_count(CFG) == n_b
    assert sum(s.size for s, m in zip(jax.tree.leaves(state), jax.tree.leaves(mask)) if m) == n_b
    # Plain LoRA counts A and B.
    assert pc.replace(lora_freeze_a=False).param_count(CFG) == peft.count(state)
    if targets == LORA_TARGETS:
        assert pc.replace(lora_freeze_a=False).param_count(CFG) == 2 * 16 * 3 * CFG.n_embd


# ------------------------------------------------------------------------------------------
# Gradients and training
# ------------------------------------------------------------------------------------------
def _loss(state, params, ids, mask, pc):
    logits = gpt2.apply(params, ids, mask, config=CFG, peft=state, peft_config=pc)
    return gpt2.lm_loss(logits, ids, mask)


_grad = jit(jax.value_and_grad(_loss), static_argnames=("pc",))


def _leaves_with_names(tree):
    return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.parametrize("kind", ["adapter", "bitfit", "full", "prompt"])
def test_gradients_reach_every_trainable_leaf(kind, params, batch):
    ids, mask = batch
    pc = PC[kind]
    state = init_state(params, pc, seed=5)
    _, g = _grad(state, params, ids, mask, pc=pc)
    assert jax.tree.structure(g) == jax.tree.structure(state)
    for name, leaf in _leaves_with_names(g):
        assert np.all(np.isfinite(leaf)), name
        # A fresh adapter has up = 0, so nothing flows back into `down` yet.
        if kind == "adapter" and "['down']" in name:
            assert not np.any(leaf), name
        else:  # every row: each PEFT block (1 and 3), or each soft token
            assert all(np.any(row) for row in leaf), name
    if kind == "adapter":  # once `up` is nonzero, every leaf gets gradient
        adapter = state["blocks"]["adapter"]
        state = {"blocks": {"adapter": {grp: dict(v, up=randomize(v["up"], seed=3)) for grp, v in adapter.items()}}}
        _, g = _grad(state, params, ids, mask, pc=pc)
        for name, leaf in _leaves_with_names(g):
            assert all(np.any(row) for row in leaf), name


def _train_step(pc, optimizer):
    @jit
    def step(state, opt_state, params, ids, mask):
        loss, g = jax.value_and_grad(_loss)(state, params, ids, mask, pc)
        updates, opt_state = optimizer.update(g, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss, g

    return step


@pytest.mark.parametrize("ffa", [False, True], ids=["lora", "ffa-lora"])
def test_optax_step_trains_only_peft_state(ffa, params, batch):
    ids, mask = batch
    pc = LORA_FFA if ffa else PC["lora"]
    state = _with_random_b(init_state(params, pc, seed=5), seed=2)
    labels = jax.tree.map(lambda m: "train" if m else "freeze", peft.trainable_mask(state, pc))
    # adamw: weight decay would move A if the mask let it through.
    optimizer = optax.multi_transform(
        {"train": optax.adamw(1e-2, weight_decay=0.1), "freeze": optax.set_to_zero()}, labels
    )
    opt_state = optimizer.init(state)
    before = jax.tree.map(np.array, params)
    step = _train_step(pc, optimizer)

    # At init B = 0, so dL/dA = 0 exactly and dL/dB != 0 in every PEFT block (rows: blocks 1, 3).
    _, _, _, g0 = step(init_state(params, pc, seed=5), opt_state, params, ids, mask)
    for name, leaf in _leaves_with_names(g0):
        if name.endswith("['a']"):
            assert not np.any(leaf), name
        else:
            assert all(np.any(leaf[row]) for row in range(leaf.shape[0])), name

    # With B nonzero both factors get gradient in every PEFT block, except FFA-LoRA's frozen A.
    new_state, opt_state, loss0, g = step(state, opt_state, params, ids, mask)
    for _ in range(3):  # the loss returned is the loss of the state going in
        new_state, opt_state, loss1, _ = step(new_state, opt_state, params, ids, mask)

    # The frozen base params are bit-identical: they are not an input of the optimizer, whose
    # state holds moments for the PEFT leaves only.
    for (name, old), (_, new) in zip(_leaves_with_names(before), _leaves_with_names(params)):
        np.testing.assert_array_equal(new, old, err_msg=name)
    peft_shapes = {x.shape for x in jax.tree.leaves(state)}
    assert all(x.shape in peft_shapes or x.ndim == 0 for x in jax.tree.leaves(opt_state))
    assert float(loss1) < float(loss0)
    for (name, old), (_, new), (_, grad) in zip(
        _leaves_with_names(state), _leaves_with_names(new_state), _leaves_with_names(g)
    ):
        if ffa and name.endswith("['a']"):
            assert not np.any(grad), name  # FFA-LoRA: A gets exactly zero gradient
            np.testing.assert_array_equal(new, old, err_msg=name)
        else:
            assert all(np.any(grad[row]) for row in range(grad.shape[0])), name
            assert all(not np.array_equal(n, o) for n, o in zip(new, old)), name


# ------------------------------------------------------------------------------------------
# Parity with Hugging Face peft
# ------------------------------------------------------------------------------------------
def _hf_model(params, config: GPT2Config):
    import torch
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(
        HFConfig(
            vocab_size=config.vocab_size,
            n_positions=config.n_positions,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
    ).eval()
    t = lambda x: torch.tensor(np.asarray(x))  # noqa: E731
    sd = {
        "transformer.wte.weight": t(params["wte"]),
        "transformer.wpe.weight": t(params["wpe"]),
        "transformer.ln_f.weight": t(params["ln_f"]["scale"]),
        "transformer.ln_f.bias": t(params["ln_f"]["bias"]),
    }
    b = params["blocks"]
    for i in range(config.n_layer):
        for ln in ("ln_1", "ln_2"):
            sd[f"transformer.h.{i}.{ln}.weight"] = t(b[ln]["scale"][i])
            sd[f"transformer.h.{i}.{ln}.bias"] = t(b[ln]["bias"][i])
        for target in LORA_TARGETS:  # Conv1D weights are (in, out), like our kernels
            g, n = target.split(".")
            sd[f"transformer.h.{i}.{g}.{n}.weight"] = t(b[g][n]["kernel"][i])
            sd[f"transformer.h.{i}.{g}.{n}.bias"] = t(b[g][n]["bias"][i])
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    result = hf.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys and all("attn.bias" in k or "masked_bias" in k for k in result.missing_keys)
    return hf


@pytest.mark.parametrize("which", ["all_targets", "subset"])
def test_lora_matches_hugging_face_peft(which, params, batch):
    import torch
    from peft import LoraConfig, get_peft_model

    ids, mask = batch
    pc = {"all_targets": PC["lora"], "subset": LORA_SUB}[which]
    state = _with_random_b(init_state(params, pc, seed=6), seed=4)
    ours = forward(params, ids, mask, config=CFG, peft=state, peft_config=pc)

    # "attn.c_proj" / "mlp.c_proj" as suffixes tell the two c_proj apart; the bare name "c_proj"
    # matches both (which is what "all four targets" wants).
    names = {"attn.c_attn": "c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp.c_proj"}
    if pc.lora_targets == LORA_TARGETS:
        target_modules = ["c_attn", "c_proj", "c_fc"]
    else:
        target_modules = [names[t] for t in pc.lora_targets]
    hf = get_peft_model(
        _hf_model(params, CFG),
        LoraConfig(
            r=pc.lora_rank,
            lora_alpha=pc.lora_alpha,
            lora_dropout=0.0,
            target_modules=target_modules,
            layers_to_transform=list(pc.block_ids(CFG.n_layer)),
            fan_in_fan_out=True,
        ),
    ).eval()

    wrapped = {name for name, module in hf.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)}
    expected = {f"base_model.model.transformer.h.{i}.{t}" for i in pc.block_ids(CFG.n_layer) for t in pc.lora_targets}
    assert wrapped == expected
    modules = dict(hf.named_modules())
    with torch.no_grad():
        for row, i in enumerate(pc.block_ids(CFG.n_layer)):
            for target in pc.lora_targets:
                g, n = target.split(".")
                m = modules[f"base_model.model.transformer.h.{i}.{target}"]
                assert m.scaling["default"] == pytest.approx(pc.lora_scale)
                m.lora_A["default"].weight.copy_(torch.tensor(np.asarray(state["blocks"]["lora"][g][n]["a"][row]).T))
                m.lora_B["default"].weight.copy_(torch.tensor(np.asarray(state["blocks"]["lora"][g][n]["b"][row]).T))
        ref = hf(torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask))).logits.numpy()
        with hf.disable_adapter():
            ref_base = hf(torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask))).logits.numpy()

    base = forward(params, ids, mask, config=CFG)
    np.testing.assert_allclose(real(base, mask), real(ref_base, mask), atol=1e-4, rtol=0)
    assert np.abs(real(ref, mask) - real(ref_base, mask)).max() > 1e-2  # the LoRA matters
    np.testing.assert_allclose(real(ours, mask), real(ref, mask), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------
def test_dropout_train_mode_is_random_but_deterministic_per_key(params, batch):
    ids, mask = batch
    cfg = CFG.replace(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    pc = PC["lora"].replace(lora_dropout=0.2)
    state = _with_random_b(init_state(params, pc, seed=5))

    evaluate = forward(params, ids, mask, config=cfg, peft=state, peft_config=pc)
    # Eval mode of a dropout config is the dropout-free model.
    np.testing.assert_allclose(
        real(evaluate, mask),
        real(forward(params, ids, mask, config=CFG, peft=state, peft_config=PC["lora"]), mask),
        atol=1e-6,
        rtol=0,
    )
    train_a = forward(params, ids, mask, config=cfg, peft=state, peft_config=pc, rng=jax.random.key(1))
    train_a2 = forward(params, ids, mask, config=cfg, peft=state, peft_config=pc, rng=jax.random.key(1))
    train_b = forward(params, ids, mask, config=cfg, peft=state, peft_config=pc, rng=jax.random.key(2))
    assert np.all(np.isfinite(np.asarray(train_a)))
    np.testing.assert_array_equal(np.asarray(train_a), np.asarray(train_a2))
    assert np.abs(real(train_a, mask) - real(evaluate, mask)).max() > 1e-3
    assert np.abs(real(train_a, mask) - real(train_b, mask)).max() > 1e-3


def test_lora_dropout_alone_acts_in_train_mode(params, batch):
    """Model dropouts 0, LoRA dropout > 0: train mode differs from eval only through LoRA."""
    ids, mask = batch
    pc = PC["lora"].replace(lora_dropout=0.5)
    state = _with_random_b(init_state(params, pc, seed=5))
    evaluate = forward(params, ids, mask, config=CFG, peft=state, peft_config=pc)
    train = forward(params, ids, mask, config=CFG, peft=state, peft_config=pc, rng=jax.random.key(0))
    assert np.abs(real(train, mask) - real(evaluate, mask)).max() > 1e-3
    # Without LoRA dropout the rng changes nothing in a dropout-free model.
    same = forward(params, ids, mask, config=CFG, peft=state, peft_config=PC["lora"], rng=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(same), np.asarray(evaluate), atol=1e-6, rtol=0)
