"""Every config dataclass shares one base: fields are checked against their annotations, with
errors that name `Class.field`, before any range check or computation."""

import ast
import dataclasses
import importlib
import typing
from pathlib import Path

import pytest

from fedpeat_jax.config import Config, field_docs

PACKAGE = Path(__file__).resolve().parents[1] / "fedpeat_jax"


def config_classes() -> list:
    """Every frozen dataclass named *Config in the package (found in the source, then imported)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ClassDef)
                and node.name.endswith("Config")
                and any("dataclass" in ast.unparse(d) for d in node.decorator_list)
            ):
                module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
                found.append(getattr(importlib.import_module(module), node.name))
    return found


CLASSES = config_classes()


def default(cls):
    return cls(steps=10, batch=2, lr=1e-3) if cls.__name__ == "TrainConfig" else cls()


def test_every_config_class_uses_the_base_and_inherits_replace():
    names = sorted(c.__name__ for c in CLASSES)
    assert {
        "FedConfig",
        "PeftConfig",
        "GPT2Config",
        "TaskConfig",
        "TextConfig",
        "PretrainConfig",
        "DistillConfig",
        "OffsiteConfig",
        "CalibrateConfig",
        "LiveConfig",
        "SABPPOConfig",
        "ControllerConfig",
        "QuickstartConfig",
        "TrainConfig",
    } <= set(names)
    for cls in CLASSES:
        assert issubclass(cls, Config), cls
        assert "replace" not in vars(cls) and "__post_init__" not in vars(cls) or cls.__name__ == "TextConfig", cls


def _fields(kind):
    """(class, field) pairs whose annotation is exactly `kind` (int, float, bool, str) or a tuple."""
    out = []
    for cls in CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if (kind == "tuple" and (hint is tuple or typing.get_origin(hint) is tuple)) or hint is kind:
                out.append(pytest.param(cls, f.name, id=f"{cls.__name__}.{f.name}"))
    return out


@pytest.mark.parametrize("cls, name", _fields(int))
@pytest.mark.parametrize("value, word", [("32", "'32' (a string)"), (True, "True (a bool)"), (4.0, "4.0 (a float)")])
def test_int_fields_refuse_strings_bools_and_floats(cls, name, value, word):
    with pytest.raises(
        ValueError,
        match=rf"^{cls.__name__}\.{name} must be an integer, got {word}".replace("(", r"\(").replace(")", r"\)"),
    ):
        default(cls).replace(**{name: value})


@pytest.mark.parametrize("cls, name", _fields(float))
def test_float_fields_refuse_strings_and_bools_and_take_ints(cls, name):
    for value in ("0.01", True):
        with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{name} must be a number, got"):
            default(cls).replace(**{name: value})
    current = getattr(default(cls), name)
    if float(current).is_integer():  # an int where a float is expected: kept, as a float
        same = default(cls).replace(**{name: int(current)})
        assert getattr(same, name) == current and type(getattr(same, name)) is float


@pytest.mark.parametrize("cls, name", _fields(bool))
def test_bool_fields_refuse_numbers_and_strings(cls, name):
    for value in (1, "true"):
        with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{name} must be true or false"):
            default(cls).replace(**{name: value})


@pytest.mark.parametrize("cls, name", _fields(str))
def test_str_fields_refuse_numbers(cls, name):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{name} must be a string, got 3 \(an integer\)"):
        default(cls).replace(**{name: 3})


@pytest.mark.parametrize("cls, name", _fields("tuple"))
def test_tuple_fields_refuse_scalars_and_take_lists(cls, name):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{name} must be a list"):
        default(cls).replace(**{name: 2})
    current = getattr(default(cls), name)
    same = default(cls).replace(**{name: list(current)})
    assert getattr(same, name) == current and isinstance(getattr(same, name), tuple)


def test_optional_and_element_types():
    from fedpeat_jax.config import FedConfig, PeftConfig

    assert FedConfig(dp_clip=1).dp_clip == 1.0 and FedConfig(dp_clip=None).dp_clip is None
    with pytest.raises(ValueError, match=r"FedConfig.dp_clip must be null or a number, got '1.0' \(a string\)"):
        FedConfig(dp_clip="1.0")
    with pytest.raises(ValueError, match=r"FedConfig.emulator_levels must be a list of integers, got \[1, 2.5\]"):
        FedConfig(emulator_levels=[1, 2.5])
    with pytest.raises(ValueError, match=r"PeftConfig.lora_targets must be a list of strings"):
        PeftConfig(lora_targets=("attn.c_attn", 3))
    assert hash(FedConfig(emulator_levels=[2])) == hash(FedConfig())  # usable as a static jit argument


def test_fields_of_the_user_facing_configs_are_described():
    from fedpeat_jax.config import FedConfig
    from fedpeat_jax.data.source import TextConfig
    from fedpeat_jax.tasks import TaskConfig

    for cls in (TextConfig, TaskConfig, FedConfig):
        missing = [name for name, doc in field_docs(cls).items() if not doc]
        assert not missing, f"{cls.__name__} fields without a description: {missing}"
