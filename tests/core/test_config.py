import pytest
import torch
from torch import nn

from idkm_plugin import ClusterConfig, Method, ModelConfig, soft_kmeans


@pytest.mark.parametrize("field,value,match", [
    ("method", "kmeans", r"method='kmeans' is not allowed; use one of 'dkm', 'idkm', 'idkm_jfb'"),
    ("bits", 0, r"bits=0 is not allowed; expected an integer in 1..16"),
    ("bits", 17, r"bits=17"),
    ("bits", 2.0, r"bits=2.0"),
    ("dim", 0, r"dim=0 is not allowed"),
    ("tau", -1.0, r"tau=-1.0 is not allowed; expected a finite positive float"),
    ("tau", 0.0, r"tau=0.0"),
    ("max_iter", 0, r"max_iter=0"),
    ("tol", -1e-3, r"tol=-0.001"),
    ("init", "kmeans", r"init='kmeans' is not allowed; use one of 'kmeans\+\+', 'linear', 'density', 'random'"),
    ("granularity", "per_row", r"granularity='per_row'"),
    ("uniquify", "yes", r"uniquify='yes'"),
    ("chunk_size", -5, r"chunk_size=-5 is not allowed; expected None \(automatic\), 0"),
    ("adjoint_max_iter", 0, r"adjoint_max_iter=0"),
    ("adjoint_tol", 0.0, r"adjoint_tol=0.0"),
    ("lut_dtype", "int4", r"lut_dtype='int4' is not allowed; expected one of"),
    ("start_step", -1, r"start_step=-1"),
    ("group_size", -2, r"group_size=-2"),
])
def test_bad_cluster_config_values_raise_naming_field_and_value(field, value, match):
    with pytest.raises(ValueError, match=match):
        ClusterConfig(**{field: value})


def test_grouped_granularity_needs_group_size_and_dkm_cannot_force_uniquify():
    with pytest.raises(ValueError, match="group_size=0 is not allowed; expected an integer >= 1 when"):
        ClusterConfig(granularity="per_grouped_channel")
    with pytest.raises(ValueError, match="uniquify='on' is not allowed with method='dkm'"):
        ClusterConfig(method="dkm", uniquify="on")


def test_cluster_config_enums_and_round_trip():
    cfg = ClusterConfig(method="idkm_jfb", bits=3, dim=2, init="density")
    assert cfg.method is Method.IDKM_JFB and cfg.k == 8 and cfg.bits_per_weight == 1.5
    assert ClusterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bitz'\]"):
        ClusterConfig.from_dict({"bitz": 3})


def test_soft_kmeans_bad_inputs():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="do not match x"):
        soft_kmeans(x, torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"must be \[m, d\] or \[g, m, d\]"):
        soft_kmeans(torch.randn(10), torch.randn(4, 1))
    with pytest.raises(ValueError, match="tau=-1.0 is not allowed"):
        soft_kmeans(x, torch.randn(4, 2), tau=-1.0)
    with pytest.raises(ValueError, match="'newton' is not a valid Method"):
        soft_kmeans(x, torch.randn(4, 2), method="newton")
    with pytest.raises(ValueError, match="expected a floating-point tensor"):
        soft_kmeans(torch.ones(10, 1, dtype=torch.long), torch.randn(4, 1))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 64, 3))
        self.classifier = nn.Sequential(nn.Linear(64 * 4, 200), nn.Linear(200, 10))
        self.emb = nn.Embedding(1000, 32)


def test_model_config_resolution_order():
    b = {n: ClusterConfig(bits=n) for n in range(1, 9)}
    mp = ModelConfig(default=b[4], by_type={"Linear": b[2], "Embedding": b[3]},
                     by_name={"classifier.1": b[5], r"re:classifier\..*": b[6], r"re:features\.1": None,
                              r"re:feat.*": b[7]},
                     small_layer_params=1000, small_layer=b[8])
    got = {name: mp.resolve(name, mod) for name, mod in Net().named_modules() if hasattr(mod, "weight")}
    assert got["classifier.1"] is b[5]  # exact name first
    assert got["classifier.0"] is b[6]  # then the first matching regex
    assert got["features.1"] is None  # None leaves the layer float
    assert got["features.0"] is b[7]  # a regex wins over the small-layer rule
    assert got["emb"] is b[3]  # type
    small = ModelConfig(default=b[4], small_layer_params=1000, small_layer=b[8])
    assert small.resolve("x", nn.Linear(10, 10)) is b[8] and small.resolve("y", nn.Linear(100, 100)) is b[4]


def test_model_config_dict_and_yaml_round_trip(tmp_path):
    mp = ModelConfig(default=ClusterConfig(bits=4), by_type={"Linear": ClusterConfig(bits=2, dim=2)},
                     by_name={r"re:classifier\..*": ClusterConfig(bits=8), "features.0": None},
                     small_layer_params=10_000, small_layer=ClusterConfig(bits=8))
    assert ModelConfig.from_dict(mp.to_dict()) == mp
    mp.to_yaml(tmp_path / "mp.yaml")
    assert ModelConfig.from_yaml(tmp_path / "mp.yaml") == mp


def test_model_config_yaml_entries_inherit_default(tmp_path):
    (tmp_path / "m.yaml").write_text(
        "default: {method: idkm_jfb, bits: 4, max_iter: 10}\n"
        "by_type: {Linear: {bits: 1}}\n"
        "by_name: {'re:features\\..*': skip, head: null}\n")
    mp = ModelConfig.from_yaml(tmp_path / "m.yaml")
    assert mp.by_type["Linear"] == ClusterConfig(method="idkm_jfb", bits=1, max_iter=10)
    assert mp.by_name == {r"re:features\..*": None, "head": None}


def test_model_config_bad_values():
    with pytest.raises(ValueError, match=r"by_name\['x'\]=4 is not allowed"):
        ModelConfig(by_name={"x": 4})
    with pytest.raises(ValueError, match="not a valid regex"):
        ModelConfig(by_name={"re:(": None})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['defaults'\]"):
        ModelConfig.from_dict({"defaults": {}})
    with pytest.raises(ValueError, match="small_layer_params=-1"):
        ModelConfig(small_layer_params=-1)
    with pytest.raises(ValueError, match=r"ClusterConfig.bits=99"):
        ModelConfig.from_dict({"by_type": {"Linear": {"bits": 99}}})
