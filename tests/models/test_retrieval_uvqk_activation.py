"""``uvqk_activation`` in the retrieval models and ``--uvqk-activation`` (issue 21, fifth ML-100K
search): silu on u only (GR's production STU, the default) or on u, v, q and k (GR's research
HSTU). The layer math is tested in ``tests/modules/test_stu.py`` and ``test_kv_cache.py``, the
relative-bias layer's in ``test_retrieval_relative_bias.py``."""

import pytest

from torchrec_hstu.models.retrieval import HSTURetrieval
from torchrec_hstu.modules import STULayer


def _layers(model: HSTURetrieval):
    return [m for m in model.modules() if isinstance(m, STULayer)]


@pytest.mark.parametrize("relative_attention_bias", [False, True])
def test_retrieval_model_passes_the_activation_to_every_layer(relative_attention_bias) -> None:
    kwargs = dict(embedding_dim=8, num_layers=2, num_heads=1, attention_dim=4, hidden_dim=4, max_seq_len=6,
                  relative_attention_bias=relative_attention_bias)
    default = HSTURetrieval(12, **kwargs)  # type: ignore[arg-type]
    assert [layer.config.uvqk_activation for layer in _layers(default)] == ["u", "u"]
    model = HSTURetrieval(12, uvqk_activation="all", **kwargs)  # type: ignore[arg-type]
    assert [layer.config.uvqk_activation for layer in _layers(model)] == ["all", "all"]
    with pytest.raises(ValueError, match="uvqk_activation must be 'u'"):
        HSTURetrieval(12, uvqk_activation="v", **kwargs)  # type: ignore[arg-type]


def test_cli_flag_reaches_the_layers(retrieval) -> None:
    assert retrieval.build_parser().parse_args([]).uvqk_activation == "u"
    args = retrieval.model_args(["--uvqk-activation", "all"], "hstu", "ml-100k")
    model = retrieval.build_model(args, 20)
    assert {layer.config.uvqk_activation for layer in _layers(model)} == {"all"}
    recipe = retrieval.build_model(retrieval.model_args([], "hstu", "ml-100k"), 20)
    assert {layer.config.uvqk_activation for layer in _layers(recipe)} == {
        retrieval.RECIPES["ml-100k"]["hstu"].get("uvqk_activation", "u")}


def test_cli_refuses_an_unknown_activation(retrieval, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        retrieval.build_parser().parse_args(["--uvqk-activation", "qk"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--uvqk-activation" in err and "'qk'" in err
