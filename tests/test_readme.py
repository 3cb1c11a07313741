"""The README's self-contained Python examples run as written."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_block(heading: str) -> str:
    """The first ```python block after ``heading``."""
    text = README.read_text()
    start = text.index(heading)
    match = re.search(r"```python\n(.*?)```", text[start:], flags=re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_usage_example_balances_the_router(capsys):
    namespace: dict = {}
    exec(_python_block("## Usage"), namespace)  # noqa: S102
    # The skewed logits start far from balance; 200 sign steps of 1e-3 bring them closer.
    assert "MaxVio" in capsys.readouterr().out
    start = namespace["expert_load"](
        namespace["route"](namespace["logits"], None, namespace["config"]).expert_ids, 16
    )
    final = namespace["load"]
    max_violation = namespace["max_violation"]
    assert float(max_violation(final)) < float(max_violation(start))


def test_moe_layer_example_trains_and_moves_only_the_bias_by_its_rule():
    namespace: dict = {}
    exec(_python_block("### The MoE layer"), namespace)  # noqa: S102
    layer, optimizer = namespace["layer"], namespace["optimizer"]
    bias_before = np.asarray(layer.bias_e[...])
    w_before = np.asarray(layer.w_in_edf[...])
    x = jax.random.normal(jax.random.key(1), (2, 8, 512))
    namespace["train_step"](layer, optimizer, x)
    assert not np.array_equal(np.asarray(layer.w_in_edf[...]), w_before)
    step = np.asarray(layer.bias_e[...]) - bias_before
    np.testing.assert_allclose(np.abs(step[step != 0]), 1e-3, rtol=1e-5)
    assert layer.bias_e[...].dtype == jnp.float32


def test_every_exported_name_is_documented():
    import sigmoid_moe

    text = README.read_text()
    api = text[text.index("## API") :]
    for name in sigmoid_moe.__all__:
        obj = getattr(sigmoid_moe, name)
        if callable(obj):  # functions and classes; a NamedTuple's generated doc is not one
            doc = (obj.__doc__ or "").strip()
            assert doc and not doc.startswith(f"{name}("), f"{name} has no docstring"
        assert f"`{name}`" in api, f"{name} is not in the README's API section"
    # Kernel internals stay in their modules, not at the top level.
    for internal in ("BlockLayout", "block_layout", "blocked_expert_ffn", "bias_correction"):
        assert internal not in sigmoid_moe.__all__ and not hasattr(sigmoid_moe, internal)
