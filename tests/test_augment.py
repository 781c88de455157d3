"""Training augmentation and the learning-rate schedule: determinism, mask/image agreement, and that
``augment: none`` trains exactly as the plain loop does."""

import math

import pytest
import torch
import torch.nn.functional as F

from _tiny import tiny_config
from iopfl.data.augment import AugmentSettings, affine_matrices, augment_batch, gaussian_blur, warp
from iopfl.engine.tracking import training_lr
from iopfl.fl.training import LocalTrainer, TrainSettings, iterate_batches, round_lr
from iopfl.models.losses import segmentation_loss
from iopfl.models.unet import UNet
from iopfl.runtime import Runtime
from iopfl.seeding import derive_generator


def _blobs(n: int = 4, size: int = 48, channels: int = 3) -> torch.Tensor:
    """Smooth images ``[n, C, size, size]``: a few Gaussian blobs per sample, the same in every channel."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.zeros(n, size, size)
    for i in range(n):
        for _ in range(3):
            cy, cx = torch.rand(2, generator=g) * size
            out[i] += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 6) ** 2))
    return out[:, None].repeat(1, channels, 1, 1)


def test_same_generator_seed_same_batch_other_seed_other_batch():
    images = _blobs()
    masks = (images[:, 0] > 0.5).long()
    settings = AugmentSettings(colour=True)
    a = augment_batch(images, masks, settings, derive_generator(3, "aug"))
    b = augment_batch(images, masks, settings, derive_generator(3, "aug"))
    c = augment_batch(images, masks, settings, derive_generator(4, "aug"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == images.shape and a[1].shape == masks.shape and a[1].dtype == masks.dtype


def test_mask_follows_the_image_through_the_transform():
    """For a mask that is a threshold of the image, the warped mask is the threshold of the warped image
    (≥ 99 % of pixels, every sample), and where they differ it is on the object's boundary (nearest vs
    bilinear sampling)."""
    images = _blobs(n=8, size=128)
    masks = (images[:, 0] > 0.6).long()
    settings = AugmentSettings(scale=0.3, rotate=30.0, intensity=0.0)
    out_images, out_masks = augment_batch(images, masks, settings, derive_generator(0, "aug"))
    expected = (out_images[:, :1] > 0.6).float()
    boundary = (F.max_pool2d(expected, 3, 1, 1) != -F.max_pool2d(-expected, 3, 1, 1))[:, 0]
    differ = expected[:, 0].long() != out_masks
    assert ((~differ).float().mean(dim=(1, 2)) >= 0.99).all()
    assert not (differ & ~boundary).any()
    assert not torch.equal(out_masks, masks)  # something did move
    assert out_masks.sum() > 0.5 * masks.sum()


def test_every_channel_gets_the_same_geometry():
    """2.5D inputs stack neighbouring slices as channels: they must stay aligned."""
    images = _blobs(n=5, channels=3)
    masks = torch.zeros(5, 48, 48, dtype=torch.long)
    theta = affine_matrices(5, 48, 48, AugmentSettings(), derive_generator(1, "aug"), images.device)
    out, _ = warp(images, masks, theta)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_a_pure_quarter_turn_moves_pixels_exactly():
    """With no zoom, rotation or shift drawn, the matrix is a flip/quarter turn: nearest sampling of the
    mask equals ``torch.rot90``/``flip`` of it for one of the 8 symmetries."""
    masks = torch.randint(0, 3, (6, 16, 16))
    theta = affine_matrices(6, 16, 16, AugmentSettings(scale=0.0, rotate=0.0), derive_generator(2, "aug"), masks.device)
    theta[:, :, 2] = 0  # drop the shift
    _, out = warp(torch.zeros(6, 1, 16, 16), masks, theta)
    for m, o in zip(masks, out, strict=True):
        symmetries = [torch.rot90(f, k, dims=(0, 1)) for f in (m, m.flip(1)) for k in range(4)]
        assert any(torch.equal(o, s) for s in symmetries)


def test_blur_matches_a_naive_convolution():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 2, 12, 12, generator=g)
    sigma = torch.tensor([0.0, 0.7, 1.5])
    ours = gaussian_blur(images, sigma, radius=4)
    assert torch.equal(ours[0], images[0])  # σ = 0 leaves the sample alone
    for i in (1, 2):
        x = torch.arange(-4, 5, dtype=torch.float32)
        k = torch.exp(-(x**2) / (2 * sigma[i] ** 2))
        k2d = torch.outer(k, k) / k.sum() ** 2
        padded = F.pad(images[i : i + 1], (4, 4, 4, 4), mode="replicate")
        naive = F.conv2d(padded.transpose(0, 1), k2d[None, None]).transpose(0, 1)
        torch.testing.assert_close(ours[i : i + 1], naive, rtol=1e-5, atol=1e-5)


def test_round_lr_matches_hand_computation():
    s = TrainSettings(lr=1e-3, lr_min=1e-4, lr_schedule="cosine", rounds=5)
    # lr_min + (lr − lr_min)·(1 + cos(π·(t−1)/4))/2 for t = 1..5
    hand = [1e-3, 1e-4 + 9e-4 * (1 + math.sqrt(0.5)) / 2, 5.5e-4, 1e-4 + 9e-4 * (1 - math.sqrt(0.5)) / 2, 1e-4]
    assert [round_lr(s, t) for t in range(1, 6)] == pytest.approx(hand, rel=1e-12)
    assert round_lr(TrainSettings(lr=2e-3, lr_schedule="cosine", rounds=1), 1) == 2e-3
    assert round_lr(TrainSettings(lr=2e-3, lr_min=1e-5, rounds=9), 7) == 2e-3  # constant


def test_the_logged_lr_is_the_one_sites_train_with(tmp_path):
    # the server logs the rate from the config alone; the sites train with their TrainSettings
    cfg = tiny_config(tmp_path, ["fl.rounds=7", "train.lr_schedule=cosine", "train.lr_min=1e-5"])
    settings = cfg.train_settings(Runtime.resolve(cfg.runtime))
    assert [training_lr(cfg, t) for t in range(1, 8)] == [round_lr(settings, t) for t in range(1, 8)]
    assert training_lr(cfg, 1) == cfg.train.lr and training_lr(cfg, 7) == 1e-5


def _plain_loop(build, start, images, masks, settings, generator):
    """The local loop as it was before augmentation and schedules existed."""
    model = build()
    model.load_state_dict(start)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, amsgrad=settings.amsgrad, fused=True)
    for idx in iterate_batches(len(images), settings.batch_size, generator):
        loss = segmentation_loss(model(images[idx]).float(), masks[idx], settings.ce_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.state_dict()


def test_augment_none_trains_exactly_as_the_plain_loop():
    build = lambda: UNet(3, 2, 4, 2)  # noqa: E731
    torch.manual_seed(0)
    images, masks = torch.randn(6, 3, 16, 16), torch.randint(0, 2, (6, 16, 16))
    start = {k: v.clone() for k, v in build().state_dict().items()}
    settings = TrainSettings(batch_size=4, lr=1e-2)
    trainer = LocalTrainer(build, images, masks, settings)
    trainer.set_round(3)
    gen_ours, gen_plain = derive_generator(5, "x"), derive_generator(5, "x")
    ours = trainer.train(start, gen_ours).weights
    plain = _plain_loop(build, start, images, masks, settings, gen_plain)
    assert all(torch.equal(ours[k], plain[k]) for k in plain)
    assert torch.equal(gen_ours.get_state(), gen_plain.get_state())  # no extra draws


def test_augmented_training_differs_and_is_reproducible():
    build = lambda: UNet(3, 2, 4, 2)  # noqa: E731
    torch.manual_seed(0)
    images, masks = torch.randn(6, 3, 16, 16), torch.randint(0, 2, (6, 16, 16))
    start = {k: v.clone() for k, v in build().state_dict().items()}
    plain = LocalTrainer(build, images, masks, TrainSettings(batch_size=4))
    aug = LocalTrainer(build, images, masks, TrainSettings(batch_size=4, augment=AugmentSettings(colour=True)))
    a = aug.train(start, derive_generator(5, "x")).weights
    b = aug.train(start, derive_generator(5, "x")).weights
    p = plain.train(start, derive_generator(5, "x")).weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], p[k]) for k in a if a[k].is_floating_point())


def test_round_and_schedule_reach_the_optimizer():
    """Round 3 of 3 with a cosine schedule down to 0 trains at lr 0: the weights do not move (weight decay
    0), while round 1 moves them."""
    build = lambda: UNet(3, 2, 4, 2)  # noqa: E731
    torch.manual_seed(0)
    images, masks = torch.randn(4, 3, 16, 16), torch.randint(0, 2, (4, 16, 16))
    start = {k: v.clone() for k, v in build().state_dict().items()}
    trainer = LocalTrainer(build, images, masks, TrainSettings(batch_size=4, lr_schedule="cosine", rounds=3))
    trainer.set_round(3)
    last = trainer.train(start, derive_generator(0, "x")).weights
    trainer.set_round(1)
    first = trainer.train(start, derive_generator(0, "x")).weights
    assert torch.equal(last["head.weight"], start["head.weight"])
    assert not torch.equal(first["head.weight"], start["head.weight"])


@pytest.mark.slow
def test_a_round_with_augment_standard_is_reproducible(tmp_path):
    from iopfl.engine.local import in_process_run

    overrides = ["train.augment=standard", "train.lr_schedule=cosine", "train.weight_decay=1e-4", "fl.rounds=2"]
    a = in_process_run(tiny_config(tmp_path / "cache", overrides), tmp_path / "a").run()
    b = in_process_run(tiny_config(tmp_path / "cache", overrides), tmp_path / "b").run()
    plain = in_process_run(tiny_config(tmp_path / "cache", ["fl.rounds=2"]), tmp_path / "p").run()
    assert a["models"] == b["models"] and a["last_round"] == b["last_round"]
    assert a["last_round"] != plain["last_round"]


def test_config_keys_and_their_checks(tmp_path):
    from iopfl.config import build_config
    from iopfl.errors import UserError
    from iopfl.runtime import Runtime

    cfg = tiny_config(tmp_path, ["train.augment=standard", "train.aug_rotate=10", "train.lr_schedule=cosine"])
    cpu = Runtime(torch.device("cpu"), "fp32")
    settings = cfg.train_settings(cpu)
    assert settings.augment == AugmentSettings(rotate=10.0, colour=False)  # synthetic: 2.5D slices
    assert settings.rounds == cfg.fl.rounds and settings.lr_schedule == "cosine"
    assert tiny_config(tmp_path).train_settings(cpu).augment is None
    polyp = build_config({"data": {"source": "folder", "root": "x"}, "train": {"augment": "standard"}})
    assert polyp.train_settings(cpu).augment.colour  # 2D sources: channels are colours
    with pytest.raises(UserError, match="lr_min"):
        tiny_config(tmp_path, ["train.lr_min=1"])
    with pytest.raises(UserError, match="train.augment"):
        tiny_config(tmp_path, ["train.augment=heavy"])
