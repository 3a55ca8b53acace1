"""save_palettized(..., codec="huffman") rebuilds the exact palettized model (codes, LUTs, masks, scales, ties)."""
import contextlib
import json
import os
from unittest import mock

import pytest
import torch
from torch import nn

from idkm_plugin import ClusterConfig, native
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.export import load_palettized, save_palettized, size_report
from idkm_plugin.export.code_layouts import decode_packed_codes, encode_codes
from idkm_plugin.export.safetensors_format import read_safetensors, write_safetensors
from idkm_plugin.layers import palettize_module
from idkm_plugin.nn import PaletteSpec, PalettizedTensor, palettized_parameters
from idkm_plugin.nn.packing import pack_codes
from qat_helpers import TiedLM, palettized, palettized_linear
from palettized_models import CONFIGS, AllKinds, palettize, trained_bn


def _rebuilt(layer, **changes):
    """`layer` with its palettized weight rebuilt with `changes` (codes, lut, channel_scale, lut_scale, mask)."""
    w = layer.weight
    inner = {"codes": w.codes, "lut": w.lut, "channel_scale": w.channel_scale, "lut_scale": w.lut_scale,
             "mask": w.mask, **changes}
    layer.weight = nn.Parameter(PalettizedTensor.build(spec=w.spec, **inner), requires_grad=False)
    return layer


def _prune(model, sparsity, seed=0):
    """Give every palettized layer a random mask keeping 1 - sparsity of its vectors."""
    generator = torch.Generator().manual_seed(seed)
    for name, weight in palettized_parameters(model).items():
        _rebuilt(model.get_submodule(name.rpartition(".")[0]),
                 mask=torch.rand(weight.num_codes, generator=generator) >= sparsity)
    return model


def _layers(path):
    return json.loads(read_safetensors(path)[1]["idkm_plugin.weights"])


def _assert_same_model(loaded, saved, inputs):
    assert torch.equal(loaded(*inputs), saved(*inputs))
    theirs = palettized_parameters(loaded)
    assert set(theirs) == set(palettized_parameters(saved))
    for name, weight in palettized_parameters(saved).items():
        other = theirs[name]
        assert other.spec == weight.spec, name
        for attr in ("codes", "lut", "mask", "channel_scale", "lut_scale"):
            mine, their = getattr(weight, attr), getattr(other, attr)
            assert (mine is None) == (their is None), (name, attr)
            if mine is not None:
                assert mine.dtype == their.dtype and torch.equal(mine, their), (name, attr)
        assert torch.equal(other.dequantize(), weight.dequantize()), name


@pytest.mark.parametrize("sparsity", [None, 0.3, 0.97])
@pytest.mark.parametrize("case", CONFIGS)
def test_huffman_file_rebuilds_the_model_exactly(tmp_path, case, sparsity):
    torch.manual_seed(1)
    saved = palettize(trained_bn(AllKinds()), CONFIGS[case])
    if sparsity is not None:
        _prune(saved, sparsity)
    path = tmp_path / "model.safetensors"
    size = save_palettized(saved, path, codec="huffman")
    assert size == os.path.getsize(path)
    loaded = load_palettized(path, AllKinds()).eval()
    _assert_same_model(loaded, saved, saved.example_inputs())
    raw = tmp_path / "raw.safetensors"
    save_palettized(saved, raw)
    _assert_same_model(load_palettized(raw, AllKinds()).eval(), saved, saved.example_inputs())


def test_pruned_layers_use_both_layouts(tmp_path):
    """Moderate sparsity favours the reserved symbol, extreme sparsity the relative index."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    for i in (0, 1):
        clusterer = WeightClusterer(ClusterConfig(bits=3))
        clusterer(model[i].weight)
        model[i] = palettize_module(model[i], clusterer)
    generator = torch.Generator().manual_seed(0)
    _rebuilt(model[0], mask=torch.rand(128 * 64, generator=generator) >= 0.3)
    _rebuilt(model[1], mask=torch.rand(64 * 128, generator=generator) >= 0.98)
    path = tmp_path / "m.safetensors"
    save_palettized(model, path, codec="huffman")
    layers = _layers(path)
    assert layers["0.weight"]["layout"] == "huffman_reserved"
    assert layers["1.weight"]["layout"] == "huffman_sparse" and layers["1.weight"]["index_bits"] in range(1, 9)
    loaded = load_palettized(path, nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64)))
    _assert_same_model(loaded, model, (torch.randn(3, 64),))
    report = size_report(model, file=path)
    assert [s.layout for s in report.layers] == ["huffman_reserved", "huffman_sparse"]
    tensors, _ = read_safetensors(path)
    assert [s.entropy_bytes for s in report.layers] == [tensors["0.weight.huffman"].numel(),
                                                          tensors["1.weight.huffman"].numel()]
    sparse = report.layers[1]  # a random mask and near-uniform codes: little to gain over fixed width
    assert sparse.entropy_bytes < 1.05 * sparse.sparse_bytes and sparse.sparse_bytes < sparse.code_bytes / 10


def test_pruned_layers_from_clustering_with_sparsity(tmp_path):
    torch.manual_seed(0)
    config = {"embed": ClusterConfig(bits=2, sparsity=0.5), "conv1": ClusterConfig(bits=3, sparsity=0.8),
              "conv2": ClusterConfig(bits=4, dim=3), "fc": ClusterConfig(bits=4, sparsity=0.9)}
    saved = palettize(trained_bn(AllKinds()), config)
    assert saved.fc.weight.mask is not None and saved.conv2.weight.mask is None
    path = tmp_path / "m.safetensors"
    save_palettized(saved, path, codec="huffman")
    _assert_same_model(load_palettized(path, AllKinds()).eval(), saved, saved.example_inputs())


def _scaled(model):
    """Per-channel scales on every layer, and an int8 LUT with its scales on the Linear."""
    for name, weight in palettized_parameters(model).items():
        _rebuilt(model.get_submodule(name.rpartition(".")[0]), channel_scale=torch.rand(weight.weight_shape[0]) + 0.5)
    fc = model.fc.weight
    _rebuilt(model.fc, lut=torch.randint(-127, 128, fc.lut.shape, dtype=torch.int8),
             lut_scale=torch.rand(fc.groups_lut) * 0.01)
    return model


def test_scales_and_int8_lut_round_trip(tmp_path):
    torch.manual_seed(0)
    saved = _prune(_scaled(palettize(trained_bn(AllKinds()), CONFIGS["grouped LUTs"])), 0.5)
    path = tmp_path / "m.safetensors"
    save_palettized(saved, path, codec="huffman")
    loaded = load_palettized(path, AllKinds()).eval()
    assert loaded.fc.weight.lut.dtype == torch.int8
    _assert_same_model(loaded, saved, saved.example_inputs())


@pytest.mark.parametrize("pruned", [False, True])
def test_tied_layers_are_encoded_once_and_tied_again(tmp_path, pruned):
    torch.manual_seed(0)
    probs = torch.tensor([0.7, 0.2, 0.05, 0.05])
    codes, lut = torch.multinomial(probs, 1024, replacement=True).view(1, -1), torch.randn(1, 4, 1)
    model = TiedLM(64, 16)
    palettized(model.embed, codes, lut, 2, mask=(codes != 0) if pruned else None)
    model.head.weight = model.embed.weight
    path = tmp_path / "tied.safetensors"
    save_palettized(model, path, codec="huffman")
    tensors, _ = read_safetensors(path)
    assert set(tensors) == {"embed.weight.huffman", "embed.weight.lut"}
    assert set(_layers(path)) == {"embed.weight"}
    loaded = load_palettized(path, TiedLM(64, 16))
    assert loaded.head.weight is loaded.embed.weight
    assert (loaded.head.weight.mask is not None) == pruned
    _assert_same_model(loaded, model, (torch.randint(0, 64, (2, 5)),))


def test_gpt2_conv1d_round_trips(tmp_path):
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

    def skeleton():
        return nn.Sequential(pytorch_utils.Conv1D(48, 16), nn.Linear(48, 4))

    torch.manual_seed(0)
    model = skeleton()
    for i, cfg in ((0, ClusterConfig(bits=3, dim=2, sparsity=0.6)), (1, ClusterConfig(bits=2))):
        clusterer = WeightClusterer(cfg)
        clusterer(model[i].weight.t() if i == 0 else model[i].weight)
        model[i] = palettize_module(model[i], clusterer)
    assert type(model[0]) is pytorch_utils.Conv1D and model[0].weight.spec.transposed
    path = tmp_path / "gpt.safetensors"
    save_palettized(model.eval(), path, codec="huffman")
    _assert_same_model(load_palettized(path, skeleton()).eval(), model, (torch.randn(2, 3, 16),))


def test_palettized_weight_round_trips(tmp_path):
    class Holder(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.w = weight

        def forward(self, x):
            return x @ self.w.t()

    torch.manual_seed(0)
    codes = torch.multinomial(torch.tensor([0.9, 0.05, 0.03, 0.02]), 400, replacement=True).view(1, -1)
    weight = PalettizedTensor.build(codes, torch.randn(1, 4, 1), PaletteSpec(2, 1, (20, 20)))
    model = Holder(nn.Parameter(weight, requires_grad=False))
    save_palettized(model, tmp_path / "w.safetensors", codec="huffman")
    skeleton = Holder(nn.Parameter(torch.zeros(20, 20)))
    assert _layers(tmp_path / "w.safetensors")["w"]["layout"] == "huffman"
    _assert_same_model(load_palettized(tmp_path / "w.safetensors", skeleton), model, (torch.randn(3, 20),))


def _skewed_linear(bits=4, out=256, inp=256):
    torch.manual_seed(0)
    probs = torch.tensor([0.5 ** i for i in range(1 << bits)])
    codes = torch.multinomial(probs, out * inp, replacement=True).view(1, -1)
    return nn.Sequential(palettized_linear(inp, out, codes, torch.randn(1, 1 << bits, 1), bits, torch.randn(out)))


def test_huffman_file_is_smaller_on_skewed_codes(tmp_path):
    model = _skewed_linear()
    raw = save_palettized(model, tmp_path / "raw.safetensors")
    coded = save_palettized(model, tmp_path / "huffman.safetensors", codec="huffman")
    assert coded < 0.6 * raw  # ~2 bits per code instead of 4
    report = size_report(model, file=tmp_path / "huffman.safetensors")
    assert report.file_bytes == coded
    header_len = int.from_bytes((tmp_path / "huffman.safetensors").read_bytes()[:8], "little")
    assert coded - 8 - header_len == report.entropy_total_bytes  # the data section, byte for byte
    text = report.to_markdown()
    assert "entropy-coded (B)" in text and "File huffman.safetensors" in text


def test_uniform_codes_stay_packed(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(palettized_linear(16, 8, torch.randint(0, 4, (1, 128)), torch.randn(1, 4, 1), 2))
    save_palettized(model, tmp_path / "m.safetensors", codec="huffman")
    tensors, _ = read_safetensors(tmp_path / "m.safetensors")
    assert "0.weight.codes" in tensors and "layout" not in _layers(tmp_path / "m.safetensors")["0.weight"]


def test_unknown_codec_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"codec='zip' is not one of \['raw', 'huffman'\]"):
        save_palettized(_skewed_linear(), tmp_path / "m.safetensors", codec="zip")


def _pruned_all_kinds():
    torch.manual_seed(3)
    return _prune(palettize(trained_bn(AllKinds()), CONFIGS["bits 1..8 mixed"]), 0.6)


@pytest.mark.parametrize("codec", ["raw", "huffman"])
def test_flipped_bytes_anywhere_are_refused(tmp_path, codec):
    path = tmp_path / "m.safetensors"
    save_palettized(_pruned_all_kinds(), path, codec=codec)
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    tensors, _ = read_safetensors(path)
    if codec == "huffman":
        assert any(name.endswith(".huffman") for name in tensors)
    positions = sorted({0, 3, 7, 8, 9, header_end // 2, header_end - 1, header_end, len(data) - 1}
                       | set(range(10, header_end, 97)) | set(range(header_end, len(data), 13)))
    for position in positions:
        corrupted = bytearray(data)
        corrupted[position] ^= 0xFF
        path.write_bytes(bytes(corrupted))
        with pytest.raises(ValueError, match="m.safetensors"):
            load_palettized(path, AllKinds())


@pytest.mark.parametrize("codec", ["raw", "huffman"])
def test_truncated_or_extended_files_are_refused(tmp_path, codec):
    path = tmp_path / "m.safetensors"
    save_palettized(_pruned_all_kinds(), path, codec=codec)
    data = path.read_bytes()
    for length in (0, 4, 8, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:length])
        with pytest.raises(ValueError, match="m.safetensors"):
            load_palettized(path, AllKinds())
    path.write_bytes(data + b"\0")
    with pytest.raises(ValueError, match="m.safetensors: corrupted file: not a valid safetensors file"):
        load_palettized(path, AllKinds())


def test_a_flipped_payload_byte_names_the_tensor(tmp_path):
    path = tmp_path / "m.safetensors"
    save_palettized(_pruned_all_kinds(), path, codec="huffman")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10  # the last byte of the data section (the last tensor in the file)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"m.safetensors: corrupted file: tensor '.*' fails its CRC32 check"):
        load_palettized(path, AllKinds())


def test_checksums_are_required(tmp_path):
    path = tmp_path / "m.safetensors"
    save_palettized(_skewed_linear(), path, codec="huffman")
    tensors, metadata = read_safetensors(path)
    del metadata["idkm_plugin.crc32"]
    write_safetensors(path, tensors, metadata)
    with pytest.raises(ValueError, match="checksums .* are missing"):
        load_palettized(path, nn.Sequential(nn.Linear(256, 256)))


def test_format_1_files_without_checksums_still_load(tmp_path):
    data = os.path.join(os.path.dirname(__file__), "data")
    tensors, metadata = read_safetensors(os.path.join(data, "legacy_v2_all_kinds.safetensors"))
    del metadata["idkm_plugin.crc32"], metadata["idkm_plugin.codec"]
    metadata["idkm_plugin.format"] = "idkm_plugin.palettized/1"
    path = tmp_path / "m.safetensors"
    write_safetensors(path, tensors, metadata)
    expected, _ = read_safetensors(os.path.join(data, "legacy_v2_expected.safetensors"))
    loaded = load_palettized(path, AllKinds()).eval()
    assert torch.equal(loaded(expected["ids"], expected["image"]), expected["all_kinds_out"])


def test_the_safetensors_library_reads_a_huffman_file(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "m.safetensors"
    save_palettized(_pruned_all_kinds(), path, codec="huffman")
    theirs = safetensors_torch.load_file(str(path))
    ours, _ = read_safetensors(path)
    assert set(theirs) == set(ours) and any(name.endswith(".huffman") for name in ours)
    assert all(torch.equal(theirs[name], ours[name]) for name in ours)


@pytest.mark.parametrize("bits", [1, 2, 7, 16])
@pytest.mark.parametrize("pruned", [False, True])
def test_every_bit_width_round_trips(tmp_path, bits, pruned):
    torch.manual_seed(bits)
    probs = torch.rand(1 << bits) ** 4  # skewed, so the Huffman layouts win
    codes = torch.multinomial(probs, 48 * 40, replacement=True).view(1, -1)
    mask = torch.rand(48 * 40) > 0.5 if pruned else None
    model = nn.Sequential(palettized_linear(40, 48, codes, torch.randn(1, 1 << bits, 1), bits, torch.randn(48),
                                            mask=mask))
    save_palettized(model, tmp_path / "m.safetensors", codec="huffman")
    loaded = load_palettized(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(40, 48)))
    _assert_same_model(loaded, model, (torch.randn(3, 40),))


@contextlib.contextmanager
def _torch_path():
    """Save / load as if the native Huffman ops were not built."""
    with mock.patch.object(native, "has_op", lambda name: False):
        yield


@pytest.mark.skipif(not native.has_op("huffman_decode"), reason="idkm_plugin._C is not built")
@pytest.mark.parametrize("model_fn", [_skewed_linear, _pruned_all_kinds], ids=["skewed_linear", "pruned_all_kinds"])
def test_native_and_torch_paths_write_and_read_the_same_files(tmp_path, model_fn):
    model = model_fn().eval()
    skeleton = (lambda: nn.Sequential(nn.Linear(256, 256))) if model_fn is _skewed_linear else AllKinds
    inputs = (torch.randn(2, 256),) if model_fn is _skewed_linear else model.example_inputs()
    save_palettized(model, tmp_path / "native.safetensors", codec="huffman")
    with _torch_path():
        save_palettized(model, tmp_path / "torch.safetensors", codec="huffman")
        old = load_palettized(tmp_path / "native.safetensors", skeleton()).eval()
    (mine, my_meta), (theirs, their_meta) = (read_safetensors(tmp_path / f"{name}.safetensors")
                                              for name in ("native", "torch"))
    assert my_meta == their_meta and set(mine) == set(theirs)  # the same tensors, byte for byte
    assert all(mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine)
    assert any(meta.get("layout", "packed") != "packed" for meta in _layers(tmp_path / "native.safetensors").values())
    new = load_palettized(tmp_path / "torch.safetensors", skeleton()).eval()
    _assert_same_model(new, model, inputs)
    _assert_same_model(old, model, inputs)


@pytest.mark.parametrize("layout", ["huffman", "huffman_reserved", "huffman_sparse"])
def test_decode_packed_codes_is_pack_codes_of_decode_codes(layout):
    torch.manual_seed(0)
    bits, count = 3, 5 * 4096 + 13
    codes = torch.multinomial(torch.tensor([0.6 ** i for i in range(1 << bits)]), count, replacement=True)
    mask = None
    if layout != "huffman":
        mask = torch.rand(count) > (0.3 if layout == "huffman_reserved" else 0.95)
        codes = torch.where(mask, codes, torch.zeros_like(codes))
    encoded = encode_codes(codes, mask, bits)
    assert encoded.layout == layout
    packed, packed_mask = decode_packed_codes(layout, encoded.blob, count, bits, encoded.index_bits)
    assert torch.equal(packed, pack_codes(codes, bits))
    assert (mask is None and packed_mask is None) or torch.equal(packed_mask, pack_codes(mask, 1))
    with pytest.raises(ValueError, match="its streams end at byte"):
        decode_packed_codes(layout, torch.cat([encoded.blob, torch.zeros(1, dtype=torch.uint8)]), count, bits,
                            encoded.index_bits)
