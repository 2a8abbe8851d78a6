"""The foundation model: the one shipped with the package (checksums, held-out perplexity of the
rounded weights, the calibration table fitted on it), damaged copies refused, fingerprints that
only the weights' determinants change, and pretraining from scratch still available."""

import dataclasses
import shutil
from dataclasses import dataclass

import numpy as np
import pytest

from fedpeat_jax import cli
from fedpeat_jax.config import GPT2Config
from fedpeat_jax.io.fingerprint import tree_digest
from fedpeat_jax.mec.calibration import default_table
from fedpeat_jax.model import gpt2, hf
from fedpeat_jax.peat import foundation
from fedpeat_jax.peat.foundation import PRETRAIN_PRESETS, FoundationFilesError, load_foundation
from fedpeat_jax.quickstart import shipped_table_for

SHIPPED = foundation.SHIPPED_ROOT / "default"


@pytest.fixture(scope="module")
def shipped():
    return load_foundation("default")


def test_the_default_preset_loads_the_shipped_model_with_its_recorded_checksums(shipped):
    assert shipped.shipped and shipped.path == SHIPPED
    # its recorded settings are the preset's: otherwise load_foundation would pretrain instead
    assert shipped.info["fingerprint"] == foundation.fingerprint(
        GPT2Config.preset("default"), PRETRAIN_PRESETS["default"]
    )
    recorded = json_ready(foundation.fingerprinted_settings(PRETRAIN_PRESETS["default"]))
    assert {k: shipped.info["pretrain"][k] for k in recorded} == recorded
    assert foundation.file_checksums(SHIPPED) == shipped.info["sha256"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(shipped.info["sha256"])
    raw = hf.load_state_dict(SHIPPED)
    assert {v.dtype for v in raw.values()} == {np.dtype(np.float16)}  # compact: 2 bytes a parameter
    assert (SHIPPED / "model.safetensors").stat().st_size < 2.1 * shipped.config.param_count()
    gpt2.check_params(shipped.params, shipped.config)
    assert tree_digest(shipped.params) == shipped.info["shipped"]["params_sha256"]
    assert shipped.work_dir != shipped.path  # derived files (distilled emulators) go to the cache, not the package


def json_ready(settings: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def test_the_shipped_weights_give_their_recorded_heldout_perplexity(shipped):
    recorded = shipped.info["heldout_subset"]
    got = foundation.heldout_perplexity(shipped, windows=recorded["windows"])
    assert got["tokens"] == recorded["tokens"]
    np.testing.assert_allclose(got["ppl"], recorded["ppl"], rtol=1e-4)
    # rounding to float16 moved the full held-out perplexity by well under 1%
    np.testing.assert_allclose(shipped.info["heldout_ppl"], shipped.info["shipped"]["float32_heldout_ppl"], rtol=1e-2)


@pytest.mark.slow
def test_the_shipped_weights_give_their_recorded_perplexity_on_every_heldout_window(shipped):
    got = foundation.heldout_perplexity(shipped)
    assert got["tokens"] == shipped.info["heldout_tokens"]
    np.testing.assert_allclose(got["ppl"], shipped.info["heldout_ppl"], rtol=1e-4)


def test_the_shipped_calibration_table_was_fitted_on_the_shipped_model(shipped):
    table = default_table()
    assert table.meta["model_fingerprint"] == shipped.info["fingerprint"]
    assert table.meta["model_params_sha256"] == shipped.info["shipped"]["params_sha256"]
    table.check_model(shipped.config, 2, 2)
    assert shipped_table_for(shipped) == table  # the quickstart reuses it
    other = shipped._replace(params={**shipped.params, "wpe": shipped.params["wpe"] * 1.001})
    assert shipped_table_for(other) is None  # other weights, same fingerprint: the quickstart recalibrates


def damaged_copy(tmp_path, damage):
    root = tmp_path / "assets"
    shutil.copytree(SHIPPED, root / "default")
    damage(root / "default")
    return root


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, name",
    [
        (lambda d: truncate(d / "model.safetensors"), "model.safetensors"),
        (
            lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text().replace("a", "b", 1)),
            "tokenizer.json",
        ),
        (lambda d: (d / "config.json").unlink(), "config.json"),
        (lambda d: truncate(d / "foundation.json"), "foundation.json"),
    ],
)
def test_a_damaged_copy_is_refused_with_one_line_naming_the_file(tmp_path, damage, name):
    root = damaged_copy(tmp_path, damage)
    with pytest.raises(FoundationFilesError) as err:
        foundation.open_foundation(root / "default")
    message = str(err.value)
    assert "\n" not in message and str(root / "default" / name) in message


def test_the_cli_turns_a_damaged_shipped_model_into_exit_status_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(foundation, "SHIPPED_ROOT", damaged_copy(tmp_path, lambda d: truncate(d / "model.safetensors")))
    assert cli.main(["calibrate", "--out", str(tmp_path / "table.json"), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.safetensors is corrupt or truncated" in err
    assert not (tmp_path / "table.json").exists()


def test_the_fingerprint_depends_on_what_decides_the_weights_only():
    model, pcfg = GPT2Config.preset("default"), PRETRAIN_PRESETS["default"]
    fp = foundation.fingerprint(model, pcfg)

    @dataclass(frozen=True)
    class WithExecutionOptions(GPT2Config):  # as GPT2Config may grow: rematerialisation, attention kernel
        remat: bool = True
        attention: str = "fused"

    assert foundation.fingerprint(WithExecutionOptions(**dataclasses.asdict(model)), pcfg) == fp
    assert (
        foundation.fingerprint(model.replace(embd_pdrop=0.0, attn_pdrop=0.0), pcfg) == fp
    )  # pretraining uses no dropout
    for changed in (model.replace(n_layer=6), model.replace(n_inner=512), model.replace(initializer_range=0.01)):
        assert foundation.fingerprint(changed, pcfg) != fp
    assert foundation.fingerprint(model, pcfg.replace(steps=301)) != fp
    with_dropout = pcfg.replace(dropout=True)
    assert foundation.fingerprint(model.replace(embd_pdrop=0.0), with_dropout) != foundation.fingerprint(
        model, with_dropout
    )


def test_pretraining_from_scratch_records_checksums_and_never_uses_the_shipped_model(tmp_path):
    from fedpeat_jax import data as data_lib
    from fedpeat_jax.data.shakespeare import CORPUS_SUBDIR

    data_lib.load_shakespeare("modern")  # fetched once into the usual cache, shared with this test's cache
    (tmp_path / CORPUS_SUBDIR).symlink_to(data_lib.resolve_cache_dir(None) / CORPUS_SUBDIR)
    small = PRETRAIN_PRESETS["tiny"].replace(steps=2, warmup=1, chunk=2)
    with pytest.raises(FileNotFoundError, match="fedpeat pretrain"):
        load_foundation("default", cache_dir=tmp_path, shipped=False, allow_pretrain=False)
    fm = load_foundation("tiny", cache_dir=tmp_path, pretrain_config=small, show_progress=False)
    assert not fm.shipped and fm.path.is_relative_to(tmp_path) and fm.work_dir == fm.path
    assert foundation.file_checksums(fm.path) == fm.info["sha256"]
    again = load_foundation("tiny", cache_dir=tmp_path, pretrain_config=small)  # the cached one, verified
    assert again.path == fm.path and again.info["sha256"] == fm.info["sha256"]
    truncate(fm.path / "model.safetensors")
    with pytest.raises(FoundationFilesError, match="model.safetensors"):
        load_foundation("tiny", cache_dir=tmp_path, pretrain_config=small)


def test_float16_export_rounds_and_loads_back_as_float32(tmp_path):
    import jax

    config = GPT2Config.preset("tiny")
    params = gpt2.init(jax.random.PRNGKey(0), config)
    hf.save_pretrained(params, config, tmp_path / "m", weights_dtype="float16")
    assert {v.dtype for v in hf.load_state_dict(tmp_path / "m").values()} == {np.dtype(np.float16)}
    back, _ = hf.load_pretrained(tmp_path / "m")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="weights_dtype"):
        hf.save_pretrained(params, config, tmp_path / "n", weights_dtype="int8")
