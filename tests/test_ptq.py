"""Post-training palettization (idkm_plugin.ptq) and weighted k-means (idkm_plugin.core.weighted_kmeans)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from idkm_plugin import ClusterConfig, ModelConfig, ptq
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.core.weighted_kmeans import assign, weighted_error, weighted_kmeans, weighted_quantile_init


# ---- weighted k-means against a dense reference ----------------------------------------------------------------
def dense_lloyd(x, w, c, iters):
    """One group at a time, every distance materialised, explicit loops over clusters: the reference."""
    out = []
    for xg, wg, cg in zip(x, w, c):
        cg = cg.clone()
        for _ in range(iters):
            codes = torch.cdist(xg, cg).argmin(1)
            for j in range(cg.shape[0]):
                sel = codes == j
                if float(wg[sel].sum()) > 0:
                    cg[j] = (wg[sel, None] * xg[sel]).sum(0) / wg[sel].sum()
        out.append(cg)
    return torch.stack(out)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_weighted_kmeans_matches_the_dense_reference(d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(5, 300, d, dtype=torch.float64, generator=g)
    w = torch.rand(5, 300, dtype=torch.float64, generator=g)
    init = x[:, :8].clone()
    got, expected = weighted_kmeans(x, w, init, iters=15), dense_lloyd(x, w, init, 15)
    if d == 1:  # scalars come back sorted
        expected = expected.sort(dim=1).values
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_zero_weight_excludes_a_point():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200, 1, dtype=torch.float64, generator=g)
    w = torch.rand(3, 200, dtype=torch.float64, generator=g)
    x_out = x.clone()
    x_out[:, :20] = 1e3  # far outliers with zero weight: the centroids must not move towards them
    w_out = w.clone()
    w_out[:, :20] = 0
    init = weighted_quantile_init(x[:, 20:], w[:, 20:], 4)
    with_outliers = weighted_kmeans(x_out, w_out, init, iters=30)
    without = weighted_kmeans(x[:, 20:], w[:, 20:], init, iters=30)
    # the outliers claim the largest centroid's cluster but contribute no mass: the same fit
    torch.testing.assert_close(with_outliers, without)


def test_equal_weights_are_plain_kmeans():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 256, 2, generator=g)
    init = x[:, :16].clone()
    ones = weighted_kmeans(x, torch.ones(4, 256), init, iters=20)
    fours = weighted_kmeans(x, torch.full((4, 256), 4.0), init, iters=20)  # a power of 2: exact
    assert torch.equal(ones, fours)
    torch.testing.assert_close(ones, dense_lloyd(x, torch.ones(4, 256), init, 20))


def test_scalar_assignment_is_the_nearest_centroid():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 500, 1, generator=g)
    c = torch.randn(6, 16, 1, generator=g)
    codes = assign(x, c)
    dist = (x - c.transpose(1, 2)).abs()  # [g, m, k]
    assert torch.equal(dist.gather(2, codes.unsqueeze(-1)), dist.min(2, keepdim=True).values)


def test_weighted_quantile_init_splits_the_mass_evenly():
    x = torch.arange(1000, dtype=torch.float64).view(1, -1, 1)
    w = torch.ones(1, 1000, dtype=torch.float64)
    w[0, 500:] = 3  # three quarters of the mass in the upper half
    c = weighted_quantile_init(x, w, 4)[0, :, 0]
    # the first points whose cumulative mass reaches 1/8, 3/8, 5/8, 7/8 of 2,000: 250, 750, 1250, 1750
    assert c.tolist() == [249.0, 583.0, 749.0, 916.0]


def test_weighted_kmeans_rejects_bad_shapes_and_negative_weights():
    x = torch.randn(2, 10, 1)
    with pytest.raises(ValueError, match="weights"):
        weighted_kmeans(x, torch.ones(2, 9), x[:, :2])
    with pytest.raises(ValueError, match=">= 0"):
        weighted_kmeans(x, -torch.ones(2, 10), x[:, :2])


# ---- Fisher-weighted PTQ ----------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self, vocab=64, hidden=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.fc = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.fc(self.embed(ids))))


def loss_fn(model, ids):
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 16), generator=g) for _ in range(n)]


def test_fisher_is_the_summed_squared_gradient_and_counts_a_tie_once():
    torch.manual_seed(0)
    model = Tiny()
    data = batches()
    fisher = ptq.fisher_information(model, data, loss_fn)
    assert set(fisher) == {"embed.weight", "fc.weight"}  # the tied head is the embedding's Parameter
    expected = torch.zeros_like(model.fc.weight)
    for ids in data:
        grad, = torch.autograd.grad(loss_fn(model, ids), model.fc.weight)
        expected += grad.square()
    torch.testing.assert_close(fisher["fc.weight"], expected)
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was


@pytest.mark.parametrize("skewed", [False, True])
def test_fisher_weighting_lowers_the_fisher_weighted_error(skewed):
    torch.manual_seed(0)
    model = Tiny()
    fisher = ptq.fisher_information(model, batches(), loss_fn)["fc.weight"]
    if skewed:  # sensitivities spread over orders of magnitude, as an LLM's are
        fisher = torch.exp(3 * torch.randn(fisher.shape, generator=torch.Generator().manual_seed(3)))
    cfg = ClusterConfig(bits=2, granularity="per_grouped_channel", group_size=8)
    x = model.fc.weight.detach().reshape(4, -1, 1).double()
    errors = {}
    for name, f in (("plain", None), ("fisher", fisher)):
        c = ptq.cluster_weight(WeightClusterer(cfg).eval(), model.fc.weight, f, iters=50)
        errors[name] = float(weighted_error(x, fisher.reshape(4, -1).double(), c.centroids.double()).sum())
    assert errors["fisher"] < (0.97 if skewed else 1.0) * errors["plain"]


def test_weighted_qat_keeps_the_sensitivity_weighted_lut():
    """A training step's soft k-means, weighted by the Fisher information (init_luts' default), stays near the
    sensitivity PTQ LUT; unweighted, it drifts to plain k-means' Fisher-weighted error."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(16, 64))
    fisher = torch.exp(3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)))
    cfg = ClusterConfig(method="idkm_jfb", bits=2, per_channel_scale="max_abs", tau=2e-3)
    x = (weight / weight.detach().abs().amax(1, keepdim=True)).detach().reshape(1, -1, 1).double()
    f = (fisher * weight.detach().abs().amax(1, keepdim=True).square()).reshape(1, -1).double()

    def error(clusterer):
        return float(weighted_error(x, f, clusterer.centroids.double()).sum())

    ptq_error = error(ptq.cluster_weight(WeightClusterer(cfg), weight, fisher))
    errors = {}
    for weighted in (False, True):
        clusterer = ptq.cluster_weight(WeightClusterer(cfg), weight, fisher)
        clusterer.set_importance(fisher if weighted else None)
        clusterer.train()(weight).sum().backward()  # one training forward: the LUT moves to the soft fixed point
        errors[weighted] = error(clusterer)
    assert errors[True] < 1.05 * ptq_error
    assert errors[False] > 1.5 * ptq_error


def test_importance_is_refused_with_pruning_or_dkm():
    w = torch.ones(4, 4)
    for cfg in (ClusterConfig(method="dkm"), ClusterConfig(sparsity=0.5)):
        with pytest.raises(ValueError, match="importance is not allowed"):
            WeightClusterer(cfg, name="fc.weight").set_importance(w)
    with pytest.raises(ValueError, match=">= 0"):
        WeightClusterer(ClusterConfig()).set_importance(-w)


# ---- PTQ-converted == the flows' eval mode from the same LUTs ---------------------------------------------------
def test_ptq_converted_equals_torchao_eval_qat_from_init_luts():
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    from idkm_plugin.integrations.torchao import fqn_to_config

    torch.manual_seed(0)
    model = Tiny()
    mc = ModelConfig.llm(bits=3)
    fisher = ptq.fisher_information(model, batches(), loss_fn)
    deployed = ptq.palettize(model, mc, fisher=fisher)
    qat = copy.deepcopy(model)
    quantize_(qat, fqn_to_config(mc, qat), filter_fn=None)
    ptq.init_luts(qat, fisher=fisher)
    ids = batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(deployed(ids), qat.eval()(ids))
    # the tied weight: one LUT for both layers
    assert torch.equal(qat.embed.weight_clusterer.centroids, qat.lm_head.weight_clusterer.centroids)


def test_ptq_converted_equals_the_clusterer_eval_weight_with_scales_and_pruning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16))
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-3, 0, 16).unsqueeze(1))
    cfg = ClusterConfig(bits=3, per_channel_scale="max_abs", scale_dtype="float16", lut_dtype="float16",
                        granularity="per_grouped_channel", group_size=4, sparsity=0.25)
    deployed = ptq.palettize(model, ModelConfig(default=cfg))
    clusterer = ptq.cluster_weight(WeightClusterer(cfg).eval(), model[0].weight)
    expected = clusterer(model[0].weight)
    assert float((expected == 0).float().mean()) >= 0.25
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(deployed(x), F.linear(x, expected, model[0].bias))


def test_ptq_with_per_channel_scales_clusters_the_normalised_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16))
    with torch.no_grad():  # output channels whose scales differ by three orders of magnitude
        model[0].weight.mul_(torch.logspace(-3, 0, 16).unsqueeze(1))
    clusterer = ptq.cluster_weight(WeightClusterer(ClusterConfig(bits=4, per_channel_scale="max_abs")).eval(),
                                   model[0].weight)
    assert clusterer.centroids.abs().max() <= 1.0 + 1e-6  # centroids live in the normalised [-1, 1] space
    w = model[0].weight.detach()
    w_hat = clusterer(w)
    per_channel_error = (w - w_hat).norm(dim=1) / w.norm(dim=1)
    assert per_channel_error.max() < 0.08  # k-means on the raw weight leaves 0.10


def test_init_luts_rejects_fisher_of_another_model():
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    from idkm_plugin.integrations.torchao import fqn_to_config

    model = Tiny()
    qat = copy.deepcopy(model)
    quantize_(qat, fqn_to_config(ModelConfig(default=ClusterConfig(bits=2)), qat), filter_fn=None)
    with pytest.raises(ValueError, match="no Fisher information for parameter 'embed.weight'"):
        ptq.init_luts(qat, fisher={"other.weight": torch.zeros(1)})


# ---- the recipe ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 9, 4.0, "4"])
def test_llm_recipe_rejects_bits_outside_2_to_8(bits):
    with pytest.raises(ValueError, match=r"ModelConfig.llm\(bits="):
        ModelConfig.llm(bits)


@pytest.mark.parametrize("bits", range(2, 9))
def test_llm_recipe_stays_within_a_quarter_bit_on_smollm2(bits):
    mc = ModelConfig.llm(bits)
    decoder = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    embedding = (49152, 576)  # tied with lm_head: stored and counted once
    weights = 30 * sum(o * i for o, i in decoder) + embedding[0] * embedding[1]
    nbytes = 30 * sum(mc.default.palettized_nbytes(s) for s in decoder)
    nbytes += mc.by_type["Embedding"].palettized_nbytes(embedding)
    assert bits + 0.2 < 8 * nbytes / weights <= bits + 0.25


def test_llm_recipe_resolves_the_tied_embedding_and_head_to_one_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    mc = ModelConfig.llm(4)
    head, embed = mc.resolve("lm_head", model.lm_head), mc.resolve("model.embed_tokens", model.model.embed_tokens)
    assert head == embed and head.bits == 4 and head.per_channel_scale and head.scale_block_size == 32
    down = mc.resolve("model.layers.0.mlp.down_proj", model.model.layers[0].mlp.down_proj)
    assert down.bits == 4 and down.scale_block_size == 128
    deployed = ptq.palettize(model, mc, iters=5)
    assert deployed.lm_head.weight is deployed.model.embed_tokens.weight  # still one (palettized) Parameter


def test_with_overrides_sets_every_entry_and_names_unknown_fields():
    mc = ModelConfig(default=ClusterConfig(bits=4), by_name={"a": ClusterConfig(bits=2), "b": None},
                     by_type={"Linear": ClusterConfig(bits=3)}, small_layer=ClusterConfig(bits=8))
    out = mc.with_overrides(method="dkm", uniquify="off")
    assert [c.method.value for c in (out.default, out.by_name["a"], out.by_type["Linear"], out.small_layer)] == ["dkm"] * 4
    assert out.by_name["b"] is None and out.by_name["a"].bits == 2
    with pytest.raises(ValueError, match="unknown ClusterConfig field"):
        mc.with_overrides(bitz=3)
