"""save_palettized -> load_palettized into a float skeleton gives the saved model's outputs exactly."""
import json
import os

import pytest
import torch
from torch import nn

from idkm_plugin.export import load_palettized, save_palettized, size_report
from idkm_plugin.export.safetensors_format import read_safetensors
from idkm_plugin.nn import PalettizedModule, PalettizedWeight
from palettized_models import CONFIGS, AllKinds, palettize, trained_bn


@pytest.mark.parametrize("case", CONFIGS)
def test_save_load_outputs_are_identical(tmp_path, case):
    torch.manual_seed(1)
    saved = palettize(trained_bn(AllKinds()), CONFIGS[case])
    path = tmp_path / "model.safetensors"
    save_palettized(saved, path)
    loaded = load_palettized(path, AllKinds()).eval()
    inputs = saved.example_inputs()
    assert torch.equal(loaded(*inputs), saved(*inputs))
    for name, module in saved.named_modules():
        if isinstance(module, PalettizedModule):
            other = loaded.get_submodule(name)
            assert type(other) is type(module)
            assert torch.equal(other.dequantize_weight(), module.dequantize_weight())
            assert other.lut.dtype == module.lut.dtype


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_every_bit_width_round_trips(tmp_path, bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (1, 24 * 9))
    lut = torch.randn(1, 1 << bits, 1)
    model = nn.Sequential(nn.Linear(9, 24))
    from idkm_plugin.nn import PalettizedLinear
    model[0] = PalettizedLinear(9, 24, codes, lut, bits, torch.randn(24))
    save_palettized(model, tmp_path / "m.safetensors")
    loaded = load_palettized(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(9, 24)))
    assert torch.equal(loaded[0].unpacked_codes(), codes)
    x = torch.randn(3, 9)
    assert torch.equal(loaded(x), model(x))


def test_file_is_the_packed_size_plus_header(tmp_path):
    torch.manual_seed(0)
    model = palettize(AllKinds(), CONFIGS["bits 1..8 mixed"])
    path = tmp_path / "model.safetensors"
    size = save_palettized(model, path)
    assert size == os.path.getsize(path)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    data_bytes = size - 8 - header_len
    assert data_bytes == size_report(model).total_bytes + 8  # + BatchNorm's int64 num_batches_tracked
    assert header_len < 4096


def test_metadata_describes_every_layer(tmp_path):
    model = palettize(AllKinds(), CONFIGS["grouped LUTs"])
    save_palettized(model, tmp_path / "m.safetensors")
    _, metadata = read_safetensors(tmp_path / "m.safetensors")
    layers = json.loads(metadata["idkm_plugin.layers"])
    assert set(layers) == {"embed", "conv1", "conv2", "fc"}
    # compact: dim 1, float32 dtypes and the weight_shape the hyperparameters hold are left out
    assert layers["conv2"] == {
        "kind": "PalettizedConv2d", "bits": 4, "lut_groups": 4,
        "hyperparameters": {"weight_shape": [8, 2, 3, 3], "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1],
                            "groups": 2, "padding_mode": "reflect"}}
    assert layers["embed"] == {"kind": "PalettizedEmbedding", "bits": 2, "weight_shape": [40, 12], "lut_groups": 5,
                               "hyperparameters": {"num_embeddings": 40, "embedding_dim": 12, "padding_idx": 0}}
    float16 = palettize(AllKinds(), CONFIGS["d>1, float16 LUT"])
    save_palettized(float16, tmp_path / "f16.safetensors")
    layers = json.loads(read_safetensors(tmp_path / "f16.safetensors")[1]["idkm_plugin.layers"])
    assert layers["embed"]["lut_dtype"] == "float16" and layers["embed"]["dim"] == 4


def test_the_safetensors_library_reads_the_file(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = palettize(trained_bn(AllKinds()), CONFIGS["d>1, float16 LUT"])
    save_palettized(model, tmp_path / "m.safetensors")
    theirs = safetensors_torch.load_file(str(tmp_path / "m.safetensors"))
    ours = model.state_dict()
    assert set(theirs) == set(ours)
    for key, value in ours.items():
        assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), key


def test_our_reader_reads_the_safetensors_library_file(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.ones(2, dtype=torch.bfloat16),
               "d": torch.tensor([1, 2], dtype=torch.uint8), "e": torch.zeros(0, 3)}
    safetensors_torch.save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    read, metadata = read_safetensors(tmp_path / "x.safetensors")
    assert metadata == {"k": "v"}
    assert all(torch.equal(read[k], v) and read[k].dtype == v.dtype for k, v in tensors.items())


def test_torch_save_of_the_state_dict_still_works(tmp_path):
    model = palettize(AllKinds(), CONFIGS["bits 1..8 mixed"])
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    state = torch.load(tmp_path / "sd.pt", weights_only=True)
    other = palettize(AllKinds(), CONFIGS["bits 1..8 mixed"])
    other.load_state_dict(state)
    inputs = model.example_inputs()
    assert torch.equal(other(*inputs), model(*inputs))


def test_loading_into_an_already_palettized_model_replaces_it(tmp_path):
    torch.manual_seed(2)
    saved = palettize(trained_bn(AllKinds()), CONFIGS["bits 1..8 mixed"])
    save_palettized(saved, tmp_path / "m.safetensors")
    torch.manual_seed(3)
    loaded = load_palettized(tmp_path / "m.safetensors", palettize(AllKinds(), CONFIGS["bits 1..8 mixed"])).eval()
    inputs = saved.example_inputs()
    assert torch.equal(loaded(*inputs), saved(*inputs))


def test_mismatched_skeleton_names_the_layer(tmp_path):
    path = tmp_path / "m.safetensors"
    save_palettized(palettize(AllKinds(), CONFIGS["bits 1..8 mixed"]), path)
    wrong_shape = AllKinds()
    wrong_shape.fc = nn.Linear(144, 11)
    with pytest.raises(ValueError, match=r"layer 'fc'.*out_features: file 10 vs model 11"):
        load_palettized(path, wrong_shape)
    wrong_stride = AllKinds()
    wrong_stride.conv2 = nn.Conv2d(4, 8, 3, stride=1, padding=1, groups=2, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"layer 'conv2'.*stride: file \[2, 2\] vs model \[1, 1\]"):
        load_palettized(path, wrong_stride)
    wrong_kind = AllKinds()
    wrong_kind.conv1 = nn.Linear(12, 16)
    with pytest.raises(ValueError, match=r"layer 'conv1': the file holds a PalettizedConv1d but the model has a Lin"):
        load_palettized(path, wrong_kind)
    missing = AllKinds()
    del missing.embed
    with pytest.raises(ValueError, match=r"layer 'embed'.*no such module"):
        load_palettized(path, missing)
    extra = AllKinds()
    extra.head = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"missing \['head.bias', 'head.weight'\]"):
        load_palettized(path, extra)


def test_a_file_without_metadata_is_refused(tmp_path):
    from idkm_plugin.export.safetensors_format import write_safetensors
    write_safetensors(tmp_path / "plain.safetensors", {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="not a palettized model file"):
        load_palettized(tmp_path / "plain.safetensors", nn.Linear(2, 1))


def test_float_model_is_refused_on_save(tmp_path):
    with pytest.raises(ValueError, match="no palettized layer"):
        save_palettized(nn.Linear(2, 2), tmp_path / "m.safetensors")


class WeightHolder(nn.Module):
    """A PT2E-style graph stand-in: a PalettizedWeight submodule read by a functional linear."""

    def __init__(self, weight):
        super().__init__()
        self.fc_weight = weight

    def forward(self, x):
        return nn.functional.linear(x, self.fc_weight())


def test_palettized_weight_round_trips_into_a_graph_with_one(tmp_path):
    torch.manual_seed(0)
    weight = PalettizedWeight(torch.randint(0, 8, (1, 20)), torch.randn(1, 8, 1), 3, (4, 5), torch.float32)
    model = WeightHolder(weight)
    save_palettized(model, tmp_path / "w.safetensors")
    skeleton = WeightHolder(PalettizedWeight(torch.zeros(1, 20, dtype=torch.long), torch.zeros(1, 8, 1), 3, (4, 5),
                                             torch.float32))
    loaded = load_palettized(tmp_path / "w.safetensors", skeleton)
    x = torch.randn(2, 5)
    assert torch.equal(loaded(x), model(x))
    float_skeleton = WeightHolder(nn.Linear(5, 4))
    with pytest.raises(ValueError, match=r"layer 'fc_weight': the file holds a PalettizedWeight"):
        load_palettized(tmp_path / "w.safetensors", float_skeleton)


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    model = palettize(AllKinds(), CONFIGS["bits 1..8 mixed"])
    save_palettized(model, path)
    before = path.read_bytes()
    import idkm_plugin.export.safetensors_format as fmt

    def broken(tensor):
        raise OSError("disk full")
    monkeypatch.setattr(fmt, "_tensor_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        save_palettized(model, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


class TiedLM(nn.Module):
    """Embedding and output head sharing one weight (as GPT-2 / BERT tie them)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.head = nn.Linear(8, 32, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_tied_layers_are_stored_once_and_tied_again(tmp_path):
    from idkm_plugin.nn import PalettizedEmbedding, PalettizedLinear

    torch.manual_seed(0)
    codes, lut = torch.randint(0, 4, (1, 256)), torch.randn(1, 4, 1)
    model = TiedLM()
    model.embed = PalettizedEmbedding(32, 8, codes, lut, 2)
    model.head = PalettizedLinear(8, 32, codes, lut, 2)
    model.head.codes, model.head.lut = model.embed.codes, model.embed.lut  # tied: one tensor each
    size = save_palettized(model, tmp_path / "tied.safetensors")
    tensors, _ = read_safetensors(tmp_path / "tied.safetensors")
    assert set(tensors) == {"embed.codes", "embed.lut"}  # the head's entries are aliases
    assert size < 64 + 64 + 16 + 1024  # the 64 code bytes once, plus the header
    loaded = load_palettized(tmp_path / "tied.safetensors", TiedLM())
    assert loaded.head.codes is loaded.embed.codes and loaded.head.lut is loaded.embed.lut
    ids = torch.randint(0, 32, (2, 5))
    assert torch.equal(loaded(ids), model(ids))
