"""Frame sequences: rotation, rotating sequences, the MNAR mask, input checks and ragged padding."""

import math

import numpy as np
import pytest
import torch

from rhovae.data.frames import (
    DEFAULT_BRIGHT_RATIO,
    DEFAULT_MAX_SPEED,
    check_frame_arrays,
    mnar_mask,
    mnar_probabilities,
    pad_ragged,
    rotate_images,
    rotating_sequences,
)
from rhovae.errors import RhovaeError

# float32 sampling grids land on pixel centres only up to rounding (~1e-6 at these sizes)
ROTATION_ATOL = 1e-5


def digits(n: int = 48, size: int = 16, seed: int = 0) -> torch.Tensor:
    """``(n, 1, size, size)`` digit-like frames in [0, 1]: a few bright strokes with grey edges on black."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        for _ in range(3):
            r, c = rng.integers(2, size - 4, size=2)
            h, w = (rng.integers(1, 3), rng.integers(3, 8)) if rng.random() < 0.5 else (rng.integers(3, 8), 2)
            x[i, 0, r : r + h, c : c + w] = rng.uniform(0.7, 1.0)
            x[i, 0, r + h : r + h + 1, c : c + w] = rng.uniform(0.1, 0.4)
    return torch.from_numpy(x)


def raises_one_line(words, fn, *args, **kwargs) -> str:
    with pytest.raises(RhovaeError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)
    return message


# --- rotation -----------------------------------------------------------------------------------------


def test_rotation_by_zero_is_exactly_the_identity():
    x = torch.rand(5, 3, 9, 14)
    assert torch.equal(rotate_images(x, torch.zeros(5)), x)
    mixed = rotate_images(x, torch.tensor([0.0, 0.3, 0.0, -1.0, 0.0]))
    assert torch.equal(mixed[[0, 2, 4]], x[[0, 2, 4]]) and not torch.equal(mixed[1], x[1])


def test_rotation_by_two_pi_is_the_identity_up_to_rounding():
    x = torch.rand(4, 2, 16, 16)
    for angle in (2 * math.pi, -2 * math.pi):
        torch.testing.assert_close(rotate_images(x, torch.full((4,), angle)), x, atol=ROTATION_ATOL, rtol=0)


def test_quarter_turn_matches_rot90_on_a_square_image():
    x = torch.rand(3, 2, 16, 16)
    got = rotate_images(x, torch.full((3,), math.pi / 2))
    want = torch.rot90(x, 1, dims=(-2, -1))
    torch.testing.assert_close(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], atol=ROTATION_ATOL, rtol=0)
    torch.testing.assert_close(got, want, atol=ROTATION_ATOL, rtol=0)  # the border too, at these sizes
    back = rotate_images(x, torch.full((3,), -math.pi / 2))
    torch.testing.assert_close(back, torch.rot90(x, -1, dims=(-2, -1)), atol=ROTATION_ATOL, rtol=0)


def test_non_square_images_turn_in_pixel_units():
    x = torch.rand(2, 1, 8, 12)
    flipped = rotate_images(x, torch.full((2,), math.pi))
    torch.testing.assert_close(flipped, x.flip(-1, -2), atol=ROTATION_ATOL, rtol=0)
    # a centred 8×8 patch turns a true quarter turn (a rotation of the normalised square would stretch it)
    patch = torch.zeros(1, 1, 8, 12)
    patch[..., 2:10] = torch.rand(1, 1, 8, 8)
    got = rotate_images(patch, torch.tensor([math.pi / 2]))
    torch.testing.assert_close(got[..., 2:10], torch.rot90(patch[..., 2:10], 1, (-2, -1)), atol=1e-5, rtol=0)
    assert got[..., :2].abs().max() < 1e-5 and got[..., 10:].abs().max() < 1e-5


def test_rotation_keeps_values_in_range_and_mass_inside_the_frame():
    x = digits()
    y = rotate_images(x, torch.linspace(-3, 3, len(x)))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1
    # strokes stay well inside the frame, so bilinear rotation keeps most of their mass
    assert torch.allclose(y.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.15)


# --- rotating sequences -------------------------------------------------------------------------------


def test_rotating_sequences_shapes_speeds_and_frames():
    x = digits(n=12)
    seqs, speeds = rotating_sequences(x, frames=7, seed=3, max_start=0.0)
    assert seqs.shape == (12, 7, 1, 16, 16) and seqs.dtype == x.dtype
    assert speeds.shape == (12,) and speeds.abs().max() <= DEFAULT_MAX_SPEED
    assert torch.equal(seqs[:, 0], x)  # start 0: frame 0 is the source, bit for bit
    for t in (1, 6):  # frame t is the source turned by t * speed, not a re-rotated previous frame
        torch.testing.assert_close(seqs[:, t], rotate_images(x, t * speeds), atol=0, rtol=0)


def test_default_speed_turns_a_visible_amount_over_ten_frames():
    _, speeds = rotating_sequences(torch.zeros(2000, 1, 4, 4), seed=0)
    turn = (speeds.abs() * 9).median()  # degrees over the 9 steps of 10 frames: ~67.5
    assert math.radians(55) < turn < math.radians(80)
    assert math.degrees(DEFAULT_MAX_SPEED) == pytest.approx(15)


def test_rotating_sequences_are_deterministic_by_seed():
    x = digits(n=10)
    a, sa = rotating_sequences(x, seed=5)
    b, sb = rotating_sequences(x, seed=5)
    c, sc = rotating_sequences(x, seed=6)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert not torch.equal(sa, sc) and not torch.equal(a, c)


# --- missingness not at random ------------------------------------------------------------------------


def test_mnar_mask_hits_the_missing_rate_and_depends_on_the_values():
    seqs, _ = rotating_sequences(digits(), seed=0)
    mask = mnar_mask(seqs, missing_rate=0.6, seed=1)
    assert mask.shape == seqs.shape and mask.dtype == torch.bool
    bright = seqs > 0.5
    n, n_bright = bright.numel(), int(bright.sum())
    b = n_bright / n
    p_lo, p_hi = mnar_probabilities(b, 0.6, DEFAULT_BRIGHT_RATIO)
    assert p_hi == pytest.approx(DEFAULT_BRIGHT_RATIO * p_lo)
    assert b * p_hi + (1 - b) * p_lo == pytest.approx(0.6)
    missing = ~mask
    # the realised fraction is a mean of independent Bernoullis: 5 binomial standard deviations
    sd = math.sqrt((n_bright * p_hi * (1 - p_hi) + (n - n_bright) * p_lo * (1 - p_lo)) / n**2)
    assert abs(missing.float().mean().item() - 0.6) < 5 * sd
    miss_bright = missing[bright].float().mean().item()
    miss_dark = missing[~bright].float().mean().item()
    assert abs(miss_bright - p_hi) < 5 * math.sqrt(p_hi * (1 - p_hi) / n_bright)
    assert abs(miss_dark - p_lo) < 5 * math.sqrt(p_lo * (1 - p_lo) / (n - n_bright))
    assert miss_bright > miss_dark + 0.1  # missing not at random: bright values go missing more often


def test_mnar_mask_is_deterministic_by_seed_and_edge_rates():
    seqs, _ = rotating_sequences(digits(n=8), seed=0)
    assert torch.equal(mnar_mask(seqs, seed=2), mnar_mask(seqs, seed=2))
    assert not torch.equal(mnar_mask(seqs, seed=2), mnar_mask(seqs, seed=3))
    assert mnar_mask(seqs, missing_rate=0.0).all()
    assert mnar_probabilities(0.2, 0.5, 2.0) == pytest.approx((0.5 / 1.2, 1.0 / 1.2))
    assert mnar_probabilities(0.0, 0.5, 2.0) == (0.5, 1.0)  # rate * ratio == 1 is feasible
    assert mnar_probabilities(0.3, 0.6, 1.0) == pytest.approx((0.6, 0.6))  # ratio 1: missing at random


# --- bad inputs: one line each, naming the problem and the fix ---------------------------------------


def test_bad_rotation_and_sequence_inputs():
    x = torch.rand(2, 1, 5, 5)
    raises_one_line(["(2, 5, 5)", "(N, C, H, W)"], rotate_images, x[:, 0], torch.zeros(2))
    raises_one_line(["angles", "(2,)"], rotate_images, x, torch.zeros(3))
    raises_one_line(["dtype", "float"], rotate_images, (x * 255).to(torch.uint8), torch.zeros(2))
    raises_one_line(["NaN"], rotate_images, x, torch.tensor([0.0, math.nan]))
    raises_one_line(["frames", ">= 2"], rotating_sequences, x, frames=1)
    raises_one_line(["max_speed", ">= 0"], rotating_sequences, x, max_speed=-0.1)
    raises_one_line(["images", "list"], rotate_images, [[0.0]], torch.zeros(1))


@pytest.mark.parametrize("rate", [1.0, -0.1, math.nan, 1.5])
def test_missing_rate_outside_unit_interval_is_refused(rate):
    raises_one_line(["missing_rate", "[0, 1)"], mnar_mask, torch.rand(2, 3, 4), missing_rate=rate)


def test_bad_mnar_inputs():
    x = torch.rand(4, 3, 5)
    raises_one_line(["bright_ratio", ">= 1"], mnar_mask, x, bright_ratio=0.5)
    message = raises_one_line(["bright_ratio", "p_hi", "missing_rate"], mnar_probabilities, 0.1, 0.6, 2.0)
    assert f"{0.9 / 0.5:.3f}" in message  # the largest feasible ratio, (1 - b) / (rate - b)
    x[1, 2, 3] = math.nan
    raises_one_line(["NaN", "complete"], mnar_mask, x)


def test_check_frame_arrays_accepts_good_input():
    x = torch.rand(3, 4, 2, 5, 5)
    mask = torch.rand(x.shape) > 0.5
    mask[:, 0, 0, 0, 0] = True
    x[~mask] = math.nan  # anything at missing positions is fine
    check_frame_arrays(x, mask)
    check_frame_arrays(np.random.default_rng(0).random((2, 3, 4)))
    check_frame_arrays(x.nan_to_num())


def test_check_frame_arrays_refuses_each_bad_input():
    x = torch.rand(3, 4, 6)
    ones = torch.ones(x.shape, dtype=torch.bool)
    raises_one_line(["T = 1", "no time", "--model cnn or mlp"], check_frame_arrays, x[:, :1])
    raises_one_line(["(3, 4)", "(N, T, ...)", "x[..., None]"], check_frame_arrays, x[..., 0])
    raises_one_line(["(0, 4, 6)", "no sequences"], check_frame_arrays, x[:0])
    raises_one_line(["(3, 4)", "(3, 4, 6)", "True = observed"], check_frame_arrays, x, ones[..., 0])
    words = ["dtype torch.int64", "bool", "== 0", "!= 0"]
    message = raises_one_line(words, check_frame_arrays, x, ones.long())
    assert "GP-VAE" in message  # names the convention a 0/1 mask might follow
    empty = ones.clone()
    empty[2] = False
    raises_one_line(["sequence 2", "no observed value"], check_frame_arrays, x, empty)
    x[1, 3, 2] = math.nan
    raises_one_line(["NaN", "sequence 1, frame 3", "mask"], check_frame_arrays, x, ones)
    raises_one_line(["NaN", "sequence 1, frame 3", "mask"], check_frame_arrays, x)
    ones[1, 3, 2] = False
    check_frame_arrays(x, ones)
    raises_one_line(["complex"], check_frame_arrays, torch.zeros(2, 3, 4, dtype=torch.complex64))


def test_ragged_input_points_to_pad_ragged():
    ragged = [np.zeros((3, 2)), np.zeros((5, 2))]
    objects = np.empty(2, dtype=object)
    objects[:] = ragged
    raises_one_line(["object array", "pad_ragged", "mask"], check_frame_arrays, objects)
    raises_one_line(["list of 2 sequences", "pad_ragged"], check_frame_arrays, ragged)


def test_pad_ragged_round_trip():
    rng = np.random.default_rng(0)
    sequences = [rng.random((t, 2, 3)).astype(np.float32) for t in (4, 2, 7)]
    x, mask = pad_ragged(sequences)
    assert x.shape == mask.shape == (3, 7, 2, 3) and x.dtype == torch.float32 and mask.dtype == torch.bool
    lengths = mask.flatten(2).all(-1).sum(1)
    assert lengths.tolist() == [4, 2, 7]
    assert (mask.flatten(2).all(-1) | ~mask.flatten(2).any(-1)).all()  # a frame is wholly real or padding
    for s, xi, n in zip(sequences, x, lengths, strict=True):
        assert np.array_equal(xi[:n].numpy(), s) and (xi[n:] == 0).all()
    check_frame_arrays(x, mask)
    # tensors and mixed dtypes promote; a single array is not a list of sequences
    x2, _ = pad_ragged([torch.ones(2, 1, dtype=torch.int64), torch.ones(3, 1, dtype=torch.float64)])
    assert x2.dtype == torch.float64 and x2.shape == (2, 3, 1)
    raises_one_line(["already one array"], pad_ragged, np.zeros((2, 3, 4)))
    raises_one_line(["no sequences"], pad_ragged, [])
    raises_one_line(["sequences[1]", "(3,)", "(2,)"], pad_ragged, [np.zeros((2, 2)), np.zeros((2, 3))])
    raises_one_line(["sequences[0]", "no frames"], pad_ragged, [np.zeros((0, 2)), np.zeros((2, 2))])
