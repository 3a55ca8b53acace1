"""save_palettized -> load_palettized into a float skeleton gives the saved model's outputs exactly."""
import json
import os

import pytest
import torch
from torch import nn

from idkm_plugin.export import load_palettized, save_palettized, size_report
from idkm_plugin.export.safetensors_format import read_safetensors
from idkm_plugin.nn import PalettizedTensor, palettized_parameters
from qat_helpers import TiedLM, palettized, palettized_linear
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
    theirs = palettized_parameters(loaded)
    assert set(theirs) == set(palettized_parameters(saved)) == {f"{n}.weight" for n in CONFIGS[case]}
    for name, weight in palettized_parameters(saved).items():
        assert theirs[name].spec == weight.spec
        assert torch.equal(theirs[name].dequantize(), weight.dequantize())
        assert theirs[name].lut.dtype == weight.lut.dtype


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_every_bit_width_round_trips(tmp_path, bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (1, 24 * 9))
    lut = torch.randn(1, 1 << bits, 1)
    model = nn.Sequential(palettized_linear(9, 24, codes, lut, bits, torch.randn(24)))
    save_palettized(model, tmp_path / "m.safetensors")
    loaded = load_palettized(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(9, 24)))
    assert type(loaded[0]) is nn.Linear and torch.equal(loaded[0].weight.unpacked_codes(), codes)
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
    weights = json.loads(metadata["idkm_plugin.weights"])
    assert set(weights) == {"embed.weight", "conv1.weight", "conv2.weight", "fc.weight"}
    # compact: dim 1 and float32 are left out
    assert weights["conv2.weight"] == {"kind": "Conv2d", "bits": 4, "shape": [8, 2, 3, 3], "lut_groups": 4}
    assert weights["embed.weight"] == {"kind": "Embedding", "bits": 2, "shape": [40, 12], "lut_groups": 5}
    float16 = palettize(AllKinds(), CONFIGS["d>1, float16 LUT"])
    save_palettized(float16, tmp_path / "f16.safetensors")
    tensors, metadata = read_safetensors(tmp_path / "f16.safetensors")
    assert json.loads(metadata["idkm_plugin.weights"])["embed.weight"]["dim"] == 4
    assert tensors["embed.weight.lut"].dtype == torch.float16


def test_the_safetensors_library_reads_the_file(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    model = palettize(trained_bn(AllKinds()), CONFIGS["d>1, float16 LUT"])
    save_palettized(model, tmp_path / "m.safetensors")
    theirs = safetensors_torch.load_file(str(tmp_path / "m.safetensors"))
    weights = palettized_parameters(model)
    ours = {k: v for k, v in model.state_dict().items() if k not in weights}
    ours.update({f"{name}.{k}": t for name, w in weights.items() for k, t in w.inner_tensors().items()})
    assert set(theirs) == set(ours)
    for key, value in ours.items():
        assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), key
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["idkm_plugin.weights"])["fc.weight"]["bits"] == 7


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
    with pytest.raises(ValueError, match=r"layer 'fc': the file's weight has shape \[10, 240\] but the model's "
                                         r"Linear has \[11, 144\]"):
        load_palettized(path, wrong_shape)
    wrong_kind = AllKinds()
    wrong_kind.conv1 = nn.Linear(12, 16)
    with pytest.raises(ValueError, match=r"layer 'conv1': the file holds a palettized Conv1d but the model has a Lin"):
        load_palettized(path, wrong_kind)
    missing = AllKinds()
    del missing.embed
    with pytest.raises(ValueError, match=r"weight 'embed.weight'.*no such parameter"):
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
    """A PT2E-style graph stand-in: a palettized Parameter of the module read by a functional linear."""

    def __init__(self, weight):
        super().__init__()
        self.fc_weight = weight

    def forward(self, x):
        return nn.functional.linear(x, self.fc_weight)


def test_palettized_weight_round_trips_into_a_graph_with_one(tmp_path):
    from idkm_plugin.nn import PaletteSpec

    torch.manual_seed(0)
    spec = PaletteSpec(3, 1, (4, 5))
    weight = PalettizedTensor.build(torch.randint(0, 8, (1, 20)), torch.randn(1, 8, 1), spec)
    model = WeightHolder(nn.Parameter(weight, requires_grad=False))
    save_palettized(model, tmp_path / "w.safetensors")
    skeleton = WeightHolder(nn.Parameter(torch.zeros(4, 5)))
    loaded = load_palettized(tmp_path / "w.safetensors", skeleton)
    x = torch.randn(2, 5)
    assert torch.equal(loaded(x), model(x)) and isinstance(loaded.fc_weight, PalettizedTensor)
    with pytest.raises(ValueError, match=r"layer '': the file's fc_weight has shape \[4, 5\] but the model's "
                                         r"WeightHolder has \[5, 4\]"):
        load_palettized(tmp_path / "w.safetensors", WeightHolder(nn.Parameter(torch.zeros(5, 4))))


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    model = palettize(AllKinds(), CONFIGS["bits 1..8 mixed"])
    save_palettized(model, path)
    before = path.read_bytes()
    import idkm_plugin.export.safetensors_format as fmt

    def broken(tensors, metadata):
        raise OSError("disk full")
    monkeypatch.setattr(fmt, "_serialize", broken)
    with pytest.raises(OSError, match="disk full"):
        save_palettized(model, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_tied_layers_are_stored_once_and_tied_again(tmp_path):
    torch.manual_seed(0)
    codes, lut = torch.randint(0, 4, (1, 256)), torch.randn(1, 4, 1)
    model = TiedLM()
    palettized(model.embed, codes, lut, 2)
    model.head.weight = model.embed.weight  # tied: one palettized Parameter
    size = save_palettized(model, tmp_path / "tied.safetensors")
    tensors, metadata = read_safetensors(tmp_path / "tied.safetensors")
    assert set(tensors) == {"embed.weight.codes", "embed.weight.lut"}
    assert json.loads(metadata["idkm_plugin.aliases"]) == {"head.weight": "embed.weight"}
    assert size < 64 + 64 + 16 + 1024  # the 64 code bytes once, plus the header
    loaded = load_palettized(tmp_path / "tied.safetensors", TiedLM())
    assert loaded.head.weight is loaded.embed.weight and isinstance(loaded.head.weight, PalettizedTensor)
    ids = torch.randint(0, 32, (2, 5))
    assert torch.equal(loaded(ids), model(ids))


LEGACY = os.path.join(os.path.dirname(__file__), "data")


@pytest.mark.parametrize("codec", ["", "_huffman"])
def test_files_of_the_previous_format_load(codec):
    """Files written by format /2 (one Palettized* module class per layer; tests/export/data, made by the code
    before PalettizedTensor) load into the float skeleton and compute what the saved model computed."""
    from safetensors.torch import load_file

    expected = load_file(os.path.join(LEGACY, "legacy_v2_expected.safetensors"))
    loaded = load_palettized(os.path.join(LEGACY, f"legacy_v2_all_kinds{codec}.safetensors"), AllKinds()).eval()
    assert {type(m).__name__ for m in loaded.children()} == {"Embedding", "Conv1d", "Conv2d", "BatchNorm2d", "Linear"}
    assert loaded.conv1.weight.mask is not None and loaded.conv2.weight.channel_scale is not None
    assert loaded.embed.weight.lut.dtype == torch.int8 and loaded.fc.weight.lut.dtype == torch.float16
    assert torch.equal(loaded(expected["ids"], expected["image"]), expected["all_kinds_out"])
    tied = load_palettized(os.path.join(LEGACY, "legacy_v2_tied.safetensors"), TiedLM(vocab=16))
    assert tied.head.weight is tied.embed.weight
    assert torch.equal(tied(expected["tied_ids"]), expected["tied_out"])
