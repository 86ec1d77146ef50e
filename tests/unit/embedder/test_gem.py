import torch

from services.embedder.gem import GeM, gem, l2n


def test_gem_p1_is_average_pooling():
    x = torch.rand(2, 5, 4, 3)
    assert torch.allclose(gem(x, p=1.0), x.mean(dim=(2, 3)), atol=1e-5)


def test_gem_large_p_approaches_max_pooling():
    x = torch.rand(2, 5, 4, 3) + 0.1
    assert torch.allclose(gem(x, p=200.0), x.amax(dim=(2, 3)), rtol=0.02)


def test_gem_is_between_mean_and_max():
    x = torch.rand(3, 8, 7, 7)
    g = gem(x, p=3.0)
    assert (g >= x.mean(dim=(2, 3)) - 1e-5).all() and (g <= x.amax(dim=(2, 3)) + 1e-5).all()


def test_gem_module_has_a_learnable_p():
    pool = GeM(p=3.0)
    x = torch.rand(2, 4, 5, 5, requires_grad=True)
    pool(x).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.abs().item() > 0
    assert not GeM(p=3.0, learn_p=False).p.requires_grad


def test_l2n_gives_unit_rows():
    v = l2n(torch.randn(6, 10) * 5)
    assert torch.allclose(v.norm(dim=1), torch.ones(6), atol=1e-5)
