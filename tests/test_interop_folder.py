"""Checkpoint folders: every weight loaded, FP8 dequantised, routing intact, bad folders refused,
the way back bit-exact (bf16/fp32) or within the FP8 bound."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hf_checkpoints import (
    V2_LITE_CONFIG,
    V3_CONFIG,
    fp8_quantize,
    fused_from_truth,
    hf_forward_numpy,
    moe_state,
    write_folder,
)
from safetensors.numpy import save_file

from sigmoid_moe import route
from sigmoid_moe.interop import (
    FP8_RELATIVE_ERROR,
    FP8_SUBNORMAL_STEP,
    dequantize_blocks,
    load_moe_layers,
    quantize_blocks,
    save_moe_layers,
    to_hf_deepseek_v3_moe,
)

INDEX = "model.safetensors.index.json"


@nnx.jit
def _call(layer, x):
    return layer(x)


def _layers(cfg=V3_CONFIG, bias=True):
    return {i: moe_state(cfg, seed=i, bias=bias) for i in (1, 2)}


def _assert_weights(layer, fused, cfg):
    """Every parameter of ``layer`` equals the fused float32 truth, in our layout, exactly."""
    f, fs = cfg["moe_intermediate_size"], cfg["moe_intermediate_size"] * cfg["n_shared_experts"]
    got = lambda v: np.asarray(v[...], np.float32)  # noqa: E731
    np.testing.assert_array_equal(got(layer.router_w_de), fused["gate.weight"].T)
    bias = fused.get("gate.e_score_correction_bias", np.zeros(cfg["n_routed_experts"]))
    np.testing.assert_array_equal(got(layer.bias_e), bias)
    assert layer.bias_e[...].dtype == jnp.float32
    np.testing.assert_array_equal(got(layer.w_in_edf), fused["experts.gate_up_proj"].swapaxes(1, 2))
    np.testing.assert_array_equal(got(layer.w_out_efd), fused["experts.down_proj"].swapaxes(1, 2))
    shared_in = got(layer.shared_w_in_df)
    np.testing.assert_array_equal(shared_in[:, :fs], fused["shared_experts.gate_proj.weight"].T)
    np.testing.assert_array_equal(shared_in[:, fs:], fused["shared_experts.up_proj.weight"].T)
    np.testing.assert_array_equal(
        got(layer.shared_w_out_fd), fused["shared_experts.down_proj.weight"].T
    )
    assert f == layer.config.d_ff


@pytest.mark.parametrize(
    "layout, stored, block, want_dtype",
    [
        ("per_expert", "float32", (128, 128), jnp.float32),
        ("fused", "bfloat16", (128, 128), jnp.bfloat16),
        ("per_expert", "fp8", (128, 128), jnp.bfloat16),  # 136 x 40: edge blocks
        ("fused", "fp8", (16, 32), jnp.bfloat16),  # many blocks, 3-D scales
    ],
)
def test_every_weight_loads(tmp_path, layout, stored, block, want_dtype):
    truth = write_folder(tmp_path, V3_CONFIG, _layers(), layout=layout, stored=stored, block=block)
    layers = load_moe_layers(tmp_path, param_dtype=jnp.float32)  # exact view of what's stored
    assert list(layers) == [1, 2]  # layer 0 is dense (first_k_dense_replace=1)
    for i, layer in layers.items():
        _assert_weights(
            layer, fused_from_truth(truth, f"model.layers.{i}.mlp.", V3_CONFIG), V3_CONFIG
        )
    default = load_moe_layers(tmp_path, [2])[2]  # param_dtype=None: the stored precision
    assert default.w_in_edf[...].dtype == want_dtype
    assert default.config.dtype == want_dtype


def test_fp8_layer_routes_and_computes_like_hf_on_the_dequantised_weights(tmp_path):
    truth = write_folder(tmp_path, V3_CONFIG, _layers(), stored="fp8", block=(32, 64))
    layer = load_moe_layers(tmp_path, 2, param_dtype=jnp.float32)[2]
    fused = fused_from_truth(truth, "model.layers.2.mlp.", V3_CONFIG)
    x = np.random.default_rng(0).normal(size=(2, 9, V3_CONFIG["hidden_size"])).astype(np.float32)
    y, aux = _call(layer, jnp.asarray(x))
    np.testing.assert_allclose(
        np.asarray(y), hf_forward_numpy(V3_CONFIG, fused, x), rtol=2e-5, atol=2e-5
    )
    logits = x.reshape(-1, x.shape[-1]) @ fused["gate.weight"].T
    routing = route(jnp.asarray(logits), fused["gate.e_score_correction_bias"], layer.config.router)
    want_load = np.bincount(np.asarray(routing.expert_ids).ravel(), minlength=8)
    np.testing.assert_array_equal(np.asarray(aux.expert_load), want_load)


def test_deepseek_v2_lite_folder_routes_with_softmax_and_no_bias(tmp_path):
    layers = _layers(V2_LITE_CONFIG, bias=False)
    truth = write_folder(tmp_path, V2_LITE_CONFIG, layers, stored="bfloat16")
    layer = load_moe_layers(tmp_path, [1], param_dtype=jnp.float32)[1]
    assert layer.config.router.score_fn == "softmax" and not layer.config.router.normalize
    fused = fused_from_truth(truth, "model.layers.1.mlp.", V2_LITE_CONFIG)
    x = np.random.default_rng(1).normal(size=(7, 24)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(_call(layer, jnp.asarray(x))[0]),
        hf_forward_numpy(V2_LITE_CONFIG, fused, x),
        rtol=2e-5,
        atol=2e-5,
    )


def test_only_the_shards_holding_the_layer_are_opened(tmp_path):
    # Layer 1 in shard 1, layer 2 in shard 2, the dense layer and embeddings in shard 3.
    write_folder(tmp_path, V3_CONFIG, _layers(), shard_of_layer={0: 2, 1: 0, 2: 1})
    (tmp_path / "model-00003-of-00003.safetensors").unlink()
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    assert list(load_moe_layers(tmp_path, [1])) == [1]  # never needed shards 2 and 3
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00003.safetensors.*missing"):
        load_moe_layers(tmp_path, [2])


def _edit_index(path, edit):
    index = json.loads((path / INDEX).read_text())
    edit(index["weight_map"])
    (path / INDEX).write_text(json.dumps(index))


def _rewrite_shard(path, shard, edit):
    from safetensors.numpy import load_file

    # safetensors' NumPy reader looks float8_e4m3fn up on numpy (safetensors#682). The
    # library names it there before its own first FP8 read (sigmoid_moe.interop.folder);
    # this helper may read first, so it does the same.
    if "float8_e4m3fn" not in np.__dict__:
        np.float8_e4m3fn = ml_dtypes.float8_e4m3fn
    tensors = load_file(str(path / shard))
    edit(tensors)
    save_file(tensors, str(path / shard))


P = "model.layers.1.mlp."
SHARD_1 = "model-00002-of-00003.safetensors"  # layer 1 under round robin


def test_bad_folders_get_clear_errors(tmp_path):
    write_folder(tmp_path, V3_CONFIG, _layers(), stored="fp8")
    with pytest.raises(ValueError, match=r"layer 0 is dense.*first_k_dense_replace=1.*\[1, 2\]"):
        load_moe_layers(tmp_path, [0])
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        load_moe_layers(tmp_path, [5])
    with pytest.raises(TypeError, match="layer indices"):
        load_moe_layers(tmp_path, ["1"])
    with pytest.raises(ValueError, match="twice"):
        load_moe_layers(tmp_path, [1, 1])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_moe_layers(tmp_path / "nowhere")

    # The index names a tensor its shard does not hold.
    _edit_index(
        tmp_path,
        lambda m: m.update({P + "experts.3.up_proj.weight": "model-00001-of-00003.safetensors"}),
    )
    with pytest.raises(
        ValueError, match=r"maps 'model.layers.1.mlp.experts.3.up_proj.weight'.*does not hold"
    ):
        load_moe_layers(tmp_path, [1])
    # The index lacks a tensor the config calls for.
    _edit_index(tmp_path, lambda m: m.pop(P + "experts.3.up_proj.weight"))
    with pytest.raises(KeyError, match="experts.3.up_proj.weight"):
        load_moe_layers(tmp_path, [1])


@pytest.mark.parametrize(
    "damage, error, match",
    [
        (  # a shape that disagrees with the config
            lambda t: t.update({P + "experts.0.down_proj.weight": np.zeros((136, 41), np.float32)}),
            ValueError,
            r"experts.0.down_proj.weight.*\(136, 41\).*\(136, 40\)",
        ),
        (  # a dtype the loader does not know
            lambda t: t.update({P + "gate.weight": np.zeros((8, 136), np.int8)}),
            ValueError,
            r"gate.weight.*stored as I8",
        ),
        (
            lambda t: t.update({P + "gate.weight": np.zeros((8, 136), ml_dtypes.float8_e5m2)}),
            ValueError,
            r"gate.weight.*stored as F8_E5M2",
        ),
        (  # an FP8 weight without its scale
            lambda t: t.pop(P + "experts.4.gate_proj.weight_scale_inv"),
            ValueError,
            r"4.gate_proj.weight' \(layer 1\) is float8_e4m3fn but has no .*weight_scale_inv'",
        ),
        (  # a scale of the wrong grid
            lambda t: t.update(
                {P + "experts.4.gate_proj.weight_scale_inv": np.ones((1, 1), np.float32)}
            ),
            ValueError,
            r"weight_scale_inv.*shape \(1, 1\).*\(1, 2\)",
        ),
        (  # an unknown key under the layer
            lambda t: t.update({P + "experts.0.gate_proj.bias": np.zeros(40, np.float32)}),
            ValueError,
            r"unused.*experts.0.gate_proj.bias",
        ),
        (  # corrupt values
            lambda t: t[P + "gate.e_score_correction_bias"].__setitem__(3, np.nan),
            ValueError,
            r"e_score_correction_bias' \(layer 1\) holds NaN or inf",
        ),
        (
            lambda t: t.update(
                {P + "experts.5.down_proj.weight_scale_inv": np.full((2, 1), np.inf, np.float32)}
            ),
            ValueError,
            r"experts.5.down_proj.weight' \(layer 1\) holds NaN or inf",
        ),
        (  # a missing bias for a V3 gate
            lambda t: t.pop(P + "gate.e_score_correction_bias"),
            ValueError,
            r"e_score_correction_bias' \(layer 1\) is missing.*allow_missing_bias",
        ),
    ],
    ids=[
        "shape",
        "int8",
        "e5m2",
        "no_scale",
        "scale_shape",
        "unknown_key",
        "nan_bias",
        "inf_scale",
        "no_bias",
    ],
)
def test_damaged_shards_are_refused(tmp_path, damage, error, match):
    write_folder(tmp_path, V3_CONFIG, _layers(), stored="fp8")

    def edit(tensors):
        before = set(tensors)
        damage(tensors)
        for name in set(tensors) - before:
            _edit_index(tmp_path, lambda m, n=name: m.update({n: SHARD_1}))
        for name in before - set(tensors):
            _edit_index(tmp_path, lambda m, n=name: m.pop(n))

    _rewrite_shard(tmp_path, SHARD_1, edit)
    with pytest.raises(error, match=match):
        load_moe_layers(tmp_path, [1])
    assert list(load_moe_layers(tmp_path, [2])) == [2]  # the other layer is untouched


def test_config_errors_name_the_file_or_key(tmp_path):
    write_folder(tmp_path, V3_CONFIG, _layers())
    (tmp_path / INDEX).write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json is not valid JSON"):
        load_moe_layers(tmp_path)
    (tmp_path / INDEX).unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors.index.json"):
        load_moe_layers(tmp_path)
    for cfg, match in [
        (dict(V3_CONFIG, n_shared_experts=0), "n_shared_experts is 0 or absent"),
        (dict(V3_CONFIG, moe_intermediate_size=41), r"\(41, 136\)"),
        ({k: v for k, v in V3_CONFIG.items() if k != "hidden_size"}, "'hidden_size'"),
        (dict(V3_CONFIG, n_routed_experts=8.0), "'n_routed_experts' must be an integer"),
        (dict(V3_CONFIG, quantization_config={"quant_method": "awq"}), "quant_method='awq'"),
    ]:
        folder = tmp_path / str(abs(hash(match)))
        write_folder(folder, V3_CONFIG, _layers())
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises((ValueError, TypeError), match=match):
            load_moe_layers(folder, [1])
    (folder / "config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        load_moe_layers(folder)


# --- writing ------------------------------------------------------------------------


def _loaded(tmp_path, stored="float32"):
    write_folder(tmp_path / "src", V3_CONFIG, _layers(), stored=stored)
    return load_moe_layers(
        tmp_path / "src", param_dtype=jnp.float32 if stored == "float32" else None
    )


def _same_weights(a, b):
    for name in (
        "router_w_de",
        "bias_e",
        "w_in_edf",
        "w_out_efd",
        "shared_w_in_df",
        "shared_w_out_fd",
    ):
        x, y = getattr(a, name)[...], getattr(b, name)[...]
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


@pytest.mark.parametrize("stored, layout", [("float32", "fused"), ("bfloat16", "per_expert")])
def test_round_trip_is_bit_identical_over_three_shards(tmp_path, stored, layout):
    layers = _loaded(tmp_path, stored)
    per_layer = sum(v.nbytes for v in to_hf_deepseek_v3_moe(layers[1]).values())
    index_path = save_moe_layers(
        tmp_path / "out", layers, V3_CONFIG, layout=layout, max_shard_size=per_layer * 2 // 3
    )
    assert index_path.name == INDEX
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    from safetensors import safe_open

    total, seen = 0, {}
    for shard in shards:
        with safe_open(str(tmp_path / "out" / shard), framework="numpy") as f:
            for key in f.keys():
                seen[key] = shard
                total += int(np.prod(f.get_slice(key).get_shape())) * (
                    4 if f.get_slice(key).get_dtype() == "F32" else 2
                )
    assert seen == index["weight_map"] and total == index["metadata"]["total_size"]
    back = load_moe_layers(tmp_path / "out", [1, 2])
    for i in (1, 2):
        _same_weights(layers[i], back[i])
    # A folder that fits one shard is a single model.safetensors without an index.
    single = save_moe_layers(tmp_path / "one", {2: layers[2]}, V3_CONFIG)
    assert single.name == "model.safetensors"
    _same_weights(layers[2], load_moe_layers(tmp_path / "one", [2])[2])
    with pytest.raises(KeyError, match=r"no tensor under 'model.layers.1.mlp.'.*MoE layers \[2\]"):
        load_moe_layers(tmp_path / "one")


def test_fp8_round_trip_within_the_stated_bound(tmp_path):
    layers = _loaded(tmp_path)  # float32 weights
    save_moe_layers(tmp_path / "fp8", layers, V3_CONFIG, fp8=True, layout="fused")
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    back = load_moe_layers(tmp_path / "fp8", param_dtype=jnp.float32)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), framework="numpy") as f:
        assert f.get_slice("model.layers.1.mlp.experts.gate_up_proj").get_dtype() == "F8_E4M3"
        assert f.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "F32"  # router kept
        scale = f.get_tensor("model.layers.1.mlp.experts.gate_up_proj_scale_inv")  # [E, 1, 2]
    w = np.asarray(layers[1].w_in_edf[...]).swapaxes(1, 2)  # [E, 2F, d] as stored
    got = np.asarray(back[1].w_in_edf[...]).swapaxes(1, 2)
    grid = np.stack([np.kron(s, np.ones((128, 128)))[: w.shape[1], : w.shape[2]] for s in scale])
    bound = (FP8_RELATIVE_ERROR + 2**-22) * np.abs(w) + FP8_SUBNORMAL_STEP * grid
    err = np.abs(got - w)
    assert np.all(err <= bound), float((err / bound).max())
    assert (err / bound).max() > 0.5  # the bound is tight, not vacuous
    np.testing.assert_array_equal(
        np.asarray(back[1].router_w_de[...]), np.asarray(layers[1].router_w_de[...])
    )
    np.testing.assert_array_equal(
        np.asarray(back[1].bias_e[...]), np.asarray(layers[1].bias_e[...])
    )
    # Writing the FP8 layers back without fp8 drops the quantization_config, bit-exact.
    save_moe_layers(tmp_path / "plain", back, cfg)
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    _same_weights(back[1], load_moe_layers(tmp_path / "plain", [1], param_dtype=jnp.float32)[1])


def test_quantize_blocks_matches_the_reference_and_the_bound():
    rng = np.random.default_rng(3)
    w = (rng.normal(size=(70, 150)) * np.exp(rng.normal(size=(70, 150)) * 3)).astype(np.float32)
    w[:16, :32] = 0  # an all-zero block
    w[20, 40] = 1e-30  # deep in the subnormal range of its block
    q, scale = quantize_blocks(w, (16, 32))
    q_ref, scale_ref = fp8_quantize(w, (16, 32))
    np.testing.assert_array_equal(scale, scale_ref)
    np.testing.assert_array_equal(q.view(np.uint8), q_ref.view(np.uint8))
    deq = dequantize_blocks(q, scale, (16, 32))
    grid = np.kron(scale, np.ones((16, 32)))[:70, :150]
    assert np.all(
        np.abs(deq - w) <= (FP8_RELATIVE_ERROR + 2**-22) * np.abs(w) + FP8_SUBNORMAL_STEP * grid
    )
    assert np.all(deq[:16, :32] == 0)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_blocks(np.full((2, 2), np.inf, np.float32), (128, 128))
    with pytest.raises(ValueError, match=r"scale_inv.*must have shape \(5, 5\), got \(1, 1\)"):
        dequantize_blocks(q, np.ones((1, 1), np.float32), (16, 32))


def test_save_refuses_what_would_not_reload(tmp_path):
    layers = _loaded(tmp_path)
    with pytest.raises(ValueError, match="does not match config.json"):
        save_moe_layers(tmp_path / "a", layers, dict(V3_CONFIG, routed_scaling_factor=1.0))
    with pytest.raises(ValueError, match="layer 0 is dense"):
        save_moe_layers(tmp_path / "b", {0: layers[1]}, V3_CONFIG)
    with pytest.raises(TypeError, match="must be a MoELayer"):
        save_moe_layers(tmp_path / "c", {1: "layer"}, V3_CONFIG)
    save_moe_layers(tmp_path / "d", layers, V3_CONFIG)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_moe_layers(tmp_path / "d", layers, V3_CONFIG)
    save_moe_layers(tmp_path / "d", {2: layers[2]}, V3_CONFIG, overwrite=True)
    assert list(load_moe_layers(tmp_path / "d", [2])) == [2]
    # A V2 gate has no bias: a nonzero one would be lost, so it is refused.
    v2 = load_moe_layers(_v2_folder(tmp_path / "v2"), [1], param_dtype=jnp.float32)
    v2[1].bias_e.set_value(jnp.ones(8, jnp.float32))
    with pytest.raises(ValueError, match="bias is nonzero"):
        save_moe_layers(tmp_path / "e", v2, V2_LITE_CONFIG)


def test_multi_token_prediction_layers_load_when_asked(tmp_path):
    layers = _loaded(tmp_path)
    cfg = dict(V3_CONFIG, num_nextn_predict_layers=1)  # layer 3 is DeepSeek-V3's MTP block
    save_moe_layers(tmp_path / "mtp", {2: layers[2], 3: layers[1]}, cfg)
    _same_weights(layers[1], load_moe_layers(tmp_path / "mtp", [3])[3])
    with pytest.raises(KeyError, match=r"no tensor under 'model.layers.1.mlp.'.*\[2, 3\]"):
        load_moe_layers(tmp_path / "mtp")  # default: the decoder's MoE layers 1 and 2


def _v2_folder(path):
    write_folder(path, V2_LITE_CONFIG, _layers(V2_LITE_CONFIG, bias=False))
    return path


def test_parity_with_transformers_save_pretrained(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = {k: v for k, v in V3_CONFIG.items() if k not in ("architectures", "model_type")}
    hf_config = transformers.DeepseekV3Config(
        **dict(
            cfg,
            hidden_size=64,
            num_attention_heads=2,
            num_key_value_heads=2,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.uniform_(0, 0.2)
    model.save_pretrained(tmp_path, safe_serialization=True)
    layers = load_moe_layers(tmp_path, param_dtype=jnp.float32)
    x = np.random.default_rng(0).normal(size=(2, 5, 64)).astype(np.float32)
    for i, layer in layers.items():
        with torch.no_grad():
            want = model.model.layers[i].mlp(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(
            np.asarray(_call(layer, jnp.asarray(x))[0]), want, rtol=1e-5, atol=1e-5
        )
