"""PatchGAN discriminator against the same network built from torch.nn layers, and the GAN losses."""
import flax.linen as nn
import jax
import numpy as np
import torch

from tokenflow_jax import prng
from tokenflow_jax.models import discriminator as disc

TOL = 1e-4  # relative, float32 through five convolutions and three BatchNorms


def torch_patchgan(ndf=64, n_layers=3):
    layers = [torch.nn.Conv2d(3, ndf, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
    mult = 1
    for i in range(1, n_layers + 1):
        prev, mult = mult, min(2**i, 8)
        layers += [torch.nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if i < n_layers else 1, 1, bias=False),
                   torch.nn.BatchNorm2d(ndf * mult), torch.nn.LeakyReLU(0.2)]
    layers += [torch.nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    return torch.nn.Sequential(*layers)


def copy_into_torch(variables, net):
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in net if isinstance(m, torch.nn.BatchNorm2d)]
    p, stats = variables["params"], variables["batch_stats"]
    with torch.no_grad():
        for i, c in enumerate(convs):
            c.weight.copy_(torch.from_numpy(np.asarray(p[f"conv_{i}"]["kernel"]).transpose(3, 2, 0, 1).copy()))
            if c.bias is not None:
                c.bias.copy_(torch.from_numpy(np.asarray(p[f"conv_{i}"]["bias"])))
        for i, bn in enumerate(norms, start=1):
            bn.weight.copy_(torch.from_numpy(np.asarray(p[f"norm_{i}"]["scale"])))
            bn.bias.copy_(torch.from_numpy(np.asarray(p[f"norm_{i}"]["bias"])))
            bn.running_mean.copy_(torch.from_numpy(np.asarray(stats[f"norm_{i}"]["mean"])))
            bn.running_var.copy_(torch.from_numpy(np.asarray(stats[f"norm_{i}"]["var"])))


def test_matches_torch_in_train_and_eval_mode(rng):
    model = disc.PatchDiscriminator()
    x = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    variables = nn.unbox(model.init(prng.make_key(0), x, train=False))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"])) == 2_765_633
    net = torch_patchgan()
    copy_into_torch(variables, net)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)

    logits, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    net.train()
    with torch.no_grad():
        ref = net(xt).permute(0, 2, 3, 1).numpy()
    assert logits.shape == (2, 6, 6, 1)
    assert np.abs(np.asarray(logits) - ref).max() <= TOL * np.abs(ref).max()
    # Running statistics follow PyTorch's momentum-0.1 update (unbiased batch variance).
    bn = [m for m in net if isinstance(m, torch.nn.BatchNorm2d)][0]
    np.testing.assert_allclose(np.asarray(state["batch_stats"]["norm_1"]["mean"]), bn.running_mean.numpy(),
                               rtol=1e-4, atol=1e-6)

    net.eval()
    copy_into_torch({**variables, "batch_stats": state["batch_stats"]}, net)
    eval_logits = model.apply({**variables, "batch_stats": state["batch_stats"]}, x, train=False)
    with torch.no_grad():
        ref = net(xt).permute(0, 2, 3, 1).numpy()
    assert np.abs(np.asarray(eval_logits) - ref).max() <= TOL * np.abs(ref).max()


def test_gan_losses():
    real = np.array([[2.0, 0.5], [-1.0, 0.0]], np.float32)
    fake = np.array([[-2.0, 0.5], [1.0, -0.5]], np.float32)
    expected = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    np.testing.assert_allclose(float(disc.hinge_d_loss(real, fake)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(disc.generator_adversarial_loss(fake)), -fake.mean(), rtol=1e-6)
    soft = lambda v: np.log1p(np.exp(v))  # noqa: E731
    np.testing.assert_allclose(float(disc.vanilla_d_loss(real, fake)),
                               0.5 * (soft(-real).mean() + soft(fake).mean()), rtol=1e-5)
