"""moe.Config: presets by name, keyword fields, enum names, errors."""
import pytest

import moe


def test_preset_and_fields():
    cfg = moe.Config("mixtral", num_experts=4, d_model=16, d_ff=32)
    assert (cfg.num_experts, cfg.top_k, cfg.d_model, cfg.d_ff) == (4, 2, 16, 32)
    assert cfg.score == "softmax" and cfg.normalize == "sum" and cfg.routing == "topk"


def test_plain_fields_and_enum_names():
    cfg = moe.Config(num_experts=6, top_k=3, d_model=8, d_ff=16, score="sigmoid",
                     activation="GEGLU", normalize=1, capacity_factor=1.5)
    assert cfg.score == "sigmoid" and cfg.activation == "geglu" and cfg.normalize == "none"
    assert cfg.capacity_factor == 1.5


def test_resolved_applies_defaults():
    cfg = moe.Config(num_experts=4, top_k=2, d_model=8, d_ff=16)
    r = cfg.resolved()
    assert cfg.n_group == 0 and r.n_group == 1 and r.routed_scale == 1.0


def test_replace_and_immutable():
    cfg = moe.Config("qwen2_moe", num_experts=8, d_model=16, d_ff=8, shared_d_ff=24)
    cfg2 = cfg.replace(top_k=2)
    assert cfg.top_k == 4 and cfg2.top_k == 2 and cfg2 != cfg
    with pytest.raises(AttributeError):
        cfg.top_k = 3


def test_unknown_keyword_names_it():
    with pytest.raises(TypeError, match="topk"):
        moe.Config("mixtral", topk=2)
    with pytest.raises(TypeError, match="parallel_for"):
        moe.Config("mixtral", parallel_for=0)


def test_unknown_preset():
    with pytest.raises(ValueError, match="mixtral"):
        moe.Config("mixtal")


def test_bad_values_carry_the_status_string():
    with pytest.raises(moe.MoeError, match="BAD_TOP_K.*top_k must satisfy") as e:
        moe.Config("mixtral", top_k=9)
    assert e.value.status == moe.lib.MOE_STATUS_BAD_TOP_K and e.value.name == "BAD_TOP_K"
    with pytest.raises(moe.MoeError, match="BAD_DIMENSION"):
        moe.Config(num_experts=4, top_k=2, d_model=0, d_ff=8)
    with pytest.raises(moe.MoeError, match="BAD_ENUM"):
        moe.Config("mixtral", routing=7)
    with pytest.raises(ValueError, match="expert_choice"):
        moe.Config("mixtral", routing="expert-choice")
    with pytest.raises(moe.MoeError, match="BAD_OPTION"):
        moe.Config("mixtral", second_expert="random", top_k=3)


def test_wrong_python_types():
    with pytest.raises(TypeError, match="top_k"):
        moe.Config("mixtral", top_k=2.5)
    with pytest.raises(OverflowError, match="seed"):
        moe.Config("mixtral", seed=-1)
    with pytest.raises(TypeError, match="score"):
        moe.Config("mixtral", score=1.0)


def test_fingerprint_ignores_threads():
    cfg = moe.Config("mixtral", num_experts=4, d_model=8, d_ff=16)
    assert cfg.fingerprint() == cfg.replace(num_threads=1).fingerprint() != 0
    assert cfg.fingerprint() != cfg.replace(top_k=1).fingerprint()
