import pytest
import torch

from idkm_plugin.core import from_vectors, init_centroids, to_vectors, vector_shape

INITS = ["kmeans++", "linear", "density", "random"]


@pytest.mark.parametrize("method", INITS)
def test_inits_are_seeded_deterministic_and_shaped(method):
    x = torch.randn(3, 500, 2)
    a, b = init_centroids(x, 8, method, seed=7), init_centroids(x, 8, method, seed=7)
    assert a.shape == (3, 8, 2) and torch.equal(a, b)
    assert torch.unique(a[0], dim=0).shape[0] == 8  # distinct centroids on continuous data


def test_random_and_kmeanspp_pick_existing_vectors_and_seed_matters():
    x = torch.randn(1, 500, 1)
    for method in ["random", "kmeans++"]:
        c = init_centroids(x, 4, method, seed=1)
        assert all(bool((x[0] == v).all(-1).any()) for v in c[0])
        assert not torch.equal(c, init_centroids(x, 4, method, seed=2))


def test_linear_and_density_follow_deep_compression():
    x = torch.arange(101.0).view(1, 101, 1)
    assert init_centroids(x, 5, "linear").flatten().tolist() == [0, 25, 50, 75, 100]
    torch.testing.assert_close(init_centroids(x, 2, "density").flatten(), torch.tensor([25.0, 75.0]))


def test_init_with_fewer_vectors_than_k():
    x = torch.randn(1, 3, 1)
    for method in INITS:
        assert torch.isfinite(init_centroids(x, 8, method)).all()


@pytest.mark.parametrize("shape,dim,group_size,expected", [
    ((10, 6), 2, 0, (1, 30, 2)),
    ((8, 4, 3, 3), 4, 0, (1, 72, 4)),  # flattened across kernel and channel boundaries
    ((8, 4, 3, 3), 1, 2, (4, 72, 1)),
    ((100, 16), 4, 25, (4, 100, 4)),
])
def test_vector_shapes_and_round_trip(shape, dim, group_size, expected):
    w = torch.randn(shape)
    v = to_vectors(w, dim, group_size)
    assert v.shape == expected and torch.equal(from_vectors(v, w.shape), w)


def test_vector_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"fc1.weight: cluster dim=4 does not divide the 30 weights"):
        vector_shape((10, 3), 4, name="fc1.weight")
    with pytest.raises(ValueError, match=r"group_size=3 does not divide the 10 output channels"):
        vector_shape((10, 3), 1, 3)
