"""FrequencySplitEmbedding: the same function as the embedding it splits, two tables that every flow clusters
with their own bits, converted == eval QAT, and exact file round trips."""
import pytest
import torch
from torch import nn

from idkm_plugin import ClusterConfig, ModelConfig
from idkm_plugin.export import load_palettized, save_palettized, size_report
from idkm_plugin.nn import PalettizedTensor
from idkm_plugin.split_embedding import FrequencySplitEmbedding, split_embedding


class Encoder(nn.Module):
    """ids [b, s] -> [b, s, 4]: an embedding (row 0 = padding) and a Linear."""

    def __init__(self, vocab: int = 40, dim: int = 8) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, 4)

    def forward(self, ids):
        return self.head(self.tokens(ids))


def _counts(vocab: int = 40) -> torch.Tensor:
    return torch.randint(0, 50, (vocab,), generator=torch.Generator().manual_seed(1))


def test_split_computes_the_original_embedding_exactly_and_keeps_the_most_counted_rows():
    torch.manual_seed(0)
    model = Encoder()
    original = model.tokens.weight.detach().clone()
    counts = _counts()
    split = split_embedding(model, "tokens", counts, 10)
    assert model.tokens is split and isinstance(split, FrequencySplitEmbedding)
    ids = torch.randint(0, 40, (3, 11))
    assert torch.equal(split(ids), original[ids])
    assert torch.equal(split.to_embedding().weight, original)
    top = torch.sort(-counts.double(), stable=True).indices[:10]
    assert torch.equal(split.frequent_ids.long(), top.sort().values)
    assert torch.equal(split.frequent.weight, original[top.sort().values])
    assert split.frequent_ids.dtype == torch.int16  # 2 bytes per frequent token
    assert split.frequent.num_embeddings + split.rare.num_embeddings == 40


def test_gradients_reach_the_same_rows_and_the_padding_row_gets_none():
    torch.manual_seed(0)
    model = Encoder()
    reference = Encoder()
    reference.load_state_dict(model.state_dict())
    split = split_embedding(model, "tokens", _counts(), 10)
    ids = torch.tensor([[0, 3, 7, 39, 3], [12, 0, 25, 8, 8]])
    model(ids).square().sum().backward()
    reference(ids).square().sum().backward()
    assert torch.allclose(split.to_embedding().weight.detach(), reference.tokens.weight.detach())
    hit, index = split._split_index(torch.arange(40))
    grad = torch.where(hit[:, None], split.frequent.weight.grad[index.clamp(max=9)],
                       split.rare.weight.grad[index.clamp(max=29)])
    assert torch.allclose(grad, reference.tokens.weight.grad, atol=1e-6)
    assert not grad[0].any()  # padding_idx 0 kept in whichever table holds it


@pytest.mark.parametrize("flow", ["torchao", "eager"])
def test_each_table_gets_its_own_bits_and_converted_equals_eval_qat(tmp_path, flow):
    """The frequent rows at 3 bits, the rest as 4 centroids of 2-vectors; the file round trips exactly."""
    torch.manual_seed(0)
    model = Encoder()
    split_embedding(model, "tokens", _counts(), 10)
    mc = ModelConfig(default=ClusterConfig(bits=4, max_iter=5),
                     by_name={"tokens.frequent": ClusterConfig(bits=3, max_iter=5),
                              "tokens.rare": ClusterConfig(bits=2, dim=2, max_iter=5)})
    ids = torch.randint(0, 40, (4, 9))
    if flow == "torchao":
        pytest.importorskip("torchao")
        from torchao.quantization import quantize_

        from idkm_plugin.integrations.torchao import IDKMQATConfig, clusterable, fqn_to_config

        quantize_(model, fqn_to_config(mc, model), filter_fn=None)
        model(ids).sum().backward()
        expected = model.eval()(ids)
        quantize_(model, IDKMQATConfig(step="convert"), filter_fn=clusterable)
    else:
        tq = pytest.importorskip("torch.ao.quantization")
        from idkm_plugin.integrations.torch_ao import assign_qconfigs, palettize_mapping, qat_module_mapping

        model = tq.prepare_qat(assign_qconfigs(model, mc, mapping=qat_module_mapping()).train(),
                               mapping=qat_module_mapping())
        model(ids).sum().backward()
        expected = model.eval()(ids)
        model = tq.convert(model, mapping=palettize_mapping())
    frequent, rare = model.tokens.frequent, model.tokens.rare
    assert type(frequent) is nn.Embedding and type(rare) is nn.Embedding
    assert isinstance(frequent.weight, PalettizedTensor) and isinstance(rare.weight, PalettizedTensor)
    assert (frequent.weight.bits, rare.weight.bits, rare.weight.lut.shape[-1]) == (3, 2, 2)
    assert torch.equal(model(ids), expected)
    report = size_report(model)
    assert {layer.name for layer in report.layers} >= {"tokens.frequent", "tokens.rare"}
    for codec in ("raw", "huffman"):
        path = tmp_path / f"split_{codec}.safetensors"
        save_palettized(model, str(path), codec=codec)
        skeleton = Encoder()  # float, split the same way
        split_embedding(skeleton, "tokens", _counts(), 10)
        assert torch.equal(load_palettized(str(path), skeleton)(ids), expected)


def test_bad_input_is_refused_with_the_layer_and_the_allowed_values():
    model = Encoder()
    with pytest.raises(ValueError, match=r"'tokens': n_frequent=40; allowed 1..39"):
        split_embedding(model, "tokens", _counts(), 40)
    with pytest.raises(ValueError, match=r"'tokens' has 40 rows but token_counts has 39 entries"):
        split_embedding(model, "tokens", _counts(39), 5)
    with pytest.raises(TypeError, match=r"'head' is Linear, not nn.Embedding"):
        split_embedding(model, "head", _counts(), 5)
    with pytest.raises(ValueError, match="repeated ids"):
        FrequencySplitEmbedding(torch.tensor([1, 1, 2]), 40, 8)
    with pytest.raises(ValueError, match=r"1..39 distinct ids in \[0, 40\); got 2 in \[3, 40\]"):
        FrequencySplitEmbedding(torch.tensor([3, 40]), 40, 8)
    with pytest.raises(ValueError, match=r"got 0$"):
        FrequencySplitEmbedding(torch.tensor([], dtype=torch.long), 40, 8)


def test_a_tied_embedding_is_refused():
    model = nn.Sequential(nn.Embedding(40, 8), nn.Linear(8, 40, bias=False))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match=r"'0' shares its weight with 1.weight \(tied\)"):
        split_embedding(model, "0", _counts(), 5)


def test_the_converted_split_runs_under_executorch(tmp_path):
    """searchsorted + two packed tables export, and the .pte computes what the converted model does."""
    runtime = pytest.importorskip("executorch.runtime", reason="ExecuTorch is not installed (extra: executorch)")
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    from idkm_plugin.export import to_executorch
    from idkm_plugin.integrations.torchao import IDKMQATConfig, clusterable, fqn_to_config

    torch.manual_seed(0)
    model = Encoder()
    split_embedding(model, "tokens", _counts(), 10)
    quantize_(model, fqn_to_config(ModelConfig(default=ClusterConfig(bits=3, max_iter=5)), model), filter_fn=None)
    quantize_(model.eval(), IDKMQATConfig(step="convert"), filter_fn=clusterable)
    ids = torch.randint(0, 40, (2, 9))
    to_executorch(model, (ids,), tmp_path / "split.pte")
    method = runtime.Runtime.get().load_program(str(tmp_path / "split.pte")).load_method("forward")
    with torch.no_grad():
        assert torch.allclose(method.execute([ids])[0], model(ids), atol=1e-6)
